//! The binary as a user runs it: killed with SIGKILL at random moments while it
//! ingests a stream with bad messages, restarted each time; the final table equals the
//! model, the dead letters are exactly the bad messages, and the group's offsets reach
//! the end. The `dead-letters` command lists what was rejected.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn start(config_file: &std::path::Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_position-sink"))
        .arg("run")
        .arg("--config")
        .arg(config_file)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start position-sink")
}

/// Writes a TOML config for `topic`, `group` and `table`, followed by `extra` sections.
fn write_config(
    dir: &std::path::Path,
    topic: &str,
    group: &str,
    table: &std::path::Path,
    extra: &str,
) -> std::path::PathBuf {
    let file = dir.join("sink.toml");
    let text = format!(
        "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n[delta]\ntable_uri = \"{}\"\n{extra}",
        brokers(),
        table.display()
    );
    std::fs::write(&file, text).expect("write config");
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let topic = create_topic("kill", 4).await;
    let produced = produce(&topic, &sample_with_bad(30_000, 400, 41, 2), None).await;
    let (dir, table) = table_dir();
    let group = unique("g");
    let config_file = write_config(
        dir.path(),
        &topic,
        &group,
        &table,
        "[kafka.librdkafka]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n\
         [flush]\ninterval = \"200ms\"\nmax_records = 1500\n",
    );
    let seed: u64 = rand::random();
    eprintln!("kill schedule seed: {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    for _ in 0..4 {
        let mut child = start(&config_file, &[]);
        let delay = rand::Rng::random_range(&mut rng, 1500..4000);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
    let status = tokio::task::spawn_blocking(move || {
        let mut child = start(&config_file, &["--exit-when-caught-up"]);
        child.wait()
    })
    .await
    .unwrap()
    .expect("final run");
    assert!(status.success(), "final run failed: {status}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_dead_letters_match(&read_dead_letters(&table).await, &topic, &produced);
    assert_eq!(committed_offsets(&group, &topic, 4), end_offsets(&produced, 4));

    // A person reviews them.
    let listed = Command::new(env!("CARGO_BIN_EXE_position-sink"))
        .args(["dead-letters", "list", "--limit", "5", "--category", "missing_field", "--config"])
        .arg(dir.path().join("sink.toml"))
        .output()
        .expect("dead-letters list");
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{text}{}", String::from_utf8_lossy(&listed.stderr));
    assert!(text.contains("reason: missing required field \"symbol\""), "{text}");
    assert!(text.contains("5 dead letters shown (missing_field=5)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_window_flushes_commits_and_exits_zero() {
    let topic = create_topic("sigterm", 2).await;
    let produced = produce(&topic, &sample(800, 50, 43), None).await;
    let (dir, table) = table_dir();
    let group = unique("g");
    let config_file = write_config(dir.path(), &topic, &group, &table, "[flush]\ninterval = \"1h\"\n");
    let mut child = start(&config_file, &[]);
    // Long enough to join the group and read 800 messages; the window is an hour.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!table.join("_delta_log/00000000000000000001.json").exists(), "flushed before the window ended");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "SIGTERM exit status {exit}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_eq!(committed_offsets(&group, &topic, 2), end_offsets(&produced, 2));
}
