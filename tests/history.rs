//! The history table: every valid update held once, through a crash between the
//! history's commit and the positions table's, SIGKILLs, aborts between the Delta and
//! Kafka commits and a forced replay; and the book of a past time, by event time and
//! as known at a commit, equal to the model of the stream.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::scenario::{Scenario, sized};
use common::*;
use deltalake::arrow::array::AsArray;
use deltalake::arrow::datatypes::{Int32Type, Int64Type};
use deltalake::datafusion::prelude::SessionContext;
use position_sink::WorkerError;
use position_sink::config::Config;
use position_sink::faults::CrashPoints;
use position_sink::history::{self, AsOf, BookFilter};
use position_sink::worker::flush::FlushError;
use rand::{Rng, SeedableRng};

/// A key's row in a book: conid → (Kafka partition, offset) of the update it shows.
type Book = BTreeMap<i64, (i32, i64)>;

fn history_config(s: &Scenario) -> Config {
    let mut c = s.config();
    c.history.enabled = true;
    c.flush.interval = Duration::from_millis(300);
    c.flush.max_records = 2000;
    c
}

fn history_uri(s: &Scenario) -> String {
    format!("{}_history", s.table_uri)
}

/// The event time of a produced valid message, µs since the epoch.
fn event_micros(m: &Produced) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(m.value.as_deref().unwrap_or_default()).expect("valid JSON");
    match &v["timestamp"] {
        serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).expect("ts").timestamp_micros(),
        other => other.as_i64().expect("millis") * 1000,
    }
}

/// The book as of event time `t` computed from the stream: last write wins over the
/// valid messages with `timestamp <= t`.
fn model_as_of(produced: &[Produced], t: i64) -> Book {
    let before: Vec<Produced> =
        produced.iter().filter(|m| m.rejection.is_none() && event_micros(m) <= t).cloned().collect();
    model(&before).into_values().map(|r| (r.conid, (r.kafka_partition, r.kafka_offset))).collect()
}

fn book_of_rows(rows: &[position_sink::table::schema::TableRow]) -> Book {
    let mut book = Book::new();
    for row in rows {
        let u = &row.update;
        assert!(
            book.insert(u.conid, (u.source.tp.partition.0, u.source.offset.0)).is_none(),
            "two rows of {}",
            u.conid
        );
    }
    book
}

async fn open(uri: &str) -> deltalake::DeltaTable {
    let url = deltalake::ensure_table_uri(uri).expect("url");
    deltalake::open_table(url).await.expect("open the history table")
}

async fn book(uri: &str, as_of: AsOf) -> Book {
    let table = open(uri).await;
    let keys = Config::default().delta.key_columns;
    book_of_rows(&history::book(&table, as_of, &keys, &BookFilter::default(), &()).await.expect("book"))
}

/// Every row of the history as its Kafka (partition, offset), sorted, duplicates kept.
async fn history_coordinates(uri: &str) -> Vec<(i32, i64)> {
    let ctx = SessionContext::new();
    ctx.register_table("h", open(uri).await.table_provider().await.expect("provider")).expect("register");
    let batches =
        ctx.sql("SELECT kafka_partition, kafka_offset FROM h").await.expect("query").collect().await.expect("rows");
    let mut found: Vec<(i32, i64)> = batches
        .iter()
        .flat_map(|b| {
            let (p, o) = (b.column(0).as_primitive::<Int32Type>(), b.column(1).as_primitive::<Int64Type>());
            (0..b.num_rows()).map(|r| (p.value(r), o.value(r))).collect::<Vec<_>>()
        })
        .collect();
    found.sort_unstable();
    found
}

/// The data files of the history's latest version, relative to the table.
async fn history_files(uri: &str) -> Vec<String> {
    let table = open(uri).await;
    let snapshot = table.snapshot().expect("snapshot");
    snapshot.log_data().iter().map(|f| f.path().to_string()).collect()
}

/// Whether the parquet file at `path` holds its rows in `conid, timestamp` order.
fn sorted_by_conid_and_time(path: &str) -> bool {
    use deltalake::arrow::datatypes::TimestampMicrosecondType;
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    // Day directories (`event_date=2025-11-25`) need no escaping.
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet").build().expect("reader");
    let mut keys = Vec::new();
    for batch in reader {
        let batch = batch.expect("batch");
        let conid = batch.column_by_name("conid").expect("conid").as_primitive::<Int64Type>().clone();
        let ts =
            batch.column_by_name("timestamp").expect("timestamp").as_primitive::<TimestampMicrosecondType>().clone();
        keys.extend((0..batch.num_rows()).map(|r| (conid.value(r), ts.value(r))));
    }
    keys.len() > 1 && keys.windows(2).all(|w| w[0] <= w[1])
}

/// The commit time (ms since the epoch) the log records for `version` of the table at `path`.
fn commit_millis(path: &std::path::Path, version: u64) -> i64 {
    let file = path.join("_delta_log").join(format!("{version:020}.json"));
    let text = std::fs::read_to_string(&file).expect("commit file");
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|action| action["commitInfo"]["timestamp"].as_i64())
        .expect("commitInfo timestamp")
}

/// Updates of `conids` on the days around the stream's (2025-11-25): the day before
/// (one of them under another symbol) and the day after, so the history spans three
/// event days and a book reaches back across days.
fn other_days(conids: &[i64]) -> Vec<Msg> {
    let mut messages = Vec::new();
    for (i, conid) in conids.iter().enumerate() {
        let symbol = if i % 5 == 0 { "HIST".to_string() } else { format!("H{conid}") };
        messages.push(update_json(*conid, &symbol, i as f64, &format!("2025-11-24T23:59:{:02}.5Z", i % 60)));
        if i % 2 == 0 {
            messages.push(update_json(*conid, &symbol, -(i as f64), &format!("2025-11-26T00:00:{:02}Z", i % 60)));
        }
    }
    messages
}

/// The books the README's Spark SQL and polars queries give for 2025-11-25 at `at`
/// (`HH:MM:SS`, UTC) on the history table at `path`.
fn readme_books(path: &str, at: &str) -> Vec<(String, Book)> {
    let cache = std::env::var("POSITION_SINK_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/position-sink", std::env::var("HOME").unwrap_or_default()));
    let jars = std::env::var("POSITION_SINK_SPARK_JARS").unwrap_or_else(|_| format!("{cache}/spark-delta-4.0.1/jars"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/readers/history_book.py");
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let output = std::process::Command::new(python())
        .args([script, readme, path, at])
        .env("POSITION_SINK_SPARK_JARS", jars)
        .env("SPARK_LOCAL_IP", "127.0.0.1")
        .env("PYSPARK_PYTHON", python())
        .output()
        .expect("run Spark and polars");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the README's queries failed on {path}: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr).lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(reader, _)| ["spark", "polars"].contains(reader))
        .map(|(reader, rows)| {
            let rows: Vec<(i64, i32, i64)> = serde_json::from_str(rows).expect("rows as JSON");
            (reader.to_string(), rows.into_iter().map(|(c, p, o)| (c, (p, o))).collect())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_holds_every_valid_update_once_and_answers_the_book_of_any_past_time() {
    let mut s = Scenario::new("history", 4).await;
    s.produce(sized(3000, 30_000)).await;
    let conids: Vec<i64> = model(&s.produced).values().map(|r| r.conid).take(60).collect();
    let produced = produce_on(&s.brokers, &s.topic, &other_days(&conids), None).await;
    s.produced.extend(produced);
    let config = history_config(&s);
    let config_file = write_config_file(s.dir.path(), &config);

    // 1. A crash right after the positions table's commit, before the history's: the
    // next worker appends those updates with the stamp of that commit. Then one right
    // after the history's commit, before the Kafka commit.
    let crash = CrashPoints { crash_after_delta_commits: Some(1), ..Default::default() };
    let crashed = run_crashing(config.clone(), crash).await;
    assert!(
        matches!(crashed, Err(WorkerError::Flush(FlushError::InjectedCrash(_)))),
        "the injected crash stops the worker: {crashed:?}"
    );
    assert!(!read_table(&s.table).await.is_empty(), "the crash landed after the positions table's commit");
    assert!(history_coordinates(&history_uri(&s)).await.is_empty(), "and before the history's");
    let crash = CrashPoints { crash_after_history_commits: Some(1), ..Default::default() };
    let crashed = run_crashing(config.clone(), crash).await;
    assert!(matches!(crashed, Err(WorkerError::Flush(FlushError::InjectedCrash(_)))), "{crashed:?}");
    assert!(
        !history_coordinates(&history_uri(&s)).await.is_empty(),
        "the second crash landed after the history's commit"
    );

    // 2. SIGKILLs at random moments and inside flushes, and aborts between the Delta
    // and Kafka commits, while messages keep coming; a second worker in the group
    // takes the partitions over at each kill and gives half back at each start.
    let companion = spawn_worker(config.clone());
    // Messages keep coming in the background, so a process that joins after the
    // second worker drained a round's messages still has a flush to make.
    let producing = s.produce_during(sized(1200, 6000), 60, Duration::from_secs(sized(60, 240) as u64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let rounds = sized(6, 18);
    let mut landed = 0;
    for round in 0..rounds {
        s.produce(sized(300, 1000)).await;
        let abort = round % 3 == 2;
        let env: Vec<(&str, String)> =
            if abort { vec![("POSITION_SINK_FAULT_ABORT_AFTER_DELTA_COMMIT", "1".to_string())] } else { vec![] };
        let file = config_file.display().to_string();
        let (mut child, writing) = spawn_binary(
            &["run", "--config", &file],
            &env,
            "warn,position_sink=info,position_sink::worker::flush=debug",
            "writing batch",
        );
        let hit = if abort {
            let deadline = Instant::now() + Duration::from_secs(180);
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    use std::os::unix::process::ExitStatusExt;
                    break status.signal() == Some(6);
                }
                if Instant::now() > deadline {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            let seen = tokio::task::spawn_blocking(move || writing.recv_timeout(Duration::from_secs(180)).is_ok())
                .await
                .expect("join");
            let pause = if round % 3 == 0 { rng.random_range(0..2000) } else { rng.random_range(0..150) };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            seen && child.try_wait().expect("wait").is_none()
        };
        let _ = child.kill();
        child.wait().expect("reap");
        landed += usize::from(hit);
    }
    assert_eq!(landed, rounds, "every kill hit a running worker at its moment");
    companion.stop().await.expect("the second worker stops cleanly");
    s.produced.extend(producing.finish().await);

    // 3. A forced replay of everything, over messages no worker has read yet.
    s.produce(sized(500, 2000)).await;
    let file = config_file.display().to_string();
    let (code, out, err) = run_cli(&["replay", "--from", "earliest", "--force", "--config", &file]);
    assert_eq!(code, 0, "replay: {out}{err}");

    // 4. A clean worker drains the rest; the positions table equals the model.
    s.produce(sized(300, 1000)).await;
    run_to_end(config.clone()).await.expect("the draining worker succeeds");
    s.check().await;

    // The history holds each valid message exactly once.
    let mut expected: Vec<(i32, i64)> =
        s.produced.iter().filter(|m| m.rejection.is_none()).map(|m| (m.partition, m.offset)).collect();
    expected.sort_unstable();
    let found = history_coordinates(&history_uri(&s)).await;
    let doubled = found.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(doubled, 0, "updates held twice in the history");
    assert_eq!(found.len(), expected.len(), "history rows against valid messages");
    assert!(found == expected, "the history holds other updates than the valid messages");

    // The book as of 20 event times equals the model of the stream.
    let mut times: Vec<i64> = s.produced.iter().filter(|m| m.rejection.is_none()).map(event_micros).collect();
    times.sort_unstable();
    let mut picks: Vec<i64> = (0..18).map(|_| times[rng.random_range(0..times.len())]).collect();
    picks.extend([times[0] - 1, *times.last().expect("times")]);
    for t in &picks {
        assert!(book(&history_uri(&s), AsOf::Event(*t)).await == model_as_of(&s.produced, *t), "book as of {t}");
    }

    // The book as known at 20 commit times equals the positions table at that version.
    let latest = table_version(&s.table).await;
    for _ in 0..20 {
        let version = rng.random_range(1..=latest);
        let at = commit_millis(&s.table, version) * 1000;
        let table: Book = read_version(&s.table, version)
            .await
            .into_values()
            .map(|r| (r.conid, (r.kafka_partition, r.kafka_offset)))
            .collect();
        assert!(book(&history_uri(&s), AsOf::Known(at)).await == table, "book as known at version {version}");
    }

    // The commands: show --as-of (JSON and CSV), show --as-known-at, reconcile --as-of.
    let t = picks[3];
    let t_as_of = t;
    let when = chrono::DateTime::from_timestamp_micros(t).expect("time").to_rfc3339();
    let (code, out, err) =
        run_cli(&["show", "--as-of", &when, "--limit", "1000000", "--format", "json", "--config", &file]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON rows");
    let shown: Book = shown
        .iter()
        .map(|r| {
            (
                r["conid"].as_i64().expect("conid"),
                (r["kafka_partition"].as_i64().expect("p") as i32, r["kafka_offset"].as_i64().expect("o")),
            )
        })
        .collect();
    assert!(shown == model_as_of(&s.produced, t), "show --as-of {when}");
    let known = chrono::DateTime::from_timestamp_millis(commit_millis(&s.table, latest)).expect("time").to_rfc3339();
    let (code, out, err) =
        run_cli(&["show", "--as-known-at", &known, "--limit", "1000000", "--format", "csv", "--config", &file]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("conid,symbol,position,timestamp,"), "{out}");
    assert_eq!(out.lines().count() - 1, read_table(&s.table).await.len(), "show --as-known-at the latest commit");

    let snapshot = s.dir.path().join("broker.jsonl");
    let positions: BTreeMap<i64, f64> = {
        let before: Vec<Produced> =
            s.produced.iter().filter(|m| m.rejection.is_none() && event_micros(m) <= t).cloned().collect();
        model(&before).into_values().map(|r| (r.conid, r.position)).collect()
    };
    let lines: Vec<String> = positions
        .iter()
        .map(|(conid, position)| serde_json::json!({"conid": conid, "position": position}).to_string())
        .collect();
    std::fs::write(&snapshot, lines.join("\n")).expect("snapshot");
    let snapshot = snapshot.display().to_string();
    let args = ["reconcile", "--snapshot", &snapshot, "--as-of", &when, "--stale-after", "30d", "--config", &file];
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "the broker's snapshot of {when} matches the book of then: {out}{err}");
    // Spark and polars run the README's as-of queries: the same book.
    let at = "08:00:03";
    let t = chrono::DateTime::parse_from_rfc3339(&format!("2025-11-25T{at}Z")).expect("time").timestamp_micros();
    let expected = model_as_of(&s.produced, t);
    assert!(expected.len() > 50, "the book of {at} holds most keys: {}", expected.len());
    let books = readme_books(&history_uri(&s), at);
    assert_eq!(books.len(), 2, "Spark and polars both answered");
    for (reader, book) in books {
        assert!(book == expected, "{reader} running the README's query gives another book than the model");
    }
    // Kafka lost, the positions table lost: rebuilt from the history, in the other write
    // mode and layout beside it, and in place, where a worker then resumes exactly.
    let beside = s.dir.path().join("rebuilt").display().to_string();
    let mut other = config.clone();
    other.delta.write_mode = position_sink::config::WriteMode::DeletionVectors;
    other.delta.partition_by = position_sink::config::PartitionBy::None;
    other.flush.max_records = 37;
    let other_file = s.dir.path().join("other");
    std::fs::create_dir_all(&other_file).expect("dir");
    let other_file = write_config_file(&other_file, &other).display().to_string();
    let (code, out, err) = run_cli(&["rebuild", "--from-history", "--into", &beside, "--config", &other_file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("recorded"), "{out}");
    let rebuilt: Book = read_table(std::path::Path::new(&beside))
        .await
        .into_values()
        .map(|r| (r.conid, (r.kafka_partition, r.kafka_offset)))
        .collect();
    let everything = model_as_of(&s.produced, i64::MAX);
    assert!(rebuilt == everything, "the rebuilt table (deletion vectors, no partitions, 37 rows a commit)");
    let (code, out, err) = run_cli(&["rebuild", "--from-history", "--into", &beside, "--config", &other_file]);
    assert_eq!(code, 2, "a second rebuild over rows is refused: {out}{err}");
    assert!(err.contains("holds rows"), "{err}");
    let past = s.dir.path().join("past").display().to_string();
    let (code, out, err) =
        run_cli(&["rebuild", "--from-history", "--as-of", &when, "--into", &past, "--config", &file]);
    assert_eq!(code, 0, "{out}{err}");
    let past_book: Book = read_table(std::path::Path::new(&past))
        .await
        .into_values()
        .map(|r| (r.conid, (r.kafka_partition, r.kafka_offset)))
        .collect();
    assert!(past_book == model_as_of(&s.produced, t_as_of), "the table rebuilt as of {when}");

    std::fs::remove_dir_all(&s.table).expect("the positions table is lost");
    let (code, out, err) = run_cli(&["rebuild", "--from-history", "--config", &file]);
    assert_eq!(code, 0, "{out}{err}");
    s.produce(sized(300, 1000)).await;
    run_to_end(config.clone()).await.expect("a worker resumes on the rebuilt table");
    s.check().await;
    let mut expected: Vec<(i32, i64)> =
        s.produced.iter().filter(|m| m.rejection.is_none()).map(|m| (m.partition, m.offset)).collect();
    expected.sort_unstable();
    assert!(history_coordinates(&history_uri(&s)).await == expected, "the history after the rebuild, once each");
    let (code, out, err) = run_cli(&["inspect", "--format", "json", "--config", &file]);
    assert_eq!(code, 0, "{err}");
    let inspection: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
    assert_eq!(inspection["history"]["rows"].as_u64(), Some(expected.len() as u64), "inspect counts the history");
    assert_eq!(inspection["history"]["days"].as_u64(), Some(3), "three event days");

    // Maintenance: each day's files binned into one sorted by conid, timestamp; then
    // the days before the last `keep_days` removed.
    let (code, out, err) = run_cli(&["maintain", "--config", &file]);
    assert_eq!(code, 0, "{out}{err}");
    let files = history_files(&history_uri(&s)).await;
    assert_eq!(files.len(), 3, "one file per event day after binning: {files:?}");
    assert!(history_coordinates(&history_uri(&s)).await == expected, "binning keeps every update once");
    for path in &files {
        let sorted = sorted_by_conid_and_time(&format!("{}/{path}", history_uri(&s)));
        assert!(sorted, "{path} is sorted by conid, timestamp");
    }
    let today = chrono::Utc::now().date_naive();
    let first_kept = chrono::NaiveDate::from_ymd_opt(2025, 11, 25).expect("date");
    let mut keeping = config.clone();
    keeping.history.keep_days = u32::try_from((today - first_kept).num_days() + 1).expect("days");
    let keeping_dir = s.dir.path().join("keeping");
    std::fs::create_dir_all(&keeping_dir).expect("dir");
    let keeping_file = write_config_file(&keeping_dir, &keeping).display().to_string();
    let (code, out, err) = run_cli(&["maintain", "--config", &keeping_file]);
    assert_eq!(code, 0, "{out}{err}");
    let day_before = chrono::DateTime::parse_from_rfc3339("2025-11-25T00:00:00Z").expect("time").timestamp_micros();
    let kept: Vec<(i32, i64)> = expected
        .iter()
        .copied()
        .filter(|(p, o)| {
            let m = s.produced.iter().find(|m| m.partition == *p && m.offset == *o).expect("produced");
            event_micros(m) >= day_before
        })
        .collect();
    assert!(kept.len() < expected.len(), "the stream has updates of 2025-11-24");
    assert!(history_coordinates(&history_uri(&s)).await == kept, "keep_days removed the day before, only it");

    eprintln!(
        "history: {} updates held once over {} commits of the positions table; 20 books by event time and 20 as known \
         at a commit equal the model",
        found.len(),
        latest
    );
}
