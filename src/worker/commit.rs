//! Kafka offset commits of durable offsets: sent one request at a time off the async
//! threads, their results booked, retried with backoff until they stick, and the last
//! ones made at shutdown within `worker.shutdown_timeout`.

use tokio::time::Instant;
use tracing::{info, warn};

use super::partitions::CommitNews;
use super::{Worker, WorkerError, join, sleep_until};
use crate::kafka::{self, CommitOutcome};
use crate::status::Progress;

impl Worker {
    /// Starts committing the durable offsets that are due, unless a commit is waiting
    /// for its answer already.
    pub(super) fn send_due_commits(&mut self) {
        if self.committing.is_some() {
            return;
        }
        self.apply_rebalances();
        let due = self.partitions.commits_due(Instant::now());
        if due.is_empty() {
            return;
        }
        let consumer = self.consumer.clone();
        self.committing = Some(tokio::task::spawn_blocking(move || kafka::commit(&consumer, &due)));
    }

    /// Books the result of a commit request.
    pub(super) fn commit_finished(&mut self, outcome: Result<CommitOutcome, WorkerError>) {
        self.committing = None;
        let news = match outcome {
            Ok(outcome) => {
                if outcome.iter().any(|(_, _, result)| result.is_err()) {
                    Progress::bump(&self.progress.kafka_commit_failures);
                }
                self.partitions.commit_finished(&outcome, Instant::now())
            }
            Err(error) => {
                warn!(%error, "the offset commit task failed; the offsets are committed again");
                Progress::bump(&self.progress.kafka_commit_failures);
                self.partitions.commit_lost(Instant::now())
            }
        };
        self.log_commit_news(news);
    }

    /// One line when commits start failing, one when they succeed again.
    pub(super) fn log_commit_news(&self, news: CommitNews) {
        match news {
            CommitNews::Quiet => {}
            CommitNews::FailingSince(error) => warn!(
                %error,
                "Kafka offset commit failed; retrying with backoff until it succeeds \
                 (the table's recorded offsets cover the data meanwhile)"
            ),
            CommitNews::Recovered(failures) => info!(failed_attempts = failures, "Kafka offset commits succeed again"),
        }
    }

    /// Commits the durable offsets, retrying failures, until the group has them all or
    /// `deadline` passes.
    pub(super) async fn commit_durable_until(&mut self, deadline: Instant) {
        loop {
            self.send_due_commits();
            if self.partitions.is_fully_committed() {
                return;
            }
            let committing = self.committing.is_some();
            let commit_retry = self.partitions.commit_retry_at();
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => {
                    warn!(
                        failed_attempts = self.partitions.commit_failures(),
                        "the final Kafka offset commit did not succeed within worker.shutdown_timeout; \
                         the table's recorded offsets cover it and the next worker resumes from them"
                    );
                    return;
                }
                outcome = join(&mut self.committing), if committing => self.commit_finished(outcome),
                () = sleep_until(commit_retry), if commit_retry.is_some() => {}
            }
        }
    }
}
