//! The binary as a user runs it: SIGTERM mid-window flushes, commits and exits 0.
//! (SIGKILL at random moments is the kill loop of `tests/faults.rs`.)

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The line the worker logs (at debug) once every assigned partition is read to its end.
const READ_TO_END: &str = "read every assigned partition to its end";

/// Starts the binary; the receiver gets a signal each time it logs [`READ_TO_END`].
fn start(config_file: &std::path::Path) -> (std::process::Child, std::sync::mpsc::Receiver<()>) {
    let file = config_file.display().to_string();
    spawn_binary(&["run", "--config", &file], &[], "warn,position_sink::worker=debug", READ_TO_END)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_window_flushes_commits_and_exits_zero() {
    let topic = create_topic("sigterm", 2).await;
    let produced = produce(&topic, &sample(800, 50, 43), None).await;
    let (dir, table) = table_dir();
    let group = unique("g");
    let mut config = config(&topic, &group, &table);
    config.flush.interval = Duration::from_secs(3600);
    let config_file = write_config_file(dir.path(), &config);
    let (mut child, read_to_end) = start(&config_file);
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
