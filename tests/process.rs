//! The binary as a user runs it: SIGTERM mid-window flushes, commits and exits 0.
//! (SIGKILL at random moments is the kill loop of `tests/faults.rs`.)

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::*;

/// The line the worker logs (at debug) once every assigned partition is read to its end.
const READ_TO_END: &str = "read every assigned partition to its end";

/// Starts the binary; the receiver gets a signal each time it logs [`READ_TO_END`].
fn start(config_file: &std::path::Path, extra: &[&str]) -> (Child, Receiver<()>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_position-sink"))
        .arg("run")
        .arg("--config")
        .arg(config_file)
        .args(extra)
        .env("RUST_LOG", "warn,position_sink::worker=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start position-sink");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, read_to_end) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(READ_TO_END) {
                let _ = tx.send(());
            }
            eprintln!("  worker: {line}");
        }
    });
    (child, read_to_end)
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
        "[kafka]\nbrokers = \"{}\"\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n[delta]\ntable_uri = \"{}\"\n\
         [http]\nbind = \"127.0.0.1:0\"\n{extra}",
        brokers(),
        table.display()
    );
    std::fs::write(&file, text).expect("write config");
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_window_flushes_commits_and_exits_zero() {
    let topic = create_topic("sigterm", 2).await;
    let produced = produce(&topic, &sample(800, 50, 43), None).await;
    let (dir, table) = table_dir();
    let group = unique("g");
    let config_file = write_config(dir.path(), &topic, &group, &table, "[flush]\ninterval = \"1h\"\n");
    let (mut child, read_to_end) = start(&config_file, &[]);
    let read = tokio::task::spawn_blocking(move || read_to_end.recv_timeout(Duration::from_secs(90)).is_ok())
        .await
        .expect("join");
    assert!(read, "the worker did not read the stream to its end within 90 s");
    assert!(!table.join("_delta_log/00000000000000000001.json").exists(), "flushed before the window ended");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "SIGTERM exit status {exit}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert_eq!(committed_offsets(&group, &topic, 2), end_offsets(&produced, 2));
}
