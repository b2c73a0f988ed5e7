//! Proof of delivery under faults. Every scenario drives workers through its faults
//! and ends with the checker of `tests/common/scenario.rs`: the table equals the model
//! of the stream row by row, the dead letters are exactly the bad messages, and the
//! committed offsets are at the log ends. Sizes scale up with
//! `POSITION_SINK_FAULT_SCALE=full` (`scripts/faults.sh`).

mod common;

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::faulty_store::faulty_table;
use common::scenario::{Scenario, sized};
use common::*;
use position_sink::WorkerError;
use position_sink::config::WriteMode;
use position_sink::faults::CrashPoints;
use position_sink::status::Progress;
use rand::{Rng, SeedableRng};

/// The fault-test broker for outages: its own, so stopping it disturbs no other test.
const OUTAGE_BROKER_PORT: u16 = 39192;

fn seeded_rng(what: &str) -> rand::rngs::StdRng {
    let seed: u64 = rand::random();
    eprintln!("{what}: schedule seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// How long a restarted worker may take to reach its first flush: it waits out the
/// killed member's session, reads the table's offsets and builds its key index from
/// every data file, in a debug build, on a loaded machine.
const FIRST_FLUSH_WITHIN: Duration = Duration::from_secs(180);

/// How a kill-loop round ends the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kill {
    /// SIGKILL at a random moment.
    Random,
    /// SIGKILL shortly after a flush starts writing: inside the MERGE or its commit.
    DuringMerge,
    /// The process aborts itself right after a Delta commit, before the Kafka commit.
    BetweenCommits,
}

struct Running {
    child: Child,
    writing: std::sync::mpsc::Receiver<()>,
}

fn start_binary(config_file: &std::path::Path, abort_probability: Option<f64>) -> Running {
    let file = config_file.display().to_string();
    let env: Vec<(&str, String)> = abort_probability
        .map(|p| ("POSITION_SINK_FAULT_ABORT_AFTER_DELTA_COMMIT", p.to_string()))
        .into_iter()
        .collect();
    let (child, writing) = spawn_binary(
        &["run", "--config", &file],
        &env,
        "warn,position_sink=info,position_sink::worker::flush=debug,buoyant_kernel::snapshot::builder=off",
        "writing batch",
    );
    Running { child, writing }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loop_sigkill_during_merge_and_between_commits_loses_and_doubles_nothing() {
    kill_loop("killloop", WriteMode::CopyOnWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_loop_in_deletion_vector_mode_loses_and_doubles_nothing() {
    kill_loop("killloopdv", WriteMode::DeletionVectors).await;
}

async fn kill_loop(name: &'static str, mode: WriteMode) {
    let mut s = Scenario::new(name, 4).await;
    s.write_mode = mode;
    let total = sized(40_000, 200_000);
    let kills = sized(9, 24);
    s.produce(total / 2).await;
    let producing = s.produce_during(total - total / 2, 10, Duration::from_secs(sized(20, 90) as u64));
    let mut config = s.config();
    config.flush.interval = Duration::from_millis(300);
    config.flush.max_records = 3000;
    let config_file = write_config_file(s.dir.path(), &config);
    let mut rng = seeded_rng("kill loop");
    let mut done: std::collections::BTreeMap<Kill, usize> = Default::default();
    for round in 0..kills {
        let kill = [Kill::Random, Kill::DuringMerge, Kill::BetweenCommits][round % 3];
        // New messages every round, so every restarted process has a flush to make.
        s.produce(sized(300, 1000)).await;
        let mut running = start_binary(&config_file, (kill == Kill::BetweenCommits).then_some(1.0));
        let landed = match kill {
            Kill::Random => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..4000))).await;
                running.child.try_wait().expect("wait").is_none()
            }
            Kill::DuringMerge => {
                let writing = running.writing;
                let seen = tokio::task::spawn_blocking(move || writing.recv_timeout(FIRST_FLUSH_WITHIN).is_ok())
                    .await
                    .expect("join");
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
                seen && running.child.try_wait().expect("wait").is_none()
            }
            Kill::BetweenCommits => {
                // The process aborts itself at its first Delta commit.
                let deadline = Instant::now() + FIRST_FLUSH_WITHIN;
                loop {
                    if let Some(status) = running.child.try_wait().expect("wait") {
                        use std::os::unix::process::ExitStatusExt;
                        if status.signal() != Some(6) {
                            eprintln!("round {round}: the worker ended with {status} instead of aborting");
                        }
                        break status.signal() == Some(6);
                    }
                    if Instant::now() > deadline {
                        eprintln!("round {round}: no Delta commit within {FIRST_FLUSH_WITHIN:?}");
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let _ = running.child.kill();
        running.child.wait().expect("reap");
        assert!(landed, "round {round}: the {kill:?} kill did not hit a running process at its moment");
        *done.entry(kill).or_default() += 1;
    }
    s.produced.extend(producing.finish().await);
    eprintln!("kill loop: {kills} rounds on {} messages: {done:?}", s.produced.len());
    s.finish().await;

    // A person reviews what was rejected.
    let file = config_file.display().to_string();
    let (code, text, stderr) =
        run_cli(&["dead-letters", "list", "--limit", "5", "--category", "missing_field", "--config", &file]);
    assert_eq!(code, 0, "{text}{stderr}");
    assert!(text.contains("reason: missing required field \"symbol\""), "{text}");
    assert!(text.contains("5 dead letters shown (missing_field=5)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_storm_of_workers_joining_leaving_and_crashing_keeps_the_table_exact() {
    let mut s = Scenario::new("storm", 6).await;
    let total = sized(30_000, 200_000);
    let storm = Duration::from_secs(sized(20, 90) as u64);
    s.produce(total / 3).await;
    let producing = s.produce_during(total - total / 3, 10, storm);
    let config = || {
        let mut c = s.config();
        c.flush.max_records = 2000;
        c.retry.max_retries = 30;
        c
    };
    let mut workers: Vec<Worker> = (0..3).map(|_| spawn_worker(config())).collect();
    let mut progress: Vec<Arc<Progress>> = workers.iter().map(|w| w.progress.clone()).collect();
    let mut rng = seeded_rng("rebalance storm");
    let (mut joined, mut left, mut crashed) = (3, 0, 0);
    let deadline = Instant::now() + storm;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        // The first two departures are a crash and a clean leave; then chance decides.
        let must_leave = left + crashed < 2;
        if workers.len() > 1 && (workers.len() == 3 || must_leave || rng.random_bool(0.5)) {
            let w = workers.swap_remove(rng.random_range(0..workers.len()));
            let crash = if must_leave { crashed == 0 } else { rng.random_bool(0.5) };
            if crash {
                w.handle.abort();
                let ended = w.handle.await;
                assert!(
                    ended.as_ref().is_err_and(|e| e.is_cancelled()),
                    "the crashed worker was not running: {ended:?}"
                );
                crashed += 1;
            } else {
                w.stop().await.expect("a worker leaving the group stops cleanly");
                left += 1;
            }
        } else {
            let w = spawn_worker(config());
            progress.push(w.progress.clone());
            workers.push(w);
            joined += 1;
        }
    }
    s.produced.extend(producing.finish().await);
    for w in workers {
        w.stop().await.expect("worker");
    }
    let conflicts: u64 = progress.iter().map(|p| Progress::get(&p.commit_conflicts)).sum();
    let failures: u64 = progress.iter().map(|p| Progress::get(&p.write_failures)).sum();
    eprintln!(
        "rebalance storm: {joined} joined, {left} left, {crashed} crashed; {conflicts} Delta commit conflicts \
         retried ({failures} failed write attempts in all)"
    );
    assert!(crashed > 0 && left > 0, "the storm had no crash or no clean leave");
    let read: u64 = progress.iter().map(|p| Progress::get(&p.messages)).sum();
    assert!(read > 0, "no worker read anything during the storm");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_is_waited_out_reported_not_ready_and_recovered_from() {
    kafka_script(&["ensure", &OUTAGE_BROKER_PORT.to_string()]);
    let mut s = Scenario::on(&format!("127.0.0.1:{OUTAGE_BROKER_PORT}"), "outage", 3).await;
    s.produce(sized(6000, 60_000)).await;
    let w = spawn_worker(s.config());
    let progress = w.progress.clone();
    wait_until(Duration::from_secs(60), "a first commit", async || Progress::get(&progress.delta_commits) > 0).await;
    assert!(progress.readiness().ok, "{:?}", progress.readiness());
    let (status, body) = http_get(&progress, "/readyz");
    assert_eq!(status, 200, "/readyz before the outage: {body}");

    kafka_script(&["crash", &OUTAGE_BROKER_PORT.to_string()]);
    wait_until(Duration::from_secs(30), "the worker to report the broker unreachable", async || {
        !progress.health.is_broker_reachable()
    })
    .await;
    assert!(!progress.readiness().ok);
    let (status, body) = http_get(&progress, "/readyz");
    assert!(
        status == 503 && body.contains("no Kafka broker is reachable"),
        "/readyz during the outage: {status} {body}"
    );
    assert_eq!(http_get(&progress, "/healthz").0, 200, "the process is alive during the outage");
    tokio::time::sleep(Duration::from_secs(sized(6, 30) as u64)).await;
    assert!(!w.handle.is_finished(), "the worker gave up during the outage");
    assert_eq!(progress.readiness().reason, "no Kafka broker is reachable");

    kafka_script(&["resume", &OUTAGE_BROKER_PORT.to_string()]);
    wait_until(Duration::from_secs(60), "the worker to report ready again", async || progress.readiness().ok).await;
    let (status, body) = http_get(&progress, "/readyz");
    assert_eq!(status, 200, "/readyz after the outage: {body}");
    s.produce(sized(3000, 30_000)).await;
    wait_until(Duration::from_secs(120), "offsets committed to the end", async || s.is_committed_to_end()).await;
    w.stop().await.expect("the worker ran through the outage");
    s.check().await;
    kafka_script(&["stop", &OUTAGE_BROKER_PORT.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_and_a_downed_broker_in_the_mock_cluster_are_survived() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let mock = MockCluster::new(1).expect("mock cluster");
    let brokers = mock.bootstrap_servers();
    // The mock keeps at most 5 MiB per partition and drops older messages, like
    // retention would: partitions enough to keep the whole stream.
    let partitions = sized(2, 12) as i32;
    let topic = unique("mock");
    mock.create_topic(&topic, partitions, 1).expect("mock topic");
    let mut s = Scenario::with_topic(&brokers, "mock", topic, partitions);
    s.produce(sized(4000, 40_000)).await;
    // Every request kind the worker depends on fails a few times first.
    use RDKafkaRespErr::*;
    mock.request_errors(RDKafkaApiKey::JoinGroup, &[RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 3]);
    mock.request_errors(RDKafkaApiKey::Fetch, &[RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5]);
    mock.request_errors(RDKafkaApiKey::OffsetCommit, &[RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 5]);
    let w = spawn_worker(s.config());
    let progress = w.progress.clone();
    wait_until(Duration::from_secs(60), "a first commit", async || Progress::get(&progress.delta_commits) > 0).await;

    mock.broker_down(1).expect("broker down");
    wait_until(Duration::from_secs(30), "the worker to report the broker unreachable", async || {
        !progress.health.is_broker_reachable()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    mock.broker_up(1).expect("broker up");
    wait_until(Duration::from_secs(60), "ready again", async || progress.readiness().ok).await;
    mock.request_errors(RDKafkaApiKey::OffsetCommit, &[RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 3]);
    s.produce(sized(2000, 20_000)).await;
    wait_until(Duration::from_secs(120), "offsets committed to the end", async || s.is_committed_to_end()).await;
    w.stop().await.expect("worker");
    s.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_mid_flush_commit_no_offsets_pause_reading_and_heal() {
    let mut s = Scenario::new("storage", 3).await;
    let (uri, faults) = faulty_table(&s.table);
    s.table_uri = uri;
    s.produce(sized(8000, 40_000)).await;
    let mut config = s.config();
    // Fewer than the stream's keys: a buffer holding this many rows is full and reading
    // stops while the flush before it retries.
    config.flush.max_records = 100;
    config.retry.max_retries = 1000;
    config.retry.max_delay = Duration::from_millis(300);
    let w = spawn_worker(config);
    let progress = w.progress.clone();
    wait_until(Duration::from_secs(60), "a first commit", async || Progress::get(&progress.delta_commits) > 0).await;

    // Data files are written but their commits fail (a full disk after the data), then
    // nothing can be written at all.
    for (fault, what) in [(&faults.fail_commits, "commits fail"), (&faults.fail_writes, "every write fails")] {
        fault.store(true, Ordering::SeqCst);
        wait_until(Duration::from_secs(30), "storage reported failing", async || !progress.health.is_storage_ok())
            .await;
        assert!(!progress.readiness().ok);
        let (version, committed) = (table_version(&s.table).await, s.committed());
        wait_until(Duration::from_secs(30), "reading paused behind the failing flush", async || {
            progress.reading_paused.load(Ordering::Relaxed) == 1
        })
        .await;
        // The window: three more failed attempts of the flush that holds the buffer.
        let (consumed, failures) = (w.messages(), Progress::get(&progress.write_failures));
        wait_until(Duration::from_secs(30), "three more failed write attempts", async || {
            Progress::get(&progress.write_failures) >= failures + 3
        })
        .await;
        assert_eq!(w.messages(), consumed, "{what}: reading did not pause with a full buffer");
        assert_eq!(table_version(&s.table).await, version, "{what}: a commit landed");
        assert_eq!(s.committed(), committed, "{what}: offsets were committed");
        // A reader meanwhile sees a consistent table (no duplicate rows, no partial commit).
        assert_one_row_per_key(&s.table).await;
        fault.store(false, Ordering::SeqCst);
        wait_until(Duration::from_secs(60), "storage healthy again", async || progress.health.is_storage_ok()).await;
    }
    s.produce(sized(2000, 10_000)).await;
    let drain = Duration::from_secs(sized(120, 900) as u64);
    wait_until(drain, "offsets committed to the end", async || s.is_committed_to_end()).await;
    w.stop().await.expect("the worker ran through the storage faults");
    // Failed commits of either table (dead letters are written first in each flush).
    let dead_letter_table = std::path::PathBuf::from(format!("{}_dead_letters", s.table.display()));
    let orphans: usize =
        [&s.table, &dead_letter_table].iter().map(|t| data_files_on_disk(t) - data_files_ever_committed(t)).sum();
    eprintln!(
        "storage faults: {} writes refused, {} failed write attempts retried, {orphans} data files of failed commits left unreferenced",
        faults.refused.load(Ordering::SeqCst),
        Progress::get(&progress.write_failures)
    );
    assert!(orphans > 0, "no data file was written by a failed commit: the fault hit nothing");
    s.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_that_lost_its_partitions_never_overwrites_the_new_owner() {
    let mut s = Scenario::new("zombie", 2).await;
    s.produce(3000).await;
    let stall = Arc::new(tokio::sync::Notify::new());
    let mut stalled = s.config();
    stalled.flush.interval = Duration::from_secs(1);
    stalled.kafka.librdkafka.0.insert("max.poll.interval.ms".into(), "6000".into());
    let a = spawn_worker_with(stalled, CrashPoints { hold_first_flush: Some(stall.clone()), ..Default::default() });
    wait_until(Duration::from_secs(60), "A buffered messages", async || a.messages() > 0).await;
    // A stops polling at its first flush; past max.poll.interval.ms it loses its partitions.
    let b = spawn_worker(s.config());
    // Newer updates of instruments A holds stale ones for: B writes them.
    let newer: Vec<Msg> = s
        .produced
        .iter()
        .filter(|m| m.rejection.is_none())
        .take(50)
        .filter_map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.value.as_deref()?).ok()?;
            Some(update_json(v["conid"].as_i64()?, v["symbol"].as_str()?, -1.0, "2030-01-01T00:00:00Z"))
        })
        .collect();
    s.produced.extend(produce(&s.topic, &newer, None).await);
    wait_until(Duration::from_secs(90), "B committed everything", async || s.is_committed_to_end()).await;
    let version = table_version(&s.table).await;
    let before = read_table(&s.table).await;

    // A wakes up and flushes its stale buffer.
    stall.notify_one();
    wait_until(Duration::from_secs(30), "A flushed its stale buffer", async || Progress::get(&a.progress.flushes) > 0)
        .await;
    assert_eq!(Progress::get(&a.progress.delta_commits), 0, "the zombie committed to the table");
    assert_eq!(table_version(&s.table).await, version, "the zombie changed the table");
    assert_eq!(read_table(&s.table).await, before);
    a.stop().await.expect("worker A");
    b.stop().await.expect("worker B");
    s.finish().await;
    let rows = read_table(&s.table).await;
    assert!(newer.iter().all(|m| {
        let v: serde_json::Value = serde_json::from_slice(m.value.as_deref().unwrap_or_default()).unwrap();
        rows[&(v["symbol"].as_str().unwrap().to_string(), v["conid"].as_i64().unwrap())].position == -1.0
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_storage_is_kept_up_with_by_larger_batches_within_the_memory_bound() {
    let mut s = Scenario::new("slow", 4).await;
    let (uri, faults) = faulty_table(&s.table);
    s.table_uri = uri;
    let total = sized(8_000, 30_000);
    s.produce(total).await;
    let mut config = s.config();
    config.flush.interval = Duration::from_millis(200);
    config.flush.max_records = 100_000;
    config.flush.max_bytes = 512 * 1024;
    faults.commit_delay_ms.store(1000, Ordering::SeqCst);
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    config.worker.exit_when_caught_up = true;
    let summary =
        position_sink::run_with_progress(config.clone(), Default::default(), progress.clone()).await.expect("worker");
    let elapsed = started.elapsed();
    let peak = Progress::get(&progress.buffered_bytes_peak);
    let per_commit = summary.messages as f64 / summary.delta_commits.max(1) as f64;
    eprintln!(
        "slow storage: {} messages in {:.1} s with 1 s per commit: {} commits, {per_commit:.0} messages per commit \
         (flush.interval 200 ms); buffer peak {peak} bytes of {} allowed",
        summary.messages,
        elapsed.as_secs_f64(),
        summary.delta_commits,
        config.flush.max_bytes
    );
    // Commits follow the storage, not the 200 ms window: one flush at a time, each
    // taking what arrived meanwhile.
    assert!((summary.delta_commits as f64) <= elapsed.as_secs_f64() + 2.0, "flushes queued up");
    assert!(per_commit > 200.0, "batches did not grow");
    assert!(peak <= (config.flush.max_bytes + config.decode.max_message_bytes) as u64, "buffer exceeded its bound");
    faults.heal();
    s.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_flush_is_retrying_exits_in_bounded_time_without_committing() {
    let mut s = Scenario::new("termretry", 2).await;
    let (uri, faults) = faulty_table(&s.table);
    s.table_uri = uri;
    s.produce(1000).await;
    let mut config = s.config();
    config.retry.max_retries = 1000;
    config.worker.shutdown_timeout = Duration::from_secs(3);
    let w = spawn_worker(config);
    let progress = w.progress.clone();
    wait_until(Duration::from_secs(60), "a first commit", async || s.is_committed_to_end()).await;
    faults.fail_writes.store(true, Ordering::SeqCst);
    let committed = s.committed();
    s.produce(1000).await;
    wait_until(Duration::from_secs(60), "a write failing and being retried", async || {
        Progress::get(&progress.write_failures) > 2
    })
    .await;
    let asked = Instant::now();
    let result = w.stop().await;
    let took = asked.elapsed();
    assert!(matches!(result, Err(WorkerError::ShutdownTimedOut(_))), "{result:?}");
    assert!(took < Duration::from_secs(6), "shutdown took {took:?} with a 3 s timeout");
    assert_eq!(s.committed(), committed, "offsets were committed for unwritten messages");
    faults.heal();
    s.finish().await;
}

/// Parquet files under the table directory.
fn data_files_on_disk(table: &std::path::Path) -> usize {
    fn walk(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| {
                        let path = e.path();
                        if path.is_dir() {
                            walk(&path)
                        } else {
                            usize::from(path.extension().is_some_and(|x| x == "parquet"))
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(table)
}

/// Data files any commit of the table added (the latest version, and those later
/// rewritten by a MERGE but kept for time travel).
fn data_files_ever_committed(table: &std::path::Path) -> usize {
    let mut added = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(table.join("_delta_log")).expect("log") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|x| x == "json") {
            for line in std::fs::read_to_string(&path).expect("commit").lines() {
                let action: serde_json::Value = serde_json::from_str(line).expect("action");
                if let Some(file) = action["add"]["path"].as_str() {
                    added.insert(file.rsplit('/').next().unwrap_or(file).to_string());
                }
            }
        }
    }
    added.len()
}

/// A small tmpfs mounted for one test, unmounted when dropped (also when it fails).
struct SmallDisk {
    mount_point: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `megabytes` at `mount_point` (root, or CAP_SYS_ADMIN, needed).
    fn mount(mount_point: &std::path::Path, megabytes: u32) -> Self {
        std::fs::create_dir_all(mount_point).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(mount_point)
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot mount a tmpfs at {}: the disk-full test needs root", mount_point.display());
        Self { mount_point: mount_point.to_path_buf() }
    }

    /// Fills the disk with a file until writes fail with "no space left".
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.mount_point.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount_point).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_really_full_disk_mid_ingest_is_waited_out_and_nothing_partial_is_visible() {
    let mut s = Scenario::new("diskfull", 2).await;
    let disk = SmallDisk::mount(&s.dir.path().join("disk"), sized(16, 256) as u32);
    s.table = disk.mount_point.join("positions");
    s.table_uri = s.table.display().to_string();
    s.produce(sized(6000, 30_000)).await;
    let mut config = s.config();
    config.flush.max_records = sized(500, 3000);
    config.retry.max_retries = 1000;
    config.retry.max_delay = Duration::from_millis(300);
    let w = spawn_worker(config);
    let progress = w.progress.clone();
    wait_until(Duration::from_secs(60), "a first commit", async || Progress::get(&progress.delta_commits) > 0).await;

    let filler = disk.fill();
    s.produce(sized(2000, 10_000)).await;
    wait_until(Duration::from_secs(60), "writes failing on the full disk", async || !progress.health.is_storage_ok())
        .await;
    let (version, committed) = (table_version(&s.table).await, s.committed());
    // The window: three more failed attempts to write on the full disk.
    let failures = Progress::get(&progress.write_failures);
    wait_until(Duration::from_secs(30), "three more failed write attempts", async || {
        Progress::get(&progress.write_failures) >= failures + 3
    })
    .await;
    assert_eq!(table_version(&s.table).await, version, "a commit landed on a full disk");
    assert_eq!(s.committed(), committed, "offsets were committed while the disk was full");
    assert!(!w.handle.is_finished(), "the worker gave up on a full disk");
    assert_one_row_per_key(&s.table).await;

    std::fs::remove_file(filler).expect("free the disk");
    let drain = Duration::from_secs(sized(120, 600) as u64);
    wait_until(drain, "offsets committed to the end", async || s.is_committed_to_end()).await;
    assert!(progress.health.is_storage_ok());
    w.stop().await.expect("the worker ran through the full disk");
    eprintln!("full disk: {} failed write attempts retried", Progress::get(&progress.write_failures));
    s.check().await;
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_batch_is_reported_read_again_and_stops_the_worker_at_its_offset_losing_nothing() {
    let topic = create_topic("corrupt-batch", 2).await;
    // Three produce rounds, each acknowledged before the next: each starts new batches.
    let mut produced = Vec::new();
    let mut rounds = Vec::new();
    for round in 0..3u64 {
        let messages = sample(200, 40, 90 + round);
        let sent = produce_with(&brokers(), &[("compression.type", "lz4")], &topic, &messages, None).await;
        rounds.push(sent.clone());
        produced.extend(sent);
    }
    let corrupt_at =
        rounds[1].iter().filter(|m| m.partition == 0).map(|m| m.offset).min().expect("round 2 in partition 0");
    let segment = segment_file(&topic, 0);
    let byte = byte_of_batch(&segment, corrupt_at);
    flip_byte(&segment, byte);

    let (_dir, table) = table_dir();
    let mut config = config(&topic, &unique("g"), &table);
    config.retry.min_delay = Duration::from_secs(1);
    config.retry.max_delay = Duration::from_secs(2);
    config.retry.max_retries = 2;
    let w = spawn_worker(config.clone());
    let progress = w.progress.clone();
    // The counter moves when the fault is seen; readiness names the batch once the
    // partitions were read one by one to find it (seconds later on a loaded machine).
    wait_until(Duration::from_secs(90), "the worker to report the batch", async || {
        Progress::get(&progress.unreadable_batches) > 0
            && !w.handle.is_finished()
            && http_get(&progress, "/readyz").1.contains(&format!("offset {corrupt_at}"))
    })
    .await;
    let (status, body) = http_get(&progress, "/readyz");
    assert!(status == 503 && body.contains(&format!("offset {corrupt_at}")) && body.contains("CRC"), "{status} {body}");
    let (_, metrics) = http_get(&progress, "/metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("position_sink_unreadable_batches_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    let stopped = tokio::time::timeout(Duration::from_secs(90), w.handle).await.expect("stops").expect("join");
    match &stopped {
        Err(WorkerError::UnreadableBatch { at, attempts }) => {
            assert_eq!((at.tp.partition.0, at.offset.0), (0, corrupt_at), "the batch is named");
            assert_eq!(*attempts, 3, "read once and again retry.max_retries times");
        }
        other => panic!("the worker did not stop for the corrupt batch: {other:?}"),
    }
    let message = stopped.unwrap_err().to_string();
    for part in [format!("partition {topic}[0]"), format!("offset {corrupt_at}"), "CRC".into(), "reset-offsets".into()]
    {
        assert!(message.contains(&part), "{part:?} missing from: {message}");
    }
    let committed = committed_offsets(&config.kafka.group_id, &topic, 2);
    assert!(committed[&0].unwrap_or(0) <= corrupt_at, "committed past the corrupt batch: {committed:?}");
    let written = read_table(&table).await;
    assert!(
        written.values().all(|row| row.kafka_partition != 0 || row.kafka_offset < corrupt_at),
        "a row from at or after the corrupt batch was written"
    );

    // The batch repaired, a restarted worker reads everything: nothing was lost.
    flip_byte(&segment, byte);
    run_to_end(config.clone()).await.expect("the restarted worker");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_eq!(committed_offsets(&config.kafka.group_id, &topic, 2), end_offsets(&produced, 2));
}
