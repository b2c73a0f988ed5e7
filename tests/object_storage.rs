//! The table on S3: a real S3-compatible server (moto, started by the test command on
//! 127.0.0.1, with conditional writes) under the end-to-end model check, two workers of
//! one group, a crash between the Delta and the Kafka commit, and independent readers
//! (Python `deltalake` and `polars` with the same storage options), and a table in
//! deletion-vector mode whose vectors live on S3 too.

mod common;

use common::*;
use position_sink::config::{Config, PartitionBy, Settings, WriteMode};

fn s3_config(topic: &str, group: &str, uri: &str) -> Config {
    let (_dir, unused) = table_dir();
    let mut c = config(topic, group, &unused);
    c.delta.table_uri = uri.to_string();
    c.delta.storage_options = Settings(s3_options().into_iter().collect());
    c.validate().expect("valid S3 config");
    c
}

/// Reads the table at `uri` with Python `deltalake` and `polars` and returns the number
/// of rows each sees, after asserting one row per conid.
fn python_rows(uri: &str) -> (usize, usize) {
    let options = serde_json::to_string(&s3_options()).expect("options");
    let code = "import json, sys, polars as pl\n\
             from deltalake import DeltaTable\n\
             uri, options = sys.argv[1], json.loads(sys.argv[2])\n\
             arrow = DeltaTable(uri, storage_options=options).to_pyarrow_table()\n\
             frame = pl.read_delta(uri, storage_options=options)\n\
             assert frame['conid'].n_unique() == len(frame), 'one row per conid'\n\
             print(arrow.num_rows, len(frame))";
    let text = run_python(&["-c".as_ref(), code.as_ref(), uri.as_ref(), options.as_ref()]);
    let mut counts = text.split_whitespace().map(|n| n.parse::<usize>().expect("a count"));
    (counts.next().expect("deltalake rows"), counts.next().expect("polars rows"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_on_s3_equals_the_model_and_python_readers_read_it() {
    let topic = create_topic("s3-model", 3).await;
    let produced = produce(&topic, &sample_with_bad(3000, 150, 51, 3), None).await;
    let uri = s3_table();
    let group = unique("g");
    let summary = run_to_end(s3_config(&topic, &group, &uri)).await.expect("worker on S3");
    let expected = model(&produced);
    assert_table_matches(&read_table_at(&uri, &s3_options()).await, &expected);
    assert_eq!(python_rows(&uri), (expected.len(), expected.len()));
    let bad = produced.iter().filter(|m| m.rejection.is_some()).count() as u64;
    assert_eq!(summary.dead_letters.total(), bad, "the dead letters went to the table beside it on S3");
    assert_eq!(committed_offsets(&group, &topic, 3), end_offsets(&produced, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_of_one_group_on_s3_build_the_model_table() {
    let topic = create_topic("s3-pair", 4).await;
    let uri = s3_table();
    let group = unique("g");
    let (produced, sa, sb) = run_two_workers(&topic, &group, || s3_config(&topic, &group, &uri), (52, 53)).await;
    assert!(sa.delta_commits > 0 && sb.delta_commits > 0, "both workers committed: {sa:?} {sb:?}");
    assert_table_matches(&read_table_at(&uri, &s3_options()).await, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_delta_and_the_kafka_commit_on_s3_writes_nothing_twice() {
    let topic = create_topic("s3-crash", 2).await;
    let uri = s3_table();
    let group = unique("g");
    assert_crash_between_commits_writes_nothing_twice(
        &topic,
        &group,
        || s3_config(&topic, &group, &uri),
        &uri,
        &s3_options(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_s3_settings_from_aws_variables_and_logs_json_with_secrets_masked() {
    let topic = create_topic("s3-binary", 2).await;
    let produced = produce(&topic, &sample(1000, 60, 55), None).await;
    let uri = s3_table();
    let dir = tempfile::tempdir().expect("dir");
    let config_file = dir.path().join("sink.toml");
    // A secret in the file: the log must not show it.
    let secret = "s3cr3t-session-token";
    std::fs::write(
        &config_file,
        format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{}\"\ntopics = [\"{topic}\"]\n[delta]\ntable_uri = \"{uri}\"\n\
             [delta.storage_options]\naws_session_token = \"{secret}\"\n[http]\nbind = \"127.0.0.1:0\"\n",
            brokers(),
            unique("g")
        ),
    )
    .expect("write config");
    let file = config_file.display().to_string();
    let environment: Vec<(String, String)> = s3_options().into_iter().collect();
    let (code, _, stderr) =
        run_cli_with(&["run", "--exit-when-caught-up", "--log-format", "json", "--config", &file], &environment, None);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains(secret), "a secret reached the log:\n{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let message = |text: &str| {
        lines.iter().find(|l| l["message"] == text).unwrap_or_else(|| panic!("no {text:?} line in {stderr}"))
    };
    let effective = message("effective configuration");
    assert_eq!(effective["delta.table_uri"], uri.as_str());
    assert!(effective["delta.storage_options"].as_str().is_some_and(|s| s.contains("***")), "{effective}");
    message("flushed batch");
    assert_table_matches(&read_table_at(&uri, &s3_options()).await, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_vector_table_on_s3_equals_the_model_through_restarts_and_polars_reads_it() {
    let topic = create_topic("s3-dv", 3).await;
    let uri = s3_table();
    let group = unique("g");
    let mut produced = Vec::new();
    // Each run updates some keys of the files the runs before wrote, and each restart
    // reads the vectors back from S3 into its key index.
    for seed in 0..3 {
        produced.extend(produce(&topic, &sample(300, 600, 70 + seed), None).await);
        let mut c = s3_config(&topic, &group, &uri);
        c.delta.write_mode = WriteMode::DeletionVectors;
        c.delta.vector_min_rows = 0;
        c.delta.partition_by = PartitionBy::None;
        run_to_end(c).await.expect("worker on S3");
    }
    let url = deltalake::ensure_table_uri(&uri).expect("url");
    let table = deltalake::open_table_with_storage_options(url, s3_options()).await.expect("open");
    let with_vector = table
        .snapshot()
        .expect("snapshot")
        .log_data()
        .iter()
        .filter(|f| f.deletion_vector_descriptor().is_some())
        .count();
    assert!(with_vector > 0, "files on S3 carry deletion vectors");
    let expected = model(&produced);
    assert_table_matches(&read_table_at(&uri, &s3_options()).await, &expected);
    let options = serde_json::to_string(&s3_options()).expect("options");
    let code = "import json, sys, polars as pl\n\
                frame = pl.read_delta(sys.argv[1], storage_options=json.loads(sys.argv[2]))\n\
                assert frame['conid'].n_unique() == len(frame), 'one row per conid'\n\
                print(len(frame))";
    let rows = run_python(&["-c".as_ref(), code.as_ref(), uri.as_ref(), options.as_ref()]);
    assert_eq!(rows.trim().parse::<usize>().expect("a count"), expected.len());
}
