//! The version-exact check against a real broker. Three workers of one group flush
//! every 200 ms with maintenance every second and retentions of seconds, while
//! `position-sink maintain` runs in a loop beside them, a reader reads the latest
//! version without pause, and processes die at random: by SIGKILL, and by aborts
//! injected inside checkpoint writing, log cleanup, vacuum's deletes and compaction.
//! Every version inside the file retention window is then read by time travel and
//! compared with the model of the stream at the offsets it records (this program's
//! reader and polars at every version, the latest ones also while the workers run;
//! Apache Spark at a sample), and the table restored to the oldest version of the
//! window is caught up exactly. Both write modes and layouts, on a local disk and on
//! the local S3 server behind Toxiproxy, which delays responses and cuts connections.
//!
//! `POSITION_SINK_FAULT_SCALE=full` runs each case for half an hour, with delays of
//! tens of seconds (`scripts/chaos.sh`); `POSITION_SINK_CHAOS_SECONDS` sets how long.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scenario::{Scenario, sized};
use common::toxiproxy::Proxy;
use common::versions::{
    LatestReader, Reader, Target, check_every_version, check_versions, check_with_spark, versions_in_window,
};
use common::*;
use position_sink::config::{Config, PartitionBy, Settings, WriteMode};
use rand::{Rng, SeedableRng};

/// `delta.deletedFileRetentionDuration` of these tables: how far back a reader may open.
/// On the slow store, where one commit may take seconds (tens of them at full scale),
/// half a minute (two minutes at full scale), so the window read at the end holds
/// several commits.
fn file_retention(storage: Storage) -> Duration {
    match storage {
        Storage::LocalDisk => Duration::from_secs(20),
        Storage::SlowS3(_) => Duration::from_secs(sized(30, 120) as u64),
    }
}

/// The abort probability at each marked point of maintenance, in workers and `maintain`.
const MAINTENANCE_ABORT: &str = "0.05";

/// How long each case runs: a minute, half an hour at full scale, or
/// `POSITION_SINK_CHAOS_SECONDS`.
fn run_seconds() -> usize {
    std::env::var("POSITION_SINK_CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(sized(60, 1800))
}

/// Where the table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    LocalDisk,
    /// The local S3 server behind a Toxiproxy proxy listening on this port.
    SlowS3(u16),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_in_the_window_reads_exactly_through_workers_maintenance_and_kills() {
    versions_stay_exact("versions", WriteMode::CopyOnWrite, PartitionBy::Symbol, Storage::LocalDisk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_in_the_window_reads_exactly_with_deletion_vectors_unpartitioned() {
    versions_stay_exact("versionsdv", WriteMode::DeletionVectors, PartitionBy::None, Storage::LocalDisk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_in_the_window_reads_exactly_on_slow_and_failing_object_storage() {
    versions_stay_exact(
        "versionss3",
        WriteMode::CopyOnWrite,
        PartitionBy::None,
        Storage::SlowS3(common::toxiproxy::proxy_port(1)),
    )
    .await;
}

/// What the run did, for its report.
#[derive(Debug, Default)]
struct Counts {
    kills: u64,
    injected_aborts: u64,
    restarts: u64,
    maintain_runs: u64,
    maintain_aborts: u64,
    failures: Vec<String>,
}

/// One case at a time: each runs three workers, `maintain` and readers on its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn versions_stay_exact(name: &'static str, mode: WriteMode, layout: PartitionBy, storage: Storage) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::new(name, 6).await;
    s.write_mode = mode;
    // The workers write through the proxy; the checks read the server directly.
    let (target, proxy) = match storage {
        Storage::LocalDisk => (Target::local(&s.table), None),
        Storage::SlowS3(port) => {
            s.table_uri = s3_table();
            let proxy = Proxy::to_s3(name, port);
            slow_down(&proxy);
            (Target { uri: s.table_uri.clone(), options: s3_options() }, Some(proxy))
        }
    };
    let mut config = s.config();
    if let Some(proxy) = &proxy {
        let mut options = s3_options();
        options.insert("AWS_ENDPOINT_URL".into(), proxy.endpoint.clone());
        config.delta.storage_options = Settings(options.into_iter().collect());
    }
    configure(&mut config, layout, storage);
    let config_file = write_config_file(s.dir.path(), &config);
    let file = config_file.display().to_string();

    s.produce(2000).await;
    // Through the slow store's faults (responses delayed by up to 25 s at full scale).
    let first_rows = match storage {
        Storage::LocalDisk => Duration::from_secs(120),
        Storage::SlowS3(_) => Duration::from_secs(sized(120, 900) as u64),
    };
    run_to_end_within(config.clone(), first_rows).await.expect("the table's first rows");
    let reader = LatestReader::start(&target, &s.dir.path().join("stop-reader"), Reader::Polars);
    let seconds = run_seconds();
    let run_for = Duration::from_secs(seconds as u64);
    let producing = s.produce_during(seconds * sized(500, 333), seconds, run_for);
    let counts = Arc::new(Mutex::new(Counts::default()));
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let maintainer = maintain_loop(&file, Arc::clone(&counts), Arc::clone(&stop.0));

    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    // A kill every few seconds; on slow storage, where a restart takes longer, fewer:
    // with responses delayed by up to 25 s (full scale) a worker needs tens of seconds
    // to open the table and build its key index, so kills a minute apart let flushes
    // commit between them.
    let kill_chance = match storage {
        Storage::LocalDisk => 0.15,
        Storage::SlowS3(_) => 1.0 / sized(20, 120) as f64,
    };
    let mut members = Members((0..3).map(|_| start_worker(&file)).collect());
    let started = Instant::now();
    let mut checked_while_running = 0;
    let mut next_check = Instant::now() + Duration::from_secs(15);
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(500)).await;
        replace_ended(&mut members.0, &file, &counts);
        // No SIGKILL in the last stretch, so the group settles and the window read at
        // the end holds many commits (the latest ones are read after kills meanwhile).
        let settling = started.elapsed() + file_retention(storage) + Duration::from_secs(5) > run_for;
        // At random, and once for certain a quarter into the run if none landed yet.
        let none_yet = counts.lock().expect("counts").kills == 0;
        if !settling && (rng.random_bool(kill_chance) || (none_yet && started.elapsed() >= run_for / 4)) {
            let victim = &mut members.0[rng.random_range(0..3)];
            if victim.try_wait().expect("wait").is_none() {
                victim.kill().expect("SIGKILL");
                counts.lock().expect("counts").kills += 1;
            }
        }
        // The latest versions, read while maintenance runs beside the reads (read
        // within seconds, they stay readable for the whole window).
        if Instant::now() >= next_check {
            let latest: Vec<u64> =
                versions_in_window(&target, Duration::from_secs(3)).await.into_iter().rev().take(5).collect();
            let known: Vec<Produced> = s.produced.iter().cloned().chain(producing.so_far()).collect();
            checked_while_running +=
                check_versions(&target, &s.group, &s.topic, 6, &known, &latest).await.versions.len();
            next_check = Instant::now() + Duration::from_secs(10);
        }
    }
    // The workers take in what is still being produced (a loaded machine produces
    // slower than planned); then everything stops at once, and nothing deletes while
    // the window is read.
    s.produced.extend(producing.finish().await);
    // A trickle until the window holds commits made under maintenance (a slow store
    // or a loaded machine may have had the group rebalancing for a while).
    // Five commits in the newer half of the window, so they are still inside it once
    // everything has stopped (stopping takes seconds on a slow store).
    wait_until(Duration::from_secs(240), "five commits inside the window", async || {
        replace_ended(&mut members.0, &file, &counts);
        s.produce(50).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        versions_in_window(&target, file_retention(storage) / 2).await.len() >= 5
    })
    .await;
    drop(stop);
    maintainer.join().expect("the maintain loop");
    replace_ended(&mut members.0, &file, &counts);
    drop(members);
    // Nothing deletes from here on: the window is the one of this instant.
    let stopped = Instant::now();

    let window = file_retention(storage) + stopped.elapsed();
    let checked = check_every_version(&target, &s.group, &s.topic, 6, &s.produced, window).await;
    assert!(checked.versions.len() > 1, "versions inside the window: {:?}", checked.versions);
    if storage == Storage::LocalDisk {
        let v = &checked.versions;
        let mut sample = vec![v[0], v[v.len() / 2], v[v.len() - 1]];
        sample.dedup();
        check_with_spark(&target, &s.group, &s.topic, 6, &s.produced, &sample).await;
    }

    // An operator restores the oldest version of the window (nothing ran since it was
    // read, so it is whole); a worker catches the table up from the offsets it records,
    // and everything produced since.
    let oldest = checked.versions[0];
    let options = serde_json::to_string(&target.options).expect("options");
    run_python(&[
        "-c".as_ref(),
        "import json, sys; from deltalake import DeltaTable; \
         DeltaTable(sys.argv[1], storage_options=json.loads(sys.argv[2]) or None).restore(int(sys.argv[3]))"
            .as_ref(),
        target.uri.as_ref(),
        options.as_ref(),
        oldest.to_string().as_ref(),
    ]);
    if let Some(proxy) = &proxy {
        // No connection is open now: the faults come off at once.
        proxy.remove_toxic("slow");
        proxy.remove_toxic("cut");
    }
    run_to_end(config).await.expect("the worker after the restore");
    let (reads, failed_reads) = reader.stop();

    let counts = std::mem::take(&mut *counts.lock().expect("counts"));
    eprintln!(
        "{name}: {} versions checked at the end, {checked_while_running} while running; {} SIGKILLs, \
         {} injected aborts in workers, {} restarts; {} maintain runs ({} aborted); latest-version reader: \
         {reads} reads, {failed_reads} failed; failures: {:?}",
        checked.versions.len(),
        counts.kills,
        counts.injected_aborts,
        counts.restarts,
        counts.maintain_runs,
        counts.maintain_aborts,
        counts.failures
    );
    assert!(counts.failures.is_empty(), "{:?}", counts.failures);
    assert_eq!(failed_reads, 0, "the latest version always reads");
    assert!(reads > 0 && counts.kills > 0 && counts.maintain_runs > 0, "the run ran its faults: {counts:?}");
    assert!(checked_while_running > 0, "versions were checked while the workers ran");
    if storage == Storage::LocalDisk {
        // (On slow storage maintenance runs too seldom in a minute to count on one.)
        assert!(counts.injected_aborts + counts.maintain_aborts > 0, "no abort inside maintenance landed: {counts:?}");
    }
    assert_table_matches(&read_table_at(&target.uri, &target.options).await, &model(&s.produced));
    assert_eq!(s.committed(), end_offsets(&s.produced, 6), "committed offsets");
    if storage == Storage::LocalDisk {
        s.check().await;
    }
}

/// Flushes every 200 ms, maintenance every second, a checkpoint every 10 commits,
/// retentions of seconds; on slow storage, writes may take minutes.
fn configure(config: &mut Config, layout: PartitionBy, storage: Storage) {
    config.delta.partition_by = layout;
    config.delta.max_rows_per_file = 200;
    config.flush.interval = Duration::from_millis(200);
    config.flush.max_records = 2000;
    config.retry.max_retries = 1000;
    config.maintenance.interval = Duration::from_secs(1);
    config.maintenance.compaction_min_files = 2;
    config.maintenance.compaction_max_files = 6;
    config.maintenance.unreferenced_file_age = match storage {
        Storage::LocalDisk => Duration::from_secs(60),
        Storage::SlowS3(_) => Duration::from_secs(sized(180, 600) as u64),
    };
    let properties = &mut config.delta.table_properties.0;
    properties.insert("delta.checkpointInterval".into(), "10".into());
    let files = file_retention(storage).as_secs();
    properties.insert("delta.logRetentionDuration".into(), format!("interval {} seconds", files + 10));
    properties.insert("delta.deletedFileRetentionDuration".into(), format!("interval {files} seconds"));
    config.validate().expect("valid");
}

/// Makes the proxy slow and unreliable for good, before any connection goes through
/// it (Toxiproxy changes a toxic only once every connection's data is through, which a
/// client that keeps connections open may never let happen): responses on a fifth of
/// the connections delayed by up to 1.5 s (at full scale: on one in twenty, by up to
/// 25 s), one connection in twenty cut.
fn slow_down(proxy: &Proxy) {
    // A latency toxic delays every response of the connection it lands on, and clients
    // keep connections open: at full scale (up to 25 s a response) one connection in
    // twenty, so a flush meets a slow connection often but not on every request.
    let most = sized(1_500, 25_000);
    let slow_share = if most > 1_500 { 0.05 } else { 0.2 };
    proxy.set_toxic("slow", "latency", slow_share, &format!(r#"{{"latency":{},"jitter":{}}}"#, most / 2, most / 2));
    proxy.set_toxic("cut", "reset_peer", 0.05, r#"{"timeout":200}"#);
}

/// Restarts members that ended; an end other than a SIGKILL or an injected abort is a
/// failure.
fn replace_ended(members: &mut [Child], config_file: &str, counts: &Mutex<Counts>) {
    for member in members {
        if let Some(status) = member.try_wait().expect("wait") {
            let mut counts = counts.lock().expect("counts");
            match status.signal() {
                Some(6) => counts.injected_aborts += 1,
                Some(9) => {}
                _ => counts.failures.push(format!("a worker ended with {status}")),
            }
            counts.restarts += 1;
            *member = start_worker(config_file);
        }
    }
}

/// Stops the `maintain` loop when dropped (also when the case fails).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The worker processes of one case, killed when it ends (or fails).
struct Members(Vec<Child>);

impl Drop for Members {
    fn drop(&mut self) {
        for member in &mut self.0 {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

/// A worker process with aborts injected inside maintenance.
fn start_worker(config_file: &str) -> Child {
    let env = [("POSITION_SINK_FAULT_ABORT_IN_MAINTENANCE", MAINTENANCE_ABORT.to_string())];
    spawn_binary(&["run", "--config", config_file], &env, "warn,buoyant_kernel=off", "injected abort").0
}

/// `position-sink maintain` run again and again until `stop`, with aborts injected.
fn maintain_loop(config_file: &str, counts: Arc<Mutex<Counts>>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let config_file = config_file.to_string();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_position-sink"))
                .args(["maintain", "--config", &config_file])
                .env("RUST_LOG", "warn,buoyant_kernel=off")
                .env("POSITION_SINK_FAULT_ABORT_IN_MAINTENANCE", MAINTENANCE_ABORT)
                .output()
                .expect("run maintain");
            let mut counts = counts.lock().expect("counts");
            counts.maintain_runs += 1;
            match (output.status.code(), output.status.signal()) {
                (Some(0), _) => {}
                (_, Some(6)) => counts.maintain_aborts += 1,
                _ => counts.failures.push(format!(
                    "maintain ended with {}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                )),
            }
            drop(counts);
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}
