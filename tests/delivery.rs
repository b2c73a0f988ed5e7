//! End-to-end delivery against a real Kafka broker: the table equals the model of the
//! produced stream, offsets follow the table, replays and crashes change nothing.

mod common;

use std::time::{Duration, Instant};

use common::scenario::{Scenario, sized};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_equals_the_model_of_the_stream_and_offsets_reach_the_end() {
    let topic = create_topic("e2e", 4).await;
    let produced = produce(&topic, &sample(20_000, 500, 7), None).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let started = Instant::now();
    let summary = run_to_end(config(&topic, &group, &table)).await.expect("worker succeeds");
    let elapsed = started.elapsed();
    eprintln!(
        "throughput: {} messages in {:.2} s = {:.0} messages/s ({} Delta commits)",
        summary.messages,
        elapsed.as_secs_f64(),
        summary.messages as f64 / elapsed.as_secs_f64(),
        summary.delta_commits
    );
    assert_eq!(summary.messages, produced.len() as u64);
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_eq!(committed_offsets(&group, &topic, 4), end_offsets(&produced, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_update_never_overwrites_newer_within_or_across_batches() {
    let topic = create_topic("stale", 1).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    // Within one batch: the newer update arrives first.
    let first = produce(
        &topic,
        &[
            update_json(11, "AAA", 5.0, "2026-01-02T10:00:00Z"),
            update_json(11, "AAA", 1.0, "2026-01-02T09:00:00Z"),
            update_json(12, "BBB", 7.0, "2026-01-02T10:00:00.000001Z"),
            update_json(12, "BBB", 8.0, "2026-01-02T10:00:00.000001Z"),
        ],
        None,
    )
    .await;
    run_to_end(config(&topic, &group, &table)).await.expect("first run");
    let rows = read_table(&table).await;
    assert_eq!(rows[&("AAA".to_string(), 11)].position, 5.0, "older update in the same batch lost");
    assert_eq!(rows[&("BBB".to_string(), 12)].position, 8.0, "equal timestamps: the later offset wins");
    // Across batches: an older update arrives in a later batch.
    let second = produce(&topic, &[update_json(11, "AAA", -1.0, "2026-01-01T00:00:00Z")], None).await;
    run_to_end(config(&topic, &group, &table)).await.expect("second run");
    let rows = read_table(&table).await;
    assert_eq!(rows[&("AAA".to_string(), 11)].position, 5.0, "an older update replaced a newer one");
    let all: Vec<_> = first.into_iter().chain(second).collect();
    assert_table_matches(&rows, &model(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_stream_leaves_the_table_unchanged() {
    let topic = create_topic("replay", 3).await;
    let produced = produce(&topic, &sample(3000, 100, 11), None).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    run_to_end(config(&topic, &group, &table)).await.expect("first run");
    let before = read_table(&table).await;
    let version = table_version(&table).await;

    // The same group, reset to the earliest offset: the table's recorded offsets skip it all.
    reset_group(&group, &topic, 3, 0);
    let summary = run_to_end(config(&topic, &group, &table)).await.expect("replay, same group");
    assert!(summary.skipped_already_written > 0);
    assert_eq!((summary.delta_commits, summary.rows_written), (0, 0), "a replay wrote to the table");
    assert_eq!(table_version(&table).await, version, "a replay made a new table version");
    assert_eq!(read_table(&table).await, before);
    assert_eq!(committed_offsets(&group, &topic, 3), end_offsets(&produced, 3));

    // Another group over the same table: every row is offered again and none changes.
    run_to_end(config(&topic, &unique("other"), &table)).await.expect("replay, new group");
    assert_eq!(read_table(&table).await, before, "replay by another group changed rows");
    assert_table_matches(&before, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_delta_and_kafka_commit_writes_nothing_twice() {
    let topic = create_topic("crash", 2).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let uri = table.display().to_string();
    assert_crash_between_commits_writes_nothing_twice(
        &topic,
        &group,
        || config(&topic, &group, &table),
        &uri,
        &Default::default(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_mid_window_flushes_what_was_buffered() {
    let topic = create_topic("shutdown", 2).await;
    let produced = produce(&topic, &sample(1500, 60, 5), None).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let mut c = config(&topic, &group, &table);
    c.flush.interval = Duration::from_secs(3600);
    let worker = spawn_worker(c);
    wait_until(Duration::from_secs(60), "every message consumed", async || worker.messages() == 1500).await;
    assert!(!table.join("_delta_log/00000000000000000001.json").exists(), "flushed before the window ended");
    let summary = worker.stop().await.expect("clean stop");
    assert_eq!(summary.delta_commits, 1);
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_eq!(committed_offsets(&group, &topic, 2), end_offsets(&produced, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_one_group_each_read_and_commit_their_partitions_once_and_build_the_model_table() {
    let topic = create_topic("pair", 4).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let (produced, _, _) = run_two_workers(&topic, &group, || config(&topic, &group, &table), (21, 22)).await;
    assert_table_matches(&read_table(&table).await, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_drops_revoked_buffers_and_the_new_owner_rereads_them() {
    let topic = create_topic("rebalance", 4).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let mut produced = produce(&topic, &sample(2000, 100, 31), None).await;
    // Worker A buffers everything and would not flush for an hour.
    let mut slow = config(&topic, &group, &table);
    slow.flush.interval = Duration::from_secs(3600);
    let a = spawn_worker(slow);
    wait_until(Duration::from_secs(60), "worker A buffered the stream", async || a.messages() == 2000).await;
    // Worker B joins: A's partitions are revoked mid-window, with nothing written yet.
    let b = spawn_worker(config(&topic, &group, &table));
    produced.extend(produce(&topic, &sample(1000, 100, 32), None).await);
    let end = end_offsets(&produced, 4);
    wait_until(Duration::from_secs(60), "A re-read after the revocation", async || a.messages() > 2000).await;
    wait_until(Duration::from_secs(60), "B committed its partitions", async || {
        let committed = committed_offsets(&group, &topic, 4);
        committed.iter().filter(|(p, o)| **o == end[*p]).count() >= 1
    })
    .await;
    let summary_a = a.stop().await.expect("worker A");
    wait_until(Duration::from_secs(60), "every partition committed to the end", async || {
        committed_offsets(&group, &topic, 4) == end
    })
    .await;
    b.stop().await.expect("worker B");
    assert!(summary_a.messages > 2000, "A never re-read its revoked partitions");
    assert_table_matches(&read_table(&table).await, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_of_one_group_commit_side_by_side_without_conflicts() {
    let mut s = Scenario::new("side-by-side", 4).await;
    let config = || {
        let mut c = s.config();
        c.flush.interval = Duration::from_millis(300);
        c
    };
    let workers = [spawn_worker(config()), spawn_worker(config())];
    // Joining the group is not steady state: wait until each worker owns its share.
    wait_until(Duration::from_secs(120), "both workers to own two partitions each", async || {
        workers.iter().all(|w| w.progress.assigned_partitions.load(std::sync::atomic::Ordering::Relaxed) == 2)
    })
    .await;
    let total = sized(8_000, 40_000);
    let producing = s.produce_during(total, 20, Duration::from_secs(8));
    s.produced.extend(producing.finish().await);
    wait_until(Duration::from_secs(120), "every message committed", async || s.is_committed_to_end()).await;
    let mut commits = Vec::new();
    let mut conflicts = 0;
    for worker in workers {
        let summary = worker.stop().await.expect("worker");
        commits.push(summary.delta_commits);
        conflicts += summary.commit_conflicts;
    }
    s.check().await;
    assert!(commits.iter().all(|c| *c > 0), "each worker committed: {commits:?}");
    assert!(
        committed_over_a_concurrent_commit(&s.table) > 0,
        "the workers never committed over each other, so the test proved nothing about conflicts"
    );
    assert_eq!(conflicts, 0, "commits of different partitions conflicted ({commits:?} commits)");
}
