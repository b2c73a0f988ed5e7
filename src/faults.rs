//! Crash points for the tests that prove recovery. They exist only with the cargo
//! feature `fault-injection`, which the test command enables; without it
//! [`CrashPoints`] has no fields and every check passes, so a build a user runs can
//! never abort or stall itself.
//!
//! Faults that can be injected from outside the product (storage failures, broker
//! outages, SIGKILL) are injected there instead; these are only the moments no outside
//! fault can hit precisely: between two commits of one flush, and inside maintenance
//! (a checkpoint half made, deletes half done, a compaction not yet committed).

#[cfg(feature = "fault-injection")]
use crate::status::Progress;

/// Where a test makes the worker crash or stall.
#[derive(Debug, Clone, Default)]
pub struct CrashPoints {
    /// Stop with an error right after this many positions-table commits, before
    /// committing their Kafka offsets: a crash between the Delta and Kafka commits.
    #[cfg(feature = "fault-injection")]
    pub crash_after_delta_commits: Option<usize>,
    /// Stop with an error at the this-many-th dead-letter write: with a dead-letter
    /// table, right after its commit and before the positions table's commit; with a
    /// dead-letter topic, with the transaction sent but left uncommitted.
    #[cfg(feature = "fault-injection")]
    pub crash_after_dead_letter_commits: Option<usize>,
    /// Stop with an error right after this many history-table commits, before the
    /// Kafka offsets of the same flush are committed.
    #[cfg(feature = "fault-injection")]
    pub crash_after_history_commits: Option<usize>,
    /// Abort the whole process (as SIGKILL would) right after a positions commit and
    /// before its Kafka commit, with this probability per commit (0 = never). For
    /// crash tests of the binary: [`ABORT_AFTER_DELTA_COMMIT_ENV`].
    #[cfg(feature = "fault-injection")]
    pub abort_after_delta_commit: f64,
    /// Before its first flush of a non-empty buffer, the worker waits for this to be
    /// notified, without polling Kafka: a stalled worker whose partitions are taken over
    /// meanwhile (a zombie).
    #[cfg(feature = "fault-injection")]
    pub hold_first_flush: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// Environment variable read by the binary built with `fault-injection`: the
/// probability (0..1) of aborting right after a Delta commit, before its Kafka commit.
#[cfg(feature = "fault-injection")]
pub const ABORT_AFTER_DELTA_COMMIT_ENV: &str = "POSITION_SINK_FAULT_ABORT_AFTER_DELTA_COMMIT";

impl CrashPoints {
    /// The gate to wait at before the first flush of a non-empty buffer (once).
    pub(crate) fn take_flush_hold(&mut self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        #[cfg(feature = "fault-injection")]
        return self.hold_first_flush.take();
        #[cfg(not(feature = "fault-injection"))]
        None
    }
}

#[cfg(feature = "fault-injection")]
impl CrashPoints {
    /// After a dead-letter table commit: the crash to report, if one is due.
    pub(crate) fn after_dead_letter_commit(&self, progress: &Progress) -> Option<&'static str> {
        is_due(self.crash_after_dead_letter_commits, Progress::get(&progress.dead_letter_commits))
            .then_some("after the dead-letter commit, before the positions commit")
    }

    /// After a history table commit: the crash to report, if one is due.
    pub(crate) fn after_history_commit(&self, progress: &Progress) -> Option<&'static str> {
        is_due(self.crash_after_history_commits, Progress::get(&progress.history_commits))
            .then_some("after the history commit, before the Kafka commit")
    }

    /// After a positions-table commit: the crash to report, if one is due; may abort
    /// the process instead.
    pub(crate) fn after_positions_commit(&self, progress: &Progress) -> Option<&'static str> {
        if is_due(self.crash_after_delta_commits, Progress::get(&progress.delta_commits)) {
            return Some("after the positions commit, before the Kafka commit");
        }
        self.maybe_abort();
        None
    }

    /// Whether the dead-letter transaction about to be sent is to be left open.
    pub(crate) fn leaves_transaction_open(&self, progress: &Progress) -> bool {
        is_due(self.crash_after_dead_letter_commits, Progress::get(&progress.dead_letter_commits))
    }

    /// Aborts the process with probability `abort_after_delta_commit`.
    fn maybe_abort(&self) {
        if self.abort_after_delta_commit <= 0.0 {
            return;
        }
        if draw() < self.abort_after_delta_commit {
            eprintln!("position-sink: injected abort after a Delta commit, before its Kafka commit");
            std::process::abort();
        }
    }

    /// Crash points from the environment of the binary ([`ABORT_AFTER_DELTA_COMMIT_ENV`]).
    ///
    /// # Errors
    /// When the variable is set but is not a probability.
    pub fn from_env() -> Result<Self, String> {
        let mut points = Self::default();
        if let Ok(text) = std::env::var(ABORT_AFTER_DELTA_COMMIT_ENV) {
            let p: f64 =
                text.parse().map_err(|_| format!("{ABORT_AFTER_DELTA_COMMIT_ENV}={text:?} is not a number"))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{ABORT_AFTER_DELTA_COMMIT_ENV}={p} is not a probability between 0 and 1"));
            }
            tracing::warn!(probability = p, "fault injection on: aborting after Delta commits");
            points.abort_after_delta_commit = p;
        }
        Ok(points)
    }
}

/// Environment variable read by the binary built with `fault-injection`: when set to
/// `1`, the process aborts (as SIGKILL would) after a compaction wrote its files and
/// before it commits them.
#[cfg(feature = "fault-injection")]
pub const ABORT_BEFORE_COMPACTION_COMMIT_ENV: &str = "POSITION_SINK_FAULT_ABORT_BEFORE_COMPACTION_COMMIT";

/// Environment variable read by the binary built with `fault-injection`: the
/// probability (0..1) of aborting (as SIGKILL would) at each point of maintenance that
/// [`maybe_abort_in_maintenance`] marks: with a checkpoint claimed but not written,
/// with a checkpoint written, halfway through log cleanup's or vacuum's deletes, and
/// with a compaction's files written but not committed.
#[cfg(feature = "fault-injection")]
pub const ABORT_IN_MAINTENANCE_ENV: &str = "POSITION_SINK_FAULT_ABORT_IN_MAINTENANCE";

/// Aborts the process if [`ABORT_BEFORE_COMPACTION_COMMIT_ENV`] asks for it, or with
/// the probability [`ABORT_IN_MAINTENANCE_ENV`] gives.
#[cfg(feature = "fault-injection")]
pub(crate) fn maybe_abort_before_compaction_commit() {
    if std::env::var(ABORT_BEFORE_COMPACTION_COMMIT_ENV).is_ok_and(|v| v == "1") {
        eprintln!("position-sink: injected abort after a compaction wrote its files, before its commit");
        std::process::abort();
    }
    maybe_abort_in_maintenance("with a compaction's files written, before its commit");
}

/// Aborts the process, saying `when`, with the probability [`ABORT_IN_MAINTENANCE_ENV`]
/// gives (never when it is unset).
#[cfg(feature = "fault-injection")]
pub(crate) fn maybe_abort_in_maintenance(when: &str) {
    if draws_abort(ABORT_IN_MAINTENANCE_ENV) {
        eprintln!("position-sink: injected abort in maintenance, {when}");
        std::process::abort();
    }
}

/// Whether an abort is drawn with the probability in the variable `name`.
#[cfg(feature = "fault-injection")]
fn draws_abort(name: &str) -> bool {
    let probability: f64 = std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    probability > 0.0 && draw() < probability
}

/// A number in 0..1 from the clock's nanoseconds.
#[cfg(feature = "fault-injection")]
fn draw() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    f64::from(nanos.wrapping_mul(2_654_435_761) % 1_000_000) / 1_000_000.0
}

#[cfg(feature = "fault-injection")]
fn is_due(after: Option<usize>, count: u64) -> bool {
    after.is_some_and(|n| count >= n as u64)
}
