//! Bad input against a real Kafka broker: every invalid message becomes exactly one
//! dead letter with its bytes, coordinates and reason; the good messages around it
//! land; offsets advance past it; crashes and replays neither lose nor double it.

mod common;

use std::time::Duration;

use common::*;
use position_sink::dead_letter::review::{Selection, republish};
use position_sink::faults::CrashPoints;
use position_sink::worker::flush::FlushError;

/// A message and the category it must be rejected with; a `None` value is a tombstone.
type RuleCase = (Option<&'static str>, Option<Vec<u8>>, &'static str);

/// One case per validation rule.
fn rule_cases() -> Vec<RuleCase> {
    let v = |s: &str| Some(s.as_bytes().to_vec());
    let long_symbol = "S".repeat(81);
    vec![
        (Some("1"), v(r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-01-01T00:00:00Z""#), "invalid_json"),
        (Some("1"), v(r#"[1,"A",1]"#), "not_an_object"),
        (Some("1"), v(r#""a string""#), "not_an_object"),
        (Some("1"), v(r#"{"conid":1,"symbol":"A","position":"ten","timestamp":"2026-01-01T00:00:00Z"}"#), "wrong_type"),
        (Some("1"), v(r#"{"conid":"1","symbol":"A","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#), "wrong_type"),
        (Some("1"), v(r#"{"conid":1,"position":1,"timestamp":"2026-01-01T00:00:00Z"}"#), "missing_field"),
        (Some("1"), v(r#"{"conid":1,"symbol":"A","position":null,"timestamp":"2026-01-01T00:00:00Z"}"#), "null_field"),
        (Some("1"), v(r#"{"conid":1,"symbol":"A","position":NaN,"timestamp":"2026-01-01T00:00:00Z"}"#), "not_finite"),
        (
            Some("1"),
            v(r#"{"conid":1,"symbol":"A","position":"Infinity","timestamp":"2026-01-01T00:00:00Z"}"#),
            "not_finite",
        ),
        (
            Some("1"),
            v(r#"{"conid":1,"symbol":"A","position":-Infinity,"timestamp":"2026-01-01T00:00:00Z"}"#),
            "not_finite",
        ),
        (Some("1"), v(r#"{"conid":1,"symbol":"A","position":1e400,"timestamp":"2026-01-01T00:00:00Z"}"#), "not_finite"),
        (Some("0"), v(r#"{"conid":0,"symbol":"A","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#), "out_of_range"),
        (None, v(r#"{"conid":-7,"symbol":"A","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#), "out_of_range"),
        (
            None,
            v(r#"{"conid":9223372036854775808,"symbol":"A","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#),
            "out_of_range",
        ),
        (Some("1"), v(r#"{"conid":1,"symbol":"","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#), "blank_field"),
        (Some("1"), v(r#"{"conid":1,"symbol":" \t ","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#), "blank_field"),
        (
            Some("1"),
            v(&format!(r#"{{"conid":1,"symbol":"{long_symbol}","position":1,"timestamp":"2026-01-01T00:00:00Z"}}"#)),
            "invalid_symbol",
        ),
        (
            Some("1"),
            v(r#"{"conid":1,"symbol":"A\u0000B","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#),
            "invalid_symbol",
        ),
        (
            Some("1"),
            v(r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-02-30T00:00:00Z"}"#),
            "invalid_timestamp",
        ),
        (Some("1"), v(r#"{"conid":1,"symbol":"A","position":1,"timestamp":"yesterday"}"#), "invalid_timestamp"),
        (
            Some("1"),
            v(r#"{"conid":1,"symbol":"A","position":1,"timestamp":99999999999999999999}"#),
            "invalid_timestamp",
        ),
        (
            Some("123"),
            v(r#"{"conid":456,"symbol":"A","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#),
            "key_mismatch",
        ),
        (Some("abc"), v(r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#), "invalid_key"),
        (
            Some("1"),
            Some(
                [br#"{"conid":1,"symbol":"CAF"#.as_slice(), b"\xe9\xff", br#"","position":1,"timestamp":1}"#].concat(),
            ),
            "not_utf8",
        ),
        (
            Some("1"),
            v(&format!(r#"{{"conid":1,"symbol":"A","position":1,"timestamp":1,"pad":"{}"}}"#, "x".repeat(3000))),
            "too_large",
        ),
        (Some("1"), v(""), "empty_value"),
        (Some("1"), None, "empty_value"),
        (
            Some("1"),
            v(r#"{"conid":1,"symbol":"A","symbol":"B","position":1,"timestamp":"2026-01-01T00:00:00Z"}"#),
            "duplicate_field",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_dead_letters_its_message_and_the_good_ones_around_it_land() {
    let topic = create_topic("rules", 1).await;
    let mut messages = Vec::new();
    for (i, (key, value, category)) in rule_cases().into_iter().enumerate() {
        let i = i as i64;
        messages.push(update_json(1000 + i, &format!("BEFORE{i}"), i as f64, "2026-01-01T00:00:00Z"));
        messages.push(Msg { key: key.map(|k| k.as_bytes().to_vec()), value, rejection: Some(category.to_string()) });
        messages.push(update_json(2000 + i, &format!("AFTER{i}"), i as f64, "2026-01-01T00:00:00Z"));
    }
    let produced = produce(&topic, &messages, Some(1)).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let mut config = config(&topic, &group, &table);
    config.decode.max_message_bytes = 2048;
    let summary = run_to_end(config).await.expect("bad input never stops the worker");

    assert_eq!(summary.dead_letters.total(), rule_cases().len() as u64);
    assert_table_matches(&read_table(&table).await, &model(&produced));
    let dead = read_dead_letters(&table).await;
    assert_dead_letters_match(&dead, &topic, &produced);
    assert_eq!(committed_offsets(&group, &topic, 1), end_offsets(&produced, 1));

    // Reasons a person can act on.
    let reason_of =
        |category: &str| dead.iter().filter(|d| d.category == category).map(|d| d.reason.clone()).collect::<Vec<_>>();
    assert!(reason_of("key_mismatch").contains(&"key \"123\" disagrees with conid 456".to_string()));
    assert!(reason_of("missing_field").contains(&"missing required field \"symbol\"".to_string()));
    assert!(reason_of("not_finite").contains(&"\"position\" is not a finite number".to_string()));
    assert!(
        reason_of("invalid_json")[0].starts_with("value is not valid JSON at line 1 column"),
        "{:?}",
        reason_of("invalid_json")
    );
    assert!(reason_of("too_large")[0].contains("decode.max_message_bytes"));
    assert!(dead.iter().all(|d| d.kafka_timestamp_millis.is_some() && d.rejected_at_micros > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_bad_messages_on_every_partition_become_exactly_the_dead_letters() {
    let topic = create_topic("bad5", 4).await;
    let produced = produce(&topic, &sample_with_bad(20_000, 400, 17, 5), None).await;
    let bad_per_partition: Vec<usize> =
        (0..4).map(|p| produced.iter().filter(|m| m.partition == p && m.rejection.is_some()).count()).collect();
    assert!(bad_per_partition.iter().all(|n| *n > 50), "{bad_per_partition:?}");
    let (_dir, table) = table_dir();
    let group = unique("g");
    let summary = run_to_end(config(&topic, &group, &table)).await.expect("worker");

    let bad = produced.iter().filter(|m| m.rejection.is_some()).count() as u64;
    assert_eq!(summary.dead_letters.total(), bad);
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_dead_letters_match(&read_dead_letters(&table).await, &topic, &produced);
    assert_eq!(committed_offsets(&group, &topic, 4), end_offsets(&produced, 4));

    // A replay of the whole topic by the same group adds nothing anywhere.
    reset_group(&group, &topic, 4, 0);
    let replay = run_to_end(config(&topic, &group, &table)).await.expect("replay");
    assert_eq!((replay.delta_commits, replay.dead_letters.total()), (0, 0));
    assert_dead_letters_match(&read_dead_letters(&table).await, &topic, &produced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_the_dead_letter_positions_and_kafka_commits_duplicate_no_dead_letter() {
    let topic = create_topic("dlcrash", 2).await;
    let produced = produce(&topic, &sample_with_bad(3000, 100, 23, 10), None).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let crashing = || {
        let mut c = config(&topic, &group, &table);
        c.flush.interval = Duration::from_secs(2);
        c.worker.exit_when_caught_up = true;
        c
    };

    // Dead letters committed, positions not.
    let crash = CrashPoints { crash_after_dead_letter_commits: Some(1), ..Default::default() };
    let result = run_crashing(crashing(), crash).await;
    assert!(matches!(result, Err(position_sink::WorkerError::Flush(FlushError::InjectedCrash(_)))), "{result:?}");
    let written = read_dead_letters(&table).await.len();
    assert!(written > 0);
    assert!(committed_offsets(&group, &topic, 2).values().all(Option::is_none));

    // Positions committed too, Kafka offsets not.
    let crash = CrashPoints { crash_after_delta_commits: Some(1), ..Default::default() };
    let result = run_crashing(crashing(), crash).await;
    assert!(matches!(result, Err(position_sink::WorkerError::Flush(FlushError::InjectedCrash(_)))), "{result:?}");
    assert!(committed_offsets(&group, &topic, 2).values().all(Option::is_none));

    run_to_end(config(&topic, &group, &table)).await.expect("restart");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_dead_letters_match(&read_dead_letters(&table).await, &topic, &produced);
    assert_eq!(committed_offsets(&group, &topic, 2), end_offsets(&produced, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_gets_each_bad_message_once_with_headers_even_after_a_crash() {
    let topic = create_topic("dltsrc", 2).await;
    let dead_letter_topic = create_topic("dlt", 1).await;
    let produced = produce(&topic, &sample_with_bad(3000, 100, 29, 8), None).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let with_topic = || {
        let mut c = with_dead_letter_topic(config(&topic, &group, &table), &dead_letter_topic);
        c.flush.interval = Duration::from_secs(2);
        c
    };

    // The positions commit lands; the Kafka transaction with the dead letters and the
    // offsets never commits.
    let mut crashing = with_topic();
    crashing.worker.exit_when_caught_up = true;
    let crash = CrashPoints { crash_after_delta_commits: Some(1), ..Default::default() };
    let result = run_crashing(crashing, crash).await;
    assert!(matches!(result, Err(position_sink::WorkerError::Flush(FlushError::InjectedCrash(_)))), "{result:?}");

    // The dead letters and offsets are sent in a transaction that is never committed.
    let mut crashing = with_topic();
    crashing.worker.exit_when_caught_up = true;
    let crash = CrashPoints { crash_after_dead_letter_commits: Some(1), ..Default::default() };
    let result = run_crashing(crashing, crash).await;
    assert!(matches!(result, Err(position_sink::WorkerError::Flush(FlushError::InjectedCrash(_)))), "{result:?}");

    // The restarted worker waits for the broker to abort the open transaction, then
    // reads again from the offsets committed before it.
    let summary = run_to_end(with_topic()).await.expect("restart");
    let bad = produced.iter().filter(|p| p.rejection.is_some()).count() as u64;
    assert_eq!(summary.dead_letters.total(), bad, "every bad message published once, by the restarted worker");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    let dead = read_dead_letter_topic(with_topic()).await;
    assert_dead_letters_match(&dead, &topic, &produced);
    assert!(dead.iter().all(|d| !d.reason.is_empty() && d.rejected_at_micros > 0));
    assert_eq!(committed_offsets(&group, &topic, 2), end_offsets(&produced, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_fixed_by_a_config_change_are_republished_and_land() {
    let topic = create_topic("republish", 1).await;
    let big = serde_json::json!({
        "conid": 77, "symbol": "BIG", "position": 3.0, "timestamp": "2026-01-01T00:00:00Z", "note": "x".repeat(3000)
    })
    .to_string();
    let broken = r#"{"conid":78,"symbol":"BAD","position":"#;
    let produced = produce(
        &topic,
        &[
            update_json(1, "A", 1.0, "2026-01-01T00:00:00Z"),
            Msg::bad(Some("77"), big.clone(), "too_large"),
            Msg::bad(Some("78"), broken, "invalid_json"),
        ],
        None,
    )
    .await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let mut small = config(&topic, &group, &table);
    small.decode.max_message_bytes = 2048;
    run_to_end(small).await.expect("first run");
    assert_eq!(read_dead_letters(&table).await.len(), 2);

    // The limit is raised; only the message that now passes is re-published.
    let raised = config(&topic, &group, &table);
    let selection = Selection { at: vec![], category: Some("too_large".into()) };
    let report = republish(&raised, &selection, false, false).await.expect("republish");
    assert_eq!(report.republished.len(), 1);
    let all = Selection {
        at: produced.iter().map(|m| format!("{topic}:0:{}", m.offset).parse().unwrap()).collect(),
        category: None,
    };
    let dry = republish(&raised, &all, false, true).await.expect("dry run");
    assert_eq!((dry.still_invalid.len(), dry.not_found.len()), (1, 1), "{dry:?}");

    run_to_end(raised).await.expect("second run");
    let rows = read_table(&table).await;
    assert_eq!(rows[&("BIG".to_string(), 77)].position, 3.0);
    assert_eq!(rows.len(), 2);
    assert_eq!(read_dead_letters(&table).await.len(), 2, "the re-published message was dead-lettered again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_stays_exact_when_a_stalled_worker_loses_its_partitions_mid_flush() {
    let topic = create_topic("dltpair", 4).await;
    let dead_letter_topic = create_topic("dltp", 1).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let with_topic = || {
        let mut c = with_dead_letter_topic(config(&topic, &group, &table), &dead_letter_topic);
        c.flush.max_records = 500;
        c
    };
    let mut produced = produce(&topic, &sample_with_bad(4000, 150, 37, 6), None).await;
    // A stalls at its first flush without polling; past max.poll.interval.ms it leaves
    // the group and B takes every partition.
    let mut stalling = with_topic();
    stalling.kafka.librdkafka.0.insert("max.poll.interval.ms".into(), "6000".into());
    let stall = std::sync::Arc::new(tokio::sync::Notify::new());
    let a = spawn_worker_with(stalling, CrashPoints { hold_first_flush: Some(stall.clone()), ..Default::default() });
    wait_until(Duration::from_secs(60), "worker A is reading", async || a.messages() > 0).await;
    let b = spawn_worker(with_topic());
    produced.extend(produce(&topic, &sample_with_bad(4000, 150, 38, 6), None).await);
    let end = end_offsets(&produced, 4);
    wait_until(Duration::from_secs(90), "B committed everything", async || committed_offsets(&group, &topic, 4) == end)
        .await;
    // A wakes up and flushes: its dead-letter transaction must not commit stale offsets
    // or dead letters B wrote already; A reads its batch again once back in the group.
    stall.notify_one();
    let rewinds = |w: &common::Worker| w.progress.rewinds.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(Duration::from_secs(60), "A's stale flush was not committed and read again", async || rewinds(&a) > 0)
        .await;
    produced.extend(produce(&topic, &sample_with_bad(2000, 150, 39, 6), None).await);
    let end = end_offsets(&produced, 4);
    wait_until(Duration::from_secs(90), "both workers committed to the end", async || {
        committed_offsets(&group, &topic, 4) == end
    })
    .await;
    eprintln!("flushes aborted and read again: A {}, B {}", rewinds(&a), rewinds(&b));
    a.stop().await.expect("worker A");
    b.stop().await.expect("worker B");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    let dead = read_dead_letter_topic(with_topic()).await;
    assert_dead_letters_match(&dead, &topic, &produced);
}

/// Every committed dead letter in the dead-letter topic of `config`.
async fn read_dead_letter_topic(config: position_sink::Config) -> Vec<position_sink::dead_letter::DeadLetter> {
    tokio::task::spawn_blocking(move || {
        position_sink::dead_letter::topic::read(&config.kafka, &config.dead_letter.topic, None, 1_000_000)
    })
    .await
    .expect("join")
    .expect("read dead-letter topic")
}

/// Two binnings of the dead-letter table at once (a worker's table-wide run and
/// `position-sink maintain`): the first commits, the second, held at its commit until
/// then, packs the same files and conflicts; every dead letter is held once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_binnings_of_the_dead_letter_table_at_once_hold_each_dead_letter_once() {
    use position_sink::config::Settings;
    use position_sink::dead_letter::{DeadLetter, DeadLetterTable};
    use position_sink::decode::Rejection;
    use position_sink::maintenance::binning;
    use position_sink::offsets::{Coordinates, Offset, OffsetMap, TopicPartition};

    let (_dir, path) = table_dir();
    let (uri, faults) = common::faulty_store::faulty_table(&path);
    let mut table =
        DeadLetterTable::open_or_create(&uri, &Settings::default(), &Settings::default(), "g").await.expect("create");
    let tp = TopicPartition::new("t", 0);
    for flush in 0..4 {
        let letters: Vec<_> = (0..5)
            .map(|i| {
                let source = Coordinates { tp: tp.clone(), offset: Offset(flush * 5 + i) };
                DeadLetter::new(source, None, Some(b"{".as_slice()), None, &Rejection::EmptyValue)
            })
            .collect();
        let mut covered = OffsetMap::default();
        covered.observe(&tp, Offset(flush * 5 + 4));
        table = table.write(&letters, &covered).await.expect("dead letters written").0;
    }

    let gate = faults.hold_next_commit();
    let held = tokio::spawn({
        let table = table.delta().clone();
        async move { binning::bin(&table, Duration::from_secs(60), &[]).await }
    });
    wait_until(Duration::from_secs(30), "the first binning's commit is held", async || {
        faults.held.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let second = binning::bin(table.delta(), Duration::from_secs(60), &[]).await.expect("the second binning");
    assert_eq!((second.files, second.conflicted), (4, false), "{second:?}");
    gate.notify_one();
    let first = held.await.expect("join").expect("the held binning");
    assert_eq!(
        (first.files, first.conflicted),
        (4, true),
        "a second copy of the packed files was committed: {first:?}"
    );

    let read = position_sink::dead_letter::table::read(&uri, &Settings::default(), None, 1000).await.expect("read");
    let mut offsets: Vec<i64> = read.iter().map(|d| d.source.offset.0).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>(), "each dead letter once");
}
