//! Batches for the table-level tests: a seeded stream of flushes over a few hundred
//! conids (updates mostly newer, some late, some repeated, conids changing symbol,
//! symbols whose partition directories are escaped) and
//! the model of what the table must hold after them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use position_sink::offsets::{Coordinates, Offset, TopicPartition};
use position_sink::update::PositionUpdate;
use position_sink::worker::batch::Batch;

/// Kafka partitions of the stream (topic `t`).
pub const PARTITIONS: i32 = 3;

/// One decoded update of topic `t`.
pub fn update(conid: i64, symbol: &str, millis: i64, partition: i32, offset: i64) -> PositionUpdate {
    let at = Coordinates { tp: TopicPartition::new("t", partition), offset: Offset(offset) };
    let json = format!(r#"{{"conid":{conid},"symbol":"{symbol}","position":{offset},"timestamp":{millis}}}"#);
    position_sink::decode::decode(None, Some(json.as_bytes()), at, &Default::default()).expect("valid update")
}

/// The newest update per conid, by (timestamp, offset, partition): what the table must hold.
#[derive(Default)]
pub struct Model(pub BTreeMap<i64, PositionUpdate>);

impl Model {
    pub fn apply(&mut self, update: &PositionUpdate) {
        if self.0.get(&update.conid).is_none_or(|old| update.supersedes(old)) {
            self.0.insert(update.conid, update.clone());
        }
    }

    pub fn expected(&self) -> BTreeMap<(String, i64), super::Row> {
        self.0
            .values()
            .map(|u| {
                let row = super::Row {
                    conid: u.conid,
                    symbol: u.symbol.clone(),
                    position: u.position,
                    timestamp_micros: u.timestamp_micros,
                    account: None,
                    market_price: None,
                    kafka_partition: u.source.tp.partition.0,
                    kafka_offset: u.source.offset.0,
                    ingested_at: 0,
                };
                ((u.symbol.clone(), u.conid), row)
            })
            .collect()
    }

    /// (conid, symbol, kafka_offset) per row, as the Python readers print it.
    pub fn triples(&self) -> Vec<(i64, String, i64)> {
        self.0.values().map(|u| (u.conid, u.symbol.clone(), u.source.offset.0)).collect()
    }
}

/// The `n`th of the stream's symbols: two of them name partition directories only
/// escaped (a space, a slash), as real tickers do.
fn symbol_name(n: u32) -> String {
    match n {
        0 => "BRK B".to_string(),
        1 => "BF/B".to_string(),
        n => format!("S{n:02}"),
    }
}

/// A stream of flushes over 300 conids and 12 symbols: updates mostly newer, some late
/// (older than what the table holds), some repeated, and conids that change symbol.
pub struct Stream {
    rng: StdRng,
    symbols: BTreeMap<i64, String>,
    offsets: [i64; PARTITIONS as usize],
    clock: i64,
}

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), symbols: BTreeMap::new(), offsets: [0; 3], clock: 1_000_000 }
    }

    /// One flush's batch (one row per key, the newest of the flush's updates).
    pub fn flush(&mut self, model: &mut Model, updates: usize) -> Batch {
        let mut newest: BTreeMap<i64, PositionUpdate> = BTreeMap::new();
        for _ in 0..updates {
            let conid = self.rng.random_range(1..=300i64);
            let moves = self.rng.random_bool(0.05);
            let symbol = if moves || !self.symbols.contains_key(&conid) {
                let s = symbol_name(self.rng.random_range(0..12));
                self.symbols.insert(conid, s.clone());
                s
            } else {
                self.symbols[&conid].clone()
            };
            self.clock += 1;
            let late = self.rng.random_bool(0.1);
            let millis = if late { self.clock - self.rng.random_range(1..500) } else { self.clock };
            let partition = (conid % i64::from(PARTITIONS)) as i32;
            let offset = self.offsets[partition as usize];
            self.offsets[partition as usize] += 1;
            let u = update(conid, &symbol, millis, partition, offset);
            model.apply(&u);
            if newest.get(&conid).is_none_or(|old| u.supersedes(old)) {
                newest.insert(conid, u);
            }
        }
        Batch::of_rows(newest.into_values().collect())
    }
}

/// Sets every data and vector file's modification time two hours back, as if written
/// then (vacuum decides by it).
pub fn age_everything(path: &Path) {
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir").filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() {
                if !name.starts_with('_') {
                    pending.push(entry.path());
                }
            } else if name.ends_with(".parquet") || name.ends_with(".bin") {
                let file = std::fs::File::options().write(true).open(entry.path()).expect("file");
                file.set_modified(two_hours_ago).expect("age the file");
            }
        }
    }
}
