//! `position-sink reconcile --snapshot FILE`: the table against a broker's positions
//! snapshot. The comparison is pure ([`compare`]); reading the snapshot and the table
//! is around it.
//!
//! A snapshot is JSON Lines or CSV (by extension, `.csv`; anything else is JSON Lines)
//! with `conid` and `position`, and optionally `account`, `avg_cost`, `market_value` and
//! `as_of` (RFC 3339; `--as-of` wins). Keys are matched on `conid`, and on `account` too
//! when `account` is one of `delta.key_columns`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::show::plain_table;
use super::{Format, OpsError, Outcome, RowFilter, open_table, rfc3339, rows};
use crate::config::Config;
use crate::history::AsOf;
use crate::table::schema::TableRow;
use crate::update::KeyColumn;

/// One line of a snapshot.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SnapshotRow {
    /// Contract id.
    pub conid: i64,
    /// Position the broker reports.
    pub position: f64,
    /// Account.
    #[serde(default)]
    pub account: Option<String>,
    /// Average cost.
    #[serde(default)]
    pub avg_cost: Option<f64>,
    /// Market value.
    #[serde(default)]
    pub market_value: Option<f64>,
    /// When the broker took the snapshot.
    #[serde(default)]
    pub as_of: Option<String>,
}

/// Thresholds of the comparison.
#[derive(Debug, Clone, Copy)]
pub struct Tolerances {
    /// Largest absolute position difference that still matches.
    pub position: f64,
    /// A matched row whose event time is older than the as-of time by more than this is stale.
    pub stale_after: Duration,
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// `missing` (in the snapshot, not in the table), `extra` (a non-zero position in
    /// the table, not in the snapshot), `mismatch` (positions differ) or `stale`.
    pub kind: &'static str,
    /// Contract id.
    pub conid: i64,
    /// Account, when keys include it.
    pub account: Option<String>,
    /// The snapshot's position.
    pub snapshot_position: Option<f64>,
    /// The table's position.
    pub table_position: Option<f64>,
    /// The table row's event time.
    pub table_timestamp: Option<String>,
    /// Where the table row came from (`topic:partition:offset`).
    pub table_source: Option<String>,
}

/// The outcome of a comparison.
#[derive(Debug, Default, Serialize)]
pub struct Reconciliation {
    /// The as-of time compared against.
    pub as_of: String,
    /// Keys in the snapshot.
    pub snapshot_keys: usize,
    /// Rows in the table.
    pub table_rows: usize,
    /// Keys that match.
    pub matching: usize,
    /// Per kind.
    pub missing: usize,
    /// …
    pub extra: usize,
    /// …
    pub mismatched: usize,
    /// …
    pub stale: usize,
    /// Positions that differ because the table holds an update newer than the as-of
    /// time (not a difference: the snapshot is older).
    pub newer_in_table: usize,
    /// The differences, by conid.
    pub findings: Vec<Finding>,
}

impl Reconciliation {
    /// Whether any difference was found.
    pub fn is_consistent(&self) -> bool {
        self.missing + self.extra + self.mismatched + self.stale == 0
    }
}

/// Compares `table` rows with `snapshot` rows as of `as_of_micros`.
pub fn compare(
    snapshot: &[SnapshotRow],
    table: &[TableRow],
    by_account: bool,
    as_of_micros: i64,
    tolerances: Tolerances,
) -> Reconciliation {
    let key = |conid: i64, account: &Option<String>| (conid, if by_account { account.clone() } else { None });
    let snap: BTreeMap<(i64, Option<String>), &SnapshotRow> =
        snapshot.iter().map(|r| (key(r.conid, &r.account), r)).collect();
    let held: BTreeMap<(i64, Option<String>), &TableRow> =
        table.iter().map(|r| (key(r.update.conid, &r.update.account), r)).collect();
    let stale_before = as_of_micros - i64::try_from(tolerances.stale_after.as_micros()).unwrap_or(i64::MAX);
    let mut report = Reconciliation {
        as_of: rfc3339(as_of_micros),
        snapshot_keys: snap.len(),
        table_rows: table.len(),
        ..Reconciliation::default()
    };
    let finding =
        |kind, (conid, account): &(i64, Option<String>), s: Option<&SnapshotRow>, t: Option<&TableRow>| Finding {
            kind,
            conid: *conid,
            account: account.clone(),
            snapshot_position: s.map(|s| s.position),
            table_position: t.map(|t| t.update.position),
            table_timestamp: t.map(|t| rfc3339(t.update.timestamp_micros)),
            table_source: t.map(|t| {
                format!("{}:{}:{}", t.update.source.tp.topic, t.update.source.tp.partition.0, t.update.source.offset.0)
            }),
        };
    for (k, s) in &snap {
        match held.get(k) {
            None if s.position == 0.0 => report.matching += 1,
            None => {
                report.missing += 1;
                report.findings.push(finding("missing", k, Some(s), None));
            }
            Some(t) if (t.update.position - s.position).abs() > tolerances.position => {
                if t.update.timestamp_micros > as_of_micros {
                    report.newer_in_table += 1;
                } else {
                    report.mismatched += 1;
                    report.findings.push(finding("mismatch", k, Some(s), Some(t)));
                }
            }
            Some(t) if t.update.timestamp_micros < stale_before => {
                report.stale += 1;
                report.findings.push(finding("stale", k, Some(s), Some(t)));
            }
            Some(_) => report.matching += 1,
        }
    }
    for (k, t) in &held {
        if !snap.contains_key(k) && t.update.position != 0.0 {
            report.extra += 1;
            report.findings.push(finding("extra", k, None, Some(t)));
        }
    }
    report.findings.sort_by(|a, b| (a.conid, &a.account, a.kind).cmp(&(b.conid, &b.account, b.kind)));
    report
}

/// Reads a snapshot file: CSV when its name ends in `.csv`, JSON Lines otherwise.
///
/// # Errors
/// [`OpsError::Input`] naming the file and line that cannot be read.
pub fn read_snapshot(path: &Path) -> Result<Vec<SnapshotRow>, OpsError> {
    let input_err = |what: String| OpsError::Input(format!("snapshot {}: {what}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| input_err(e.to_string()))?;
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text.as_bytes());
        reader
            .deserialize()
            .enumerate()
            .map(|(i, row)| row.map_err(|e| input_err(format!("line {}: {e} (columns: conid, position, …)", i + 2))))
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .map_err(|e| input_err(format!("line {}: {e} (fields: conid, position, …)", i + 1)))
            })
            .collect()
    }
}

/// Reads the snapshot and the table and compares them.
///
/// # Errors
/// See [`OpsError`].
pub async fn reconcile(
    config: &Config,
    snapshot: &Path,
    as_of: Option<&str>,
    tolerances: Tolerances,
) -> Result<Reconciliation, OpsError> {
    let snapshot_rows = read_snapshot(snapshot)?;
    let as_of_text = as_of.map(str::to_string).or_else(|| snapshot_rows.iter().find_map(|r| r.as_of.clone()));
    let as_of_micros = match &as_of_text {
        Some(text) => chrono::DateTime::parse_from_rfc3339(text)
            .map_err(|e| {
                OpsError::Input(format!("as-of time {text:?} is not RFC 3339 ({e}); e.g. 2026-11-29T16:00:00Z"))
            })?
            .timestamp_micros(),
        None => chrono::Utc::now().timestamp_micros(),
    };
    // With the history kept, a snapshot of a given time is compared with the book of
    // that time; otherwise with the table now (older rows then show as stale).
    let held = if config.history.enabled && as_of_text.is_some() {
        super::show::book(config, &RowFilter::default(), AsOf::Event(as_of_micros), false).await?
    } else {
        rows(&open_table(&config.delta).await?, &RowFilter::default()).await?
    };
    let by_account = config.delta.key_columns.contains(&KeyColumn::Account);
    Ok(compare(&snapshot_rows, &held, by_account, as_of_micros, tolerances))
}

/// Prints `report` in `format`; at most `details` findings in the table format.
pub fn print(report: &Reconciliation, format: Format, details: usize) -> Outcome {
    let outcome = if report.is_consistent() { Outcome::Clean } else { Outcome::Differences };
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
        return outcome;
    }
    if !report.findings.is_empty() {
        let mut table = plain_table(["kind", "conid", "account", "snapshot", "table", "table timestamp", "source"]);
        for f in report.findings.iter().take(details) {
            let number = |v: Option<f64>| v.map_or("-".to_string(), |v| v.to_string());
            table.add_row([
                f.kind.to_string(),
                f.conid.to_string(),
                f.account.clone().unwrap_or_default(),
                number(f.snapshot_position),
                number(f.table_position),
                f.table_timestamp.clone().unwrap_or_default(),
                f.table_source.clone().unwrap_or_default(),
            ]);
        }
        println!("{table}");
        if report.findings.len() > details {
            println!("… and {} more (--details, or --format json)", report.findings.len() - details);
        }
    }
    let verdict = if report.is_consistent() { "consistent" } else { "DIFFERENCES" };
    println!(
        "{verdict} as of {}: {} snapshot keys, {} table rows, {} matching, {} missing, {} extra, {} mismatched, {} stale, \
         {} newer in the table than the snapshot",
        report.as_of,
        report.snapshot_keys,
        report.table_rows,
        report.matching,
        report.missing,
        report.extra,
        report.mismatched,
        report.stale,
        report.newer_in_table
    );
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::tests::update;

    fn held(conid: i64, position: f64, ts: i64) -> TableRow {
        let mut u = update(conid, "SYM", ts, 0, conid);
        u.position = position;
        TableRow { update: u, ingested_at_micros: ts }
    }

    fn snap(conid: i64, position: f64) -> SnapshotRow {
        SnapshotRow { conid, position, account: None, avg_cost: None, market_value: None, as_of: None }
    }

    const TOLERANCES: Tolerances = Tolerances { position: 0.001, stale_after: Duration::from_secs(3600) };
    const AS_OF: i64 = 10 * 3_600_000_000;

    #[test]
    fn a_matching_snapshot_is_consistent() {
        let table = [held(1, 5.0, AS_OF - 1), held(2, -3.0, AS_OF - 2), held(3, 0.0, AS_OF - 3)];
        let snapshot = [snap(1, 5.0004), snap(2, -3.0), snap(4, 0.0)];
        let report = compare(&snapshot, &table, false, AS_OF, TOLERANCES);
        assert!(report.is_consistent(), "{report:?}");
        assert_eq!(
            report.matching, 3,
            "a zero position missing from the table matches; a zero row not in the snapshot is no difference"
        );
    }

    #[test]
    fn each_kind_of_difference_is_found() {
        let table = [
            held(1, 5.0, AS_OF - 1),
            held(2, 7.0, AS_OF - 1),
            held(3, 1.0, AS_OF - 7_200_000_000),
            held(5, 9.0, AS_OF - 1),
            held(6, 8.0, AS_OF + 1),
        ];
        let snapshot = [snap(1, 5.0), snap(2, 6.0), snap(3, 1.0), snap(4, 2.0), snap(6, 1.0)];
        let report = compare(&snapshot, &table, false, AS_OF, TOLERANCES);
        let kinds: Vec<(&str, i64)> = report.findings.iter().map(|f| (f.kind, f.conid)).collect();
        assert_eq!(kinds, [("mismatch", 2), ("stale", 3), ("missing", 4), ("extra", 5)]);
        assert_eq!((report.missing, report.extra, report.mismatched, report.stale), (1, 1, 1, 1));
        assert_eq!(report.newer_in_table, 1, "the table's update of conid 6 is newer than the snapshot");
        assert!(!report.is_consistent());
    }

    #[test]
    fn accounts_are_matched_when_they_are_part_of_the_key() {
        let mut a = held(1, 5.0, AS_OF - 1);
        a.update.account = Some("U1".into());
        let mut b = held(1, 2.0, AS_OF - 1);
        b.update.account = Some("U2".into());
        let mut s1 = snap(1, 5.0);
        s1.account = Some("U1".into());
        let mut s2 = snap(1, 2.0);
        s2.account = Some("U2".into());
        let report = compare(&[s1, s2], &[a, b], true, AS_OF, TOLERANCES);
        assert!(report.is_consistent(), "{report:?}");
    }

    #[test]
    fn snapshots_are_read_from_json_lines_and_csv() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("s.jsonl");
        std::fs::write(&jsonl, "{\"conid\":1,\"position\":5,\"as_of\":\"2026-11-29T16:00:00Z\"}\n\n{\"conid\":2,\"position\":-1.5,\"account\":\"U1\"}\n").unwrap();
        let rows = read_snapshot(&jsonl).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].account.as_deref(), Some("U1"));
        let csv_path = dir.path().join("s.csv");
        std::fs::write(&csv_path, "conid,position,account,avg_cost\n1, 5,U1,10.5\n2,-1.5,,\n").unwrap();
        let rows = read_snapshot(&csv_path).unwrap();
        assert_eq!((rows[0].position, rows[0].avg_cost), (5.0, Some(10.5)));
        std::fs::write(&csv_path, "conid,position\nx,1\n").unwrap();
        let error = read_snapshot(&csv_path).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
    }
}
