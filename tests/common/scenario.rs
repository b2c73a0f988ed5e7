//! The fault-scenario checker. A scenario produces a known stream (many conids and
//! symbols, repeats, late updates, 3% bad messages of every kind), drives workers
//! through its faults, then [`Scenario::finish`] lets a clean worker drain whatever is
//! left and compares, row by row, the Delta table with the model of the stream, the
//! dead letters with the bad messages, and the committed offsets with the log ends.
//!
//! Sizes: `POSITION_SINK_FAULT_SCALE=full` runs the full-size versions
//! (`scripts/faults.sh`); the default is the scaled-down size the test command runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use position_sink::config::Config;

use super::*;

/// `ci` normally, `full` under `POSITION_SINK_FAULT_SCALE=full`.
pub fn sized(ci: usize, full: usize) -> usize {
    if std::env::var("POSITION_SINK_FAULT_SCALE").is_ok_and(|s| s == "full") { full } else { ci }
}

/// Percentage of bad messages in every scenario's stream.
pub const BAD_PERCENT: u64 = 3;

/// One fault scenario's stream, group and table.
pub struct Scenario {
    pub name: &'static str,
    pub brokers: String,
    pub topic: String,
    pub partitions: i32,
    pub group: String,
    pub dir: tempfile::TempDir,
    pub table: PathBuf,
    /// The table location the workers get (a `faulty://` one for storage faults).
    pub table_uri: String,
    pub produced: Vec<Produced>,
    pub started: Instant,
    /// How the table's flushes replace rows (every worker of the scenario gets it).
    pub write_mode: position_sink::config::WriteMode,
    seed: u64,
}

impl Scenario {
    /// A scenario on the shared test broker.
    pub async fn new(name: &'static str, partitions: i32) -> Self {
        Self::on(&brokers(), name, partitions).await
    }

    /// A scenario on the broker at `brokers`.
    pub async fn on(brokers: &str, name: &'static str, partitions: i32) -> Self {
        let topic = create_topic_on(brokers, name, partitions).await;
        Self::with_topic(brokers, name, topic, partitions)
    }

    /// A scenario on an existing topic.
    pub fn with_topic(brokers: &str, name: &'static str, topic: String, partitions: i32) -> Self {
        let (dir, table) = table_dir();
        let seed: u64 = rand::random();
        eprintln!("scenario {name}: stream seed {seed}");
        Self {
            name,
            brokers: brokers.to_string(),
            topic,
            partitions,
            group: unique("g"),
            table_uri: table.display().to_string(),
            dir,
            table,
            produced: Vec::new(),
            started: Instant::now(),
            write_mode: position_sink::config::WriteMode::CopyOnWrite,
            seed,
        }
    }

    /// A worker configuration for this scenario (short flush window, quick retries).
    pub fn config(&self) -> Config {
        let mut c = config(&self.topic, &self.group, &self.table);
        c.kafka.brokers = self.brokers.clone();
        c.delta.table_uri = self.table_uri.clone();
        c.dead_letter.table_uri = format!("{}_dead_letters", self.table_uri);
        c.delta.write_mode = self.write_mode;
        // Some files get vectors, the smallest are rewritten: both paths of a flush.
        c.delta.vector_min_rows = 20;
        c
    }

    /// The next chunk of the stream: `count` messages over `count / 40` instruments
    /// (at least 100), 3% bad.
    pub fn next_chunk(&mut self, count: usize) -> Vec<Msg> {
        self.seed = self.seed.wrapping_add(1);
        sample_with_bad(count, (count / 40).max(100), self.seed, BAD_PERCENT)
    }

    /// Produces `count` more messages and waits for every acknowledgement.
    pub async fn produce(&mut self, count: usize) {
        let chunk = self.next_chunk(count);
        let produced = produce_on(&self.brokers, &self.topic, &chunk, None).await;
        self.produced.extend(produced);
    }

    /// Produces `count` messages in `chunks` pieces spread over `over`, in the background
    /// (on a thread of its own, so the workers' runtime is not slowed by it).
    pub fn produce_during(&mut self, count: usize, chunks: usize, over: Duration) -> Background {
        let pieces: Vec<Vec<Msg>> = (0..chunks).map(|_| self.next_chunk(count / chunks)).collect();
        let (brokers, topic) = (self.brokers.clone(), self.topic.clone());
        let pause = over / chunks as u32;
        let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let so_far = std::sync::Arc::clone(&acknowledged);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                for piece in pieces {
                    let produced = produce_on(&brokers, &topic, &piece, None).await;
                    so_far.lock().expect("produced").extend(produced);
                    tokio::time::sleep(pause).await;
                }
            })
        });
        Background { thread, acknowledged }
    }

    /// The group's committed offsets now.
    pub fn committed(&self) -> BTreeMap<i32, Option<i64>> {
        committed_offsets_on(&self.brokers, &self.group, &self.topic, self.partitions)
    }

    /// Whether the group committed every partition to its end.
    pub fn is_committed_to_end(&self) -> bool {
        self.committed() == end_offsets(&self.produced, self.partitions)
    }

    /// Lets a clean worker drain what is left, then checks everything.
    pub async fn finish(&self) {
        run_to_end(self.config()).await.expect("the draining worker succeeds");
        self.check().await;
    }

    /// Compares the table with the model, the dead letters with the bad messages and
    /// the committed offsets with the log ends; panics on any difference.
    pub async fn check(&self) {
        let table = read_table(&self.table).await;
        assert_table_matches(&table, &model(&self.produced));
        let dead = read_dead_letters(&self.table).await;
        assert_dead_letters_match(&dead, &self.topic, &self.produced);
        assert_eq!(self.committed(), end_offsets(&self.produced, self.partitions), "committed offsets");
        let bad = self.produced.iter().filter(|m| m.rejection.is_some()).count();
        eprintln!(
            "scenario {}: {} messages ({bad} bad) on {} partitions → {} rows, {} dead letters, offsets at the end: exact ({:.1} s)",
            self.name,
            self.produced.len(),
            self.partitions,
            table.len(),
            dead.len(),
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Messages being produced in the background.
pub struct Background {
    thread: std::thread::JoinHandle<()>,
    acknowledged: std::sync::Arc<std::sync::Mutex<Vec<Produced>>>,
}

impl Background {
    /// Waits until all are produced and returns where they landed.
    pub async fn finish(self) -> Vec<Produced> {
        let Self { thread, acknowledged } = self;
        tokio::task::spawn_blocking(move || thread.join().expect("producer thread")).await.expect("join");
        std::mem::take(&mut *acknowledged.lock().expect("produced"))
    }

    /// Those acknowledged so far, whole pieces only.
    pub fn so_far(&self) -> Vec<Produced> {
        self.acknowledged.lock().expect("produced").clone()
    }
}
