//! The binary as a user runs it: SIGTERM mid-window flushes, commits, saves the key
//! index and exits 0; the next start reads that index.
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

    // The stop saved the key index; the next start reads it before its first flush
    // instead of every file's keys, and the table stays exact.
    let saved = table.join(position_sink::table::saved_index::OBJECT);
    assert!(saved.exists(), "the key index was not saved at shutdown");
    let mut produced = produced;
    produced.extend(produce(&topic, &sample(300, 60, 44), None).await);
    config.flush.interval = Duration::from_millis(500);
    let config_file = write_config_file(dir.path(), &config);
    let file = config_file.display().to_string();
    let (mut child, loaded) =
        spawn_binary(&["run", "--config", &file], &[], "warn,position_sink::table=info", "read the saved key index");
    let read =
        tokio::task::spawn_blocking(move || loaded.recv_timeout(Duration::from_secs(90)).is_ok()).await.expect("join");
    assert!(read, "the restarted worker did not read the saved key index within 90 s");
    let ends = end_offsets(&produced, 2);
    wait_until(Duration::from_secs(90), "the new messages committed", async || {
        committed_offsets(&group, &topic, 2) == ends
    })
    .await;
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "SIGTERM exit status {exit}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
}
