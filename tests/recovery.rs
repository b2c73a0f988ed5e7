//! The table decides where reading resumes: a lost table is rebuilt and a table
//! restored to an earlier version is caught up, from the topic, whatever the group's
//! committed offsets say; offsets deleted by retention stop the worker unless the gap
//! is accepted (`recovery.on_offset_gap`).

mod common;

use common::*;
use position_sink::config::{OnOffsetGap, PartitionBy, WriteMode};
use position_sink::{Progress, WorkerError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_table_is_rebuilt_from_the_topic_although_the_group_committed_everything() {
    deleted_table_is_rebuilt("recovery-lost", WriteMode::CopyOnWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_table_in_deletion_vector_mode_is_rebuilt_from_the_topic() {
    deleted_table_is_rebuilt("recovery-lost-dv", WriteMode::DeletionVectors).await;
}

async fn deleted_table_is_rebuilt(name: &str, mode: WriteMode) {
    let topic = create_topic(name, 3).await;
    let produced = produce(&topic, &sample(3000, 150, 21), None).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let configured = || {
        let mut c = config(&topic, &group, &table);
        c.delta.write_mode = mode;
        c.delta.vector_min_rows = 0;
        c
    };
    run_to_end(configured()).await.expect("first run");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    std::fs::remove_dir_all(&table).expect("delete the table");

    let summary = run_to_end(configured()).await.expect("rerun");
    assert_eq!(summary.messages, produced.len() as u64, "every message was read again, once: {summary:?}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_restored_to_an_earlier_version_is_caught_up_exactly() {
    restored_table_is_caught_up("recovery-restored", None, WriteMode::CopyOnWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_in_deletion_vector_mode_restored_to_an_earlier_version_is_caught_up_exactly() {
    restored_table_is_caught_up("recovery-restored-dv", None, WriteMode::DeletionVectors).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_table_is_caught_up_with_dead_letters_in_a_topic() {
    let dead_letter_topic = create_topic("recovery-restored-dlt", 1).await;
    restored_table_is_caught_up("recovery-restored-t", Some(&dead_letter_topic), WriteMode::CopyOnWrite).await;
}

/// Four runs make several versions; Python deltalake restores version 1; a restarted
/// worker of the same group brings the table back to the model of the whole stream.
async fn restored_table_is_caught_up(name: &str, dead_letter_topic: Option<&str>, mode: WriteMode) {
    let topic = create_topic(name, 3).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    // In deletion-vector mode, runs update some keys of the files an earlier run wrote
    // (files of a whole Kafka partition, layout `none`), so files carry vectors.
    let (layout, per_run) = match mode {
        WriteMode::CopyOnWrite => (PartitionBy::Symbol, 800),
        WriteMode::DeletionVectors => (PartitionBy::None, 60),
    };
    let configured = || {
        let mut c = config(&topic, &group, &table);
        c.delta.write_mode = mode;
        c.delta.vector_min_rows = 0;
        c.delta.partition_by = layout;
        match dead_letter_topic {
            Some(dlt) => with_dead_letter_topic(c, dlt),
            None => c,
        }
    };
    let mut produced = Vec::new();
    for seed in 0..4 {
        produced.extend(produce(&topic, &sample(per_run, 120, 40 + seed), None).await);
        run_to_end(configured()).await.expect("run");
    }
    assert_table_matches(&read_table(&table).await, &model(&produced));
    // An operator undoes writes with the Python deltalake package: to version 1, or in
    // deletion-vector mode to the first version whose files carry vectors (they come
    // back with the vectors they had then).
    let version = match mode {
        WriteMode::CopyOnWrite => 1,
        WriteMode::DeletionVectors => first_version_with_a_vector(&table),
    };
    python_on(
        &table,
        &format!("import sys; from deltalake import DeltaTable; DeltaTable(sys.argv[1]).restore({version})"),
    );
    let restored = read_table(&table).await;
    let expected = model(&produced);
    let stale = expected.iter().filter(|(k, row)| restored.get(*k).is_none_or(|r| r.kafka_offset != row.kafka_offset));
    assert!(stale.count() > 0, "the restore changed nothing");

    let end = end_offsets(&produced, 3);
    let restored_record = recorded_next_offsets_at(&table, version);
    let to_read_again: i64 =
        end.iter().map(|(p, end)| end.unwrap_or(0) - restored_record.get(p).copied().unwrap_or(0)).sum();
    assert!(to_read_again > 0, "version 1 holds everything");
    let summary = run_to_end(configured()).await.expect("rerun");
    assert_eq!(summary.messages, to_read_again as u64, "read again from the restored record, once each: {summary:?}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    // The table's record is true again: a second restart reads nothing more.
    let again = run_to_end(configured()).await.expect("second rerun");
    assert_eq!(again.messages, 0, "the record was not reset: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_deleted_by_retention_stop_the_worker_unless_the_gap_is_accepted() {
    let topic = create_topic("recovery-gap", 1).await;
    let produced = produce(&topic, &sample(1000, 80, 33), Some(0)).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    // A table that holds offsets 0..=99 (its record: 99), then retention deletes 0..400.
    let first_hundred: Vec<_> = produced.iter().filter(|m| m.offset < 100).cloned().collect();
    write_directly(&config(&topic, &group, &table), &topic, &first_hundred).await;
    delete_records(&topic, 0, 400).await;

    let error = run_to_end(config(&topic, &group, &table)).await.expect_err("the gap stops the worker");
    let message = error.to_string();
    assert!(matches!(error, WorkerError::OffsetGap { needed: 100, oldest: 400, .. }), "{message}");
    assert!(message.contains("recovery.on_offset_gap") && message.contains("100..400"), "{message}");

    let progress = std::sync::Arc::new(Progress::default());
    let mut accepting = config(&topic, &group, &table);
    accepting.recovery.on_offset_gap = OnOffsetGap::Continue;
    accepting.worker.exit_when_caught_up = true;
    position_sink::run_with_progress(accepting, Default::default(), progress.clone()).await.expect("gap accepted");
    assert_eq!(Progress::get(&progress.offset_gaps), 1, "the accepted gap is counted");
    let mut survivors = first_hundred;
    survivors.extend(produced.iter().filter(|m| m.offset >= 400).cloned());
    assert_table_matches(&read_table(&table).await, &model(&survivors));
}

/// Writes `messages` to the positions table of `config` through the table API, with
/// their offsets recorded for `config`'s group, as a worker's flush would.
async fn write_directly(config: &position_sink::config::Config, topic: &str, messages: &[Produced]) {
    use position_sink::offsets::{Coordinates, Offset, TopicPartition};
    use position_sink::worker::batch::{Buffer, Limits};
    let mut buffer =
        Buffer::new(config.delta.key_columns.clone(), Limits { max_records: usize::MAX, max_bytes: usize::MAX }, false);
    for m in messages {
        let at = Coordinates { tp: TopicPartition::new(topic, m.partition), offset: Offset(m.offset) };
        let update = position_sink::decode::decode(m.key.as_deref(), m.value.as_deref(), at, &Default::default())
            .expect("a valid message");
        buffer.push(update, 1, None);
    }
    let table =
        position_sink::table::PositionTable::open_or_create(&config.delta, &config.kafka.group_id).await.expect("open");
    table.write(&buffer.take()).await.expect("write");
}

/// Deletes the records of `topic`'s `partition` below `before` (what retention does).
async fn delete_records(topic: &str, partition: i32, before: i64) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before)).expect("offset");
    admin.delete_records(&list, &AdminOptions::new()).await.expect("delete records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_running_while_its_table_is_restored_stops_rather_than_write_over_it_and_a_restart_catches_up() {
    let topic = create_topic("recovery-live-restore", 2).await;
    let (_dir, table) = table_dir();
    let config = config(&topic, &unique("g"), &table);
    let worker = spawn_worker(config.clone());
    let mut produced = Vec::new();
    for seed in 0..3 {
        // The version before producing: a flush may land before `produce` returns.
        let version = table_version_or_zero(&table).await;
        produced.extend(produce(&topic, &sample(400, 50, 80 + seed), None).await);
        wait_until(std::time::Duration::from_secs(60), "a flush of the new messages", async || {
            table_version_or_zero(&table).await > version
        })
        .await;
    }
    python_on(&table, RESTORE_VERSION_1);
    produced.extend(produce(&topic, &sample(400, 50, 90), None).await);
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), worker.handle)
        .await
        .expect("the worker stops by itself")
        .expect("join");
    let error = stopped.expect_err("the worker refuses to write over the restore");
    assert!(error.to_string().contains("was restored to an earlier version"), "{error}");
    run_to_end(config).await.expect("restart");
    assert_table_matches(&read_table(&table).await, &model(&produced));
}

/// A restarted worker finds a backlog waiting past the group's committed offset and a
/// table restored behind it: the messages it took from the backlog before moving back
/// to the table's record are dropped and read again in order, never written ahead of
/// the ones before them (which the table's record would then count as written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_waiting_when_a_restored_table_is_read_again_is_written_after_what_it_follows() {
    let topic = create_topic("recovery-restored-backlog", 2).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let configured = || {
        let mut c = config(&topic, &group, &table);
        // Many flushes, so that one holding only the backlog would be recorded before
        // the messages read again.
        c.flush.max_records = 150;
        c
    };
    let mut produced = Vec::new();
    for seed in 0..3 {
        produced.extend(produce(&topic, &sample(400, 50, 60 + seed), None).await);
        run_to_end(configured()).await.expect("run");
    }
    python_on(&table, RESTORE_VERSION_1);
    let committed = committed_offsets(&group, &topic, 2);
    produced.extend(produce(&topic, &sample(1500, 1000, 70), None).await);
    let restored_record = recorded_next_offsets_at(&table, 1);
    for (partition, committed) in &committed {
        let record = restored_record.get(partition).copied().unwrap_or(0);
        assert!(committed.unwrap_or(0) > record, "partition {partition}: the restore set the table behind the group");
    }
    let end = end_offsets(&produced, 2);
    let to_read_again: i64 =
        end.iter().map(|(p, end)| end.unwrap_or(0) - restored_record.get(p).copied().unwrap_or(0)).sum();
    let summary = run_to_end(configured()).await.expect("rerun");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_eq!(summary.messages, to_read_again as u64, "read from the restored record, once each: {summary:?}");
}

async fn table_version_or_zero(table: &std::path::Path) -> u64 {
    match deltalake::open_table(deltalake::ensure_table_uri(table.display().to_string()).expect("url")).await {
        Ok(t) => t.version().unwrap_or(0),
        Err(_) => 0,
    }
}

/// The table's recorded next offset per partition (of its one topic) as of `version`,
/// from the `txn` actions of its commit files.
/// The first commit that adds a file with a deletion vector.
fn first_version_with_a_vector(table: &std::path::Path) -> u64 {
    (1..)
        .take_while(|v| table.join(format!("_delta_log/{v:020}.json")).exists())
        .find(|v| {
            let log = std::fs::read_to_string(table.join(format!("_delta_log/{v:020}.json"))).expect("commit file");
            log.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|action| action["add"]["deletionVector"].is_object())
        })
        .expect("a flush hid rows with a deletion vector")
}

fn recorded_next_offsets_at(table: &std::path::Path, version: u64) -> std::collections::BTreeMap<i32, i64> {
    let mut recorded = std::collections::BTreeMap::new();
    for v in 0..=version {
        let log = std::fs::read_to_string(table.join(format!("_delta_log/{v:020}.json"))).expect("commit file");
        for action in log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            let (Some(app), Some(last)) = (action["txn"]["appId"].as_str(), action["txn"]["version"].as_i64()) else {
                continue;
            };
            let partition: i32 = app.rsplit('/').next().and_then(|p| p.parse().ok()).expect("partition in the app id");
            let next = recorded.entry(partition).or_insert(0);
            *next = (*next).max(last + 1);
        }
    }
    recorded
}
