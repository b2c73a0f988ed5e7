//! The worker's bookkeeping per assigned topic-partition, as one pure state machine:
//! what the table already holds, what was read, what is durable, what the group has
//! committed, and when a failed offset commit is tried again. Each method takes what
//! happened (and the time) and returns what the loop must do; the loop does the I/O.
//!
//! Invariants kept here:
//! - An offset is offered for commit only once it is durable (written by a flush or
//!   recorded by the table) and only for a partition still assigned; a revoked
//!   partition is forgotten at once, with its pending commits and retries.
//! - Offsets are committed until they stick: after a failed commit the durable offsets
//!   are offered again, with bounded backoff, until the group's committed offset equals
//!   the durable one, whether or not new messages arrive.
//! - With dead letters in a Delta table, a message below the table's recorded offset is
//!   skipped: the table holds it (and its dead letter) already.
//! - The table decides where reading resumes: after an assignment, a partition whose
//!   first message lies past the table's recorded offset + 1 (a lost or restored table
//!   behind the group) is read again from there; one the table has no record of is read
//!   from its start when `kafka.auto_offset_reset` is `earliest`, whatever the group's
//!   committed offset says.
//!
//! All offsets kept here are *next* offsets, as Kafka commits them (last + 1).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::kafka::CommitOutcome;
use crate::offsets::{Coordinates, Offset, OffsetMap, TopicPartition};

/// What the loop does with a message it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Buffer it: it is not in the table yet.
    Write,
    /// Drop it: the table holds it. With `seek_to`, also move reading forward to there
    /// (asked once per assignment; the rest are skipped one by one).
    Skip {
        /// Where the partition's next unwritten message is.
        seek_to: Option<Offset>,
    },
    /// Its partition is not assigned here yet, or where the table stands for it is not
    /// known yet: mark it assigned, load it, and ask again.
    Unknown,
    /// Drop it and read the partition again from `from`: the table is behind the
    /// group's committed offset, or has no record of the partition.
    Rewind {
        /// Where reading must start.
        from: Start,
    },
}

/// Where the table says reading a partition must start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At this offset: the table's recorded offset + 1.
    At(Offset),
    /// At the start of the log: the table has no record of the partition.
    Beginning,
}

/// What a commit result changed, for the log: once per failure streak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitNews {
    /// Nothing worth a line.
    Quiet,
    /// The first failure after a success: offsets are being retried.
    FailingSince(String),
    /// Commits succeed again after this many failed attempts.
    Recovered(u32),
}

/// One assigned partition: where reading it is, and the offsets its commits follow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PartitionState {
    /// Where reading it is.
    phase: Phase,
    /// One past the highest durable offset: what the group's committed offset should be.
    durable: Option<Offset>,
    /// The group's committed offset, as far as this worker knows.
    committed: Option<Offset>,
    /// The highest offset a commit request is pending for.
    sending: Option<Offset>,
}

/// Where reading an assigned partition is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Phase {
    /// Assigned; the table's record of it not read yet: its messages wait for it.
    #[default]
    Assigned,
    /// The table's record read: reading goes on as it decides.
    Loaded(Loaded),
}

/// A partition whose table record is read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Loaded {
    /// The table holds every message below this; they are skipped. Only when the
    /// table's record vouches for dead letters too.
    floor: Option<Offset>,
    /// Whether moving reading forward to `floor` was asked for.
    sought: bool,
    /// Reading against where the table says it starts.
    start: Move,
    /// What was read since the assignment.
    read: Read,
}

/// Reading a loaded partition against where the table says it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    /// The table does not say, or reading is already there: the group's committed
    /// offset says how far the partition is read.
    None,
    /// Reading is to be moved to this start, before (or instead of) the next message.
    Due(Start),
    /// Reading was moved to this start: from then on the group's committed offset no
    /// longer says how far the partition is read.
    Made(Start),
}

/// What was read of a loaded partition since the assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Nothing yet.
    Nothing,
    /// From `first` to `next` (one past the highest offset read).
    From { first: Offset, next: Offset },
    /// From `first`, then moved back to read again; nothing read since.
    Again { first: Offset },
}

impl Read {
    /// One past the highest offset read, unless reading was moved back since.
    fn next(self) -> Option<Offset> {
        match self {
            Read::From { next, .. } => Some(next),
            Read::Nothing | Read::Again { .. } => None,
        }
    }

    /// The first offset read since the assignment: where a move back goes when nothing is durable.
    fn first(self) -> Option<Offset> {
        match self {
            Read::From { first, .. } | Read::Again { first } => Some(first),
            Read::Nothing => None,
        }
    }

    /// `at` read.
    fn and(self, at: Offset) -> Read {
        let first = self.first().unwrap_or(at);
        let next = self.next().max(Some(at.next())).unwrap_or(at.next());
        Read::From { first, next }
    }

    /// Moved back to read again.
    fn again(self) -> Read {
        match self.first() {
            Some(first) => Read::Again { first },
            None => Read::Nothing,
        }
    }
}

impl PartitionState {
    /// Whether the group's committed offset is behind the durable one.
    fn is_behind(&self) -> bool {
        self.durable.is_some_and(|d| self.committed.is_none_or(|c| c < d))
    }

    /// Whether a commit of the durable offset is still to be sent (none is pending for it).
    fn needs_commit(&self) -> bool {
        self.is_behind() && self.durable.is_some_and(|d| self.sending.is_none_or(|s| s < d))
    }

    /// The loaded phase, if the table's record is read.
    fn loaded(&self) -> Option<&Loaded> {
        match &self.phase {
            Phase::Loaded(loaded) => Some(loaded),
            Phase::Assigned => None,
        }
    }

    /// Whether nothing was read since the assignment or the last move back.
    fn has_read_nothing(&self) -> bool {
        self.loaded().is_some_and(|l| l.read.next().is_none())
    }

    /// Where reading stands: the next offset that will be read.
    fn position(&self) -> Option<Offset> {
        let Some(loaded) = self.loaded() else { return self.committed };
        let next = loaded.read.next();
        match loaded.start {
            Move::Made(Start::At(start)) => next.max(Some(start)),
            Move::Made(Start::Beginning) => next,
            Move::None | Move::Due(_) => next.max(loaded.floor).max(self.committed),
        }
    }
}

/// The bookkeeping of every partition assigned to this worker.
pub struct Partitions {
    states: BTreeMap<TopicPartition, PartitionState>,
    /// Whether the table's recorded offsets let messages below them be skipped (dead
    /// letters in a table), or the group's committed offsets are the only record.
    skip_recorded: bool,
    /// Whether a partition the table has no record of is read from its start
    /// (`kafka.auto_offset_reset = "earliest"`).
    unrecorded_from_start: bool,
    retry: RetryConfig,
    /// Failed commit attempts in a row.
    failures: u32,
    /// When the next commit may be sent, during a failure streak.
    retry_at: Option<Instant>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl std::fmt::Debug for Partitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitions")
            .field("states", &self.states)
            .field("failures", &self.failures)
            .field("retry_at", &self.retry_at)
            .finish_non_exhaustive()
    }
}

impl Partitions {
    /// No partition assigned yet. `skip_recorded`: see the module docs; `retry` bounds
    /// the backoff between commit attempts.
    pub fn new(skip_recorded: bool, retry: &RetryConfig) -> Self {
        Self {
            states: BTreeMap::new(),
            skip_recorded,
            unrecorded_from_start: true,
            retry: retry.clone(),
            failures: 0,
            retry_at: None,
            delays: Box::new(crate::retry::backoff(retry)),
        }
    }

    /// Sets whether a partition the table has no record of is read from its start.
    pub fn with_unrecorded_from_start(mut self, from_start: bool) -> Self {
        self.unrecorded_from_start = from_start;
        self
    }

    /// Partitions handed to this worker: each starts afresh, its table record unknown.
    pub fn assigned(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.states.insert(tp.clone(), PartitionState::default());
        }
    }

    /// Partitions taken away: forgotten, with their pending commits and retries.
    pub fn revoked(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.states.remove(tp);
        }
    }

    /// Whether the table's recorded offsets are read on assignment (to skip below them).
    pub fn skips_recorded(&self) -> bool {
        self.skip_recorded
    }

    /// How many partitions are assigned.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether no partition is assigned.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The assigned partitions.
    pub fn assigned_partitions(&self) -> Vec<TopicPartition> {
        self.states.keys().cloned().collect()
    }

    /// Whether `tp` is assigned here.
    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.states.contains_key(tp)
    }

    /// Assigned partitions whose table record must be read before their messages are
    /// handled (when the record is not used to skip, loading them reads nothing).
    pub fn to_load(&self) -> Vec<TopicPartition> {
        self.states.iter().filter(|(_, s)| s.phase == Phase::Assigned).map(|(tp, _)| tp.clone()).collect()
    }

    /// The table's recorded offset of `tp` (the last offset it holds), read after the
    /// assignment. What the table holds is durable: the group may commit it.
    pub fn loaded(&mut self, tp: &TopicPartition, recorded: Option<Offset>) {
        let skip_recorded = self.skip_recorded;
        let from_start = self.unrecorded_from_start;
        let Some(state) = self.states.get_mut(tp) else { return };
        let start = match recorded {
            Some(last) => Move::Due(Start::At(last.next())),
            None if from_start => Move::Due(Start::Beginning),
            None => Move::None,
        };
        let floor = recorded.filter(|_| skip_recorded).map(Offset::next);
        state.durable = state.durable.max(floor);
        state.phase = Phase::Loaded(Loaded { floor, sought: false, start, read: Read::Nothing });
    }

    /// Whether [`Partitions::seen`] will say to write or skip a message read at `at`
    /// (not that its partition is unknown, nor to move back).
    pub fn is_ready_for(&self, at: &Coordinates) -> bool {
        let Some(PartitionState { phase: Phase::Loaded(loaded), .. }) = self.states.get(&at.tp) else { return false };
        let behind = match loaded.start {
            Move::Due(Start::At(offset)) => at.offset > offset,
            Move::Due(Start::Beginning) => at.offset > Offset(0),
            Move::None | Move::Made(_) => false,
        };
        !behind
    }

    /// Whether some partition's recorded offsets are still to be read ([`Partitions::to_load`]).
    pub fn has_to_load(&self) -> bool {
        self.states.values().any(|s| s.phase == Phase::Assigned)
    }

    /// A message was read: whether to buffer it or skip it.
    pub fn seen(&mut self, at: &Coordinates) -> Seen {
        let Some(state) = self.states.get_mut(&at.tp) else { return Seen::Unknown };
        let Phase::Loaded(loaded) = &mut state.phase else { return Seen::Unknown };
        if let Move::Due(start) = loaded.start {
            let behind = match start {
                Start::At(offset) => at.offset > offset,
                Start::Beginning => at.offset > Offset(0),
            };
            if behind {
                loaded.start = Move::Made(start);
                return Seen::Rewind { from: start };
            }
            loaded.start = Move::None;
        }
        loaded.read = loaded.read.and(at.offset);
        match loaded.floor {
            Some(floor) if at.offset < floor => {
                let seek_to = (!loaded.sought).then_some(floor);
                loaded.sought = true;
                Seen::Skip { seek_to }
            }
            _ => Seen::Write,
        }
    }

    /// Reading could not be moved to `from`: ask for it again at the next message.
    pub fn rewind_failed(&mut self, tp: &TopicPartition, from: Start) {
        if let Some(PartitionState { phase: Phase::Loaded(loaded), .. }) = self.states.get_mut(tp) {
            loaded.start = Move::Due(from);
        }
    }

    /// Where loaded partitions must be moved before anything is read, as the table
    /// decides. With the dead letters in a table, every start; with them in a Kafka
    /// topic only moves back (to the start of the log, or behind the group's committed
    /// offset): moving forward past the group's committed offset would skip dead letters
    /// that are not durable yet.
    pub fn starts_due(&self) -> Vec<(TopicPartition, Start)> {
        self.states
            .iter()
            .filter(|(_, s)| s.has_read_nothing())
            .filter_map(|(tp, s)| match s.loaded()?.start {
                Move::Due(Start::At(start)) if self.skip_recorded || s.committed.is_some_and(|c| start < c) => {
                    Some((tp.clone(), Start::At(start)))
                }
                Move::Due(Start::Beginning) => Some((tp.clone(), Start::Beginning)),
                Move::Due(Start::At(_)) | Move::None | Move::Made(_) => None,
            })
            .collect()
    }

    /// Whether a start waits for the group's committed offset to be known (dead letters
    /// in a topic, where only moves back are made before reading).
    pub fn starts_wait_for_committed(&self) -> bool {
        !self.skip_recorded
            && self.states.values().any(|s| {
                s.has_read_nothing()
                    && s.committed.is_none()
                    && s.loaded().is_some_and(|l| matches!(l.start, Move::Due(Start::At(_))))
            })
    }

    /// Reading of `tp` was moved to `start`.
    pub fn moved_to_start(&mut self, tp: &TopicPartition, start: Start) {
        if let Some(PartitionState { phase: Phase::Loaded(loaded), .. }) = self.states.get_mut(tp) {
            loaded.start = Move::Made(start);
            loaded.sought = true;
        }
    }

    /// A flush covering `offsets` (last offset per partition) is durable.
    pub fn flushed(&mut self, offsets: &OffsetMap) {
        for (tp, last) in offsets.iter() {
            if let Some(state) = self.states.get_mut(tp) {
                state.durable = state.durable.max(Some(last.next()));
            }
        }
    }

    /// A flush covering `offsets` is durable and its offsets were committed with it
    /// (in the dead-letter topic's transaction).
    pub fn flushed_and_committed(&mut self, offsets: &OffsetMap) {
        self.flushed(offsets);
        for (tp, last) in offsets.iter() {
            if let Some(state) = self.states.get_mut(tp) {
                state.committed = state.committed.max(Some(last.next()));
            }
        }
    }

    /// The durable offsets (last offset per partition) to commit now; they count as
    /// sent until [`Self::commit_finished`] reports on them. Empty while a failed commit
    /// waits for its retry.
    pub fn commits_due(&mut self, now: Instant) -> OffsetMap {
        let mut due = OffsetMap::default();
        if self.retry_at.is_some_and(|at| now < at) {
            return due;
        }
        for (tp, state) in &mut self.states {
            if state.needs_commit()
                && let Some(durable) = state.durable
            {
                state.sending = Some(durable);
                due.observe(tp, Offset(durable.0 - 1));
            }
        }
        due
    }

    /// The result of a commit request: per partition, the next offset it asked for and
    /// whether the group took it. A failure makes the durable offsets due again after a
    /// backoff.
    pub fn commit_finished(&mut self, outcome: &CommitOutcome, now: Instant) -> CommitNews {
        let mut failed = None;
        for (tp, next, result) in outcome {
            let Some(state) = self.states.get_mut(tp) else { continue };
            if state.sending.is_some_and(|s| s <= *next) {
                state.sending = None;
            }
            match result {
                Ok(()) => state.committed = state.committed.max(Some(*next)),
                Err(error) => {
                    failed.get_or_insert_with(|| error.clone());
                }
            }
        }
        match failed {
            Some(error) => {
                self.failures += 1;
                let delay = self.delays.next().unwrap_or(self.retry.max_delay);
                self.retry_at = Some(now + delay);
                if self.failures == 1 { CommitNews::FailingSince(error) } else { CommitNews::Quiet }
            }
            None if self.failures > 0 && outcome.iter().any(|(tp, _, _)| self.is_assigned(tp)) => {
                let failures = std::mem::take(&mut self.failures);
                self.retry_at = None;
                self.delays = Box::new(crate::retry::backoff(&self.retry));
                CommitNews::Recovered(failures)
            }
            None => CommitNews::Quiet,
        }
    }

    /// The commit request's answer was lost (its task failed): everything sent counts
    /// as refused.
    pub fn commit_lost(&mut self, now: Instant) -> CommitNews {
        let outcome: CommitOutcome = self
            .states
            .iter()
            .filter_map(|(tp, s)| Some((tp.clone(), s.sending?, Err("the commit's answer was lost".to_string()))))
            .collect();
        self.commit_finished(&outcome, now)
    }

    /// When a failed commit is to be tried again, if one waits for it.
    pub fn commit_retry_at(&self) -> Option<Instant> {
        self.retry_at.filter(|_| self.states.values().any(PartitionState::needs_commit))
    }

    /// Whether the group has committed every durable offset of the assigned partitions.
    pub fn is_fully_committed(&self) -> bool {
        !self.states.values().any(PartitionState::is_behind)
    }

    /// Failed commit attempts in the current streak.
    pub fn commit_failures(&self) -> u32 {
        self.failures
    }

    /// The messages of `partitions` read since their last durable offset are to be read
    /// again (their flush was not committed): where to move reading back to, for those
    /// still assigned.
    pub fn rewind(&mut self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, Offset)> {
        let mut seeks = Vec::new();
        for tp in partitions {
            let Some(state) = self.states.get_mut(tp) else { continue };
            let first = state.loaded().and_then(|l| l.read.first());
            if let Phase::Loaded(loaded) = &mut state.phase {
                loaded.read = loaded.read.again();
            }
            if let Some(target) = state.durable.or(state.committed).or(first) {
                seeks.push((tp.clone(), target));
            }
        }
        seeks
    }

    /// Assigned partitions whose position is unknown (nothing read, no table record, no
    /// committed offset known): the group's committed offset tells where they stand.
    pub fn unknown_positions(&self) -> Vec<TopicPartition> {
        self.states.iter().filter(|(_, s)| s.position().is_none()).map(|(tp, _)| tp.clone()).collect()
    }

    /// The group's committed offset (next offset) of each assigned partition, where known.
    pub fn committed_offsets(&self) -> Vec<(TopicPartition, Option<Offset>)> {
        self.states.iter().map(|(tp, s)| (tp.clone(), s.committed)).collect()
    }

    /// The group's committed offsets, looked up (next offsets).
    pub fn committed_looked_up(&mut self, found: &[(TopicPartition, Offset)]) {
        for (tp, next) in found {
            if let Some(state) = self.states.get_mut(tp) {
                state.committed = state.committed.max(Some(*next));
            }
        }
    }

    /// Whether every assigned partition is read to its end. `watermarks` gives a
    /// partition's log start and end (the next offset to be written), when known; a
    /// partition whose position is unknown stands at its log start. False with nothing
    /// assigned.
    pub fn is_read_to_end(&self, watermarks: impl Fn(&TopicPartition) -> Option<(Offset, Offset)>) -> bool {
        !self.is_empty()
            && self.states.iter().all(|(tp, s)| match watermarks(tp) {
                Some((low, high)) => s.position().unwrap_or(low) >= high,
                None => false,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryConfig {
        RetryConfig { min_delay: Duration::from_millis(100), max_delay: Duration::from_secs(2), max_retries: 3 }
    }

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    fn at(p: i32, offset: i64) -> Coordinates {
        Coordinates { tp: tp(p), offset: Offset(offset) }
    }

    fn offsets(entries: &[(i32, i64)]) -> OffsetMap {
        let mut map = OffsetMap::default();
        for (p, o) in entries {
            map.observe(&tp(*p), Offset(*o));
        }
        map
    }

    fn pairs(map: &OffsetMap) -> Vec<(i32, i64)> {
        map.iter().map(|(tp, o)| (tp.partition.0, o.0)).collect()
    }

    fn ok(p: i32, next: i64) -> (TopicPartition, Offset, Result<(), String>) {
        (tp(p), Offset(next), Ok(()))
    }

    fn failed(p: i32, next: i64) -> (TopicPartition, Offset, Result<(), String>) {
        (tp(p), Offset(next), Err("Local: Waiting for coordinator".into()))
    }

    /// Partition 0 assigned and loaded with the table's record `recorded`.
    fn assigned_with(recorded: Option<i64>) -> Partitions {
        let mut p = Partitions::new(true, &policy());
        p.assigned(&[tp(0)]);
        assert_eq!(p.to_load(), [tp(0)]);
        p.loaded(&tp(0), recorded.map(Offset));
        assert!(p.to_load().is_empty());
        p
    }

    #[test]
    fn a_table_behind_the_group_is_read_again_from_its_record() {
        let mut p = assigned_with(Some(41));
        // The group's committed offset is 500: the table lost 42..500 (a restore).
        assert_eq!(p.seen(&at(0, 500)), Seen::Rewind { from: Start::At(Offset(42)) });
        assert_eq!(p.seen(&at(0, 42)), Seen::Write, "asked once; then reading goes on from there");
        assert_eq!(pairs(&p.commits_due(Instant::now())), [(0, 41)], "only what the table holds is committed");
    }

    #[test]
    fn a_partition_the_table_has_no_record_of_is_read_from_its_start_whatever_the_group_says() {
        let mut p = assigned_with(None);
        assert_eq!(p.seen(&at(0, 300)), Seen::Rewind { from: Start::Beginning });
        assert_eq!(p.seen(&at(0, 0)), Seen::Write);
        let mut fresh = assigned_with(None);
        assert_eq!(fresh.seen(&at(0, 0)), Seen::Write, "already at the start");
        let mut latest = Partitions::new(true, &policy()).with_unrecorded_from_start(false);
        latest.assigned(&[tp(0)]);
        latest.loaded(&tp(0), None);
        assert_eq!(latest.seen(&at(0, 300)), Seen::Write, "auto_offset_reset = latest keeps the group's position");
    }

    #[test]
    fn reading_is_moved_to_the_table_start_before_any_message_and_the_group_offset_no_longer_counts() {
        let mut p = assigned_with(Some(41));
        p.committed_looked_up(&[(tp(0), Offset(500))]);
        assert!(p.is_read_to_end(|_| Some((Offset(0), Offset(500)))), "as the group sees it");
        assert_eq!(p.starts_due(), [(tp(0), Start::At(Offset(42)))]);
        p.moved_to_start(&tp(0), Start::At(Offset(42)));
        assert!(p.starts_due().is_empty());
        assert!(!p.is_read_to_end(|_| Some((Offset(0), Offset(500)))), "42..500 is to be read again");
        assert_eq!(p.seen(&at(0, 42)), Seen::Write);
        p.seen(&at(0, 499));
        assert!(p.is_read_to_end(|_| Some((Offset(0), Offset(500)))));
        // Without a record: from the log start.
        let mut fresh = assigned_with(None);
        fresh.committed_looked_up(&[(tp(0), Offset(500))]);
        assert_eq!(fresh.starts_due(), [(tp(0), Start::Beginning)]);
        fresh.moved_to_start(&tp(0), Start::Beginning);
        assert!(!fresh.is_read_to_end(|_| Some((Offset(0), Offset(500)))));
        // Dead letters in a topic: moved back behind the group's committed offset, never forward.
        let mut topic = Partitions::new(false, &policy());
        topic.assigned(&[tp(0), tp(1)]);
        topic.loaded(&tp(0), Some(Offset(41)));
        topic.loaded(&tp(1), Some(Offset(41)));
        assert!(topic.starts_due().is_empty() && topic.starts_wait_for_committed());
        topic.committed_looked_up(&[(tp(0), Offset(500)), (tp(1), Offset(30))]);
        assert!(!topic.starts_wait_for_committed());
        assert_eq!(topic.starts_due(), [(tp(0), Start::At(Offset(42)))], "partition 1 would move forward");
    }

    #[test]
    fn a_rewind_that_could_not_be_done_is_asked_for_again() {
        let mut p = assigned_with(Some(9));
        assert_eq!(p.seen(&at(0, 50)), Seen::Rewind { from: Start::At(Offset(10)) });
        p.rewind_failed(&tp(0), Start::At(Offset(10)));
        assert_eq!(p.seen(&at(0, 51)), Seen::Rewind { from: Start::At(Offset(10)) });
    }

    #[test]
    fn messages_of_a_partition_not_yet_loaded_wait_for_its_table_record() {
        let mut p = Partitions::new(true, &policy());
        assert_eq!(p.seen(&at(0, 0)), Seen::Unknown, "not assigned");
        p.assigned(&[tp(0)]);
        assert_eq!(p.seen(&at(0, 0)), Seen::Unknown, "table record not read");
        p.loaded(&tp(0), None);
        assert_eq!(p.seen(&at(0, 0)), Seen::Write);
    }

    #[test]
    fn assignment_with_a_recorded_offset_skips_below_it_seeks_once_and_commits_it() {
        let mut p = assigned_with(Some(41));
        let now = Instant::now();
        assert!(!p.is_fully_committed(), "the table's record is not known to be committed");
        assert_eq!(p.seen(&at(0, 10)), Seen::Skip { seek_to: Some(Offset(42)) });
        assert_eq!(p.seen(&at(0, 11)), Seen::Skip { seek_to: None }, "the seek is asked for once");
        assert_eq!(p.seen(&at(0, 42)), Seen::Write);
        assert_eq!(pairs(&p.commits_due(now)), [(0, 41)]);
        assert!(p.commits_due(now).is_empty(), "a pending commit is not sent twice");
        assert_eq!(p.commit_finished(&vec![ok(0, 42)], now), CommitNews::Quiet);
        assert!(p.is_fully_committed());
    }

    #[test]
    fn assignment_without_a_recorded_offset_writes_everything_and_commits_nothing_yet() {
        let mut p = assigned_with(None);
        assert_eq!(p.seen(&at(0, 0)), Seen::Write);
        assert!(p.commits_due(Instant::now()).is_empty());
        assert!(p.is_fully_committed());
    }

    #[test]
    fn with_dead_letters_in_a_topic_the_table_record_is_not_a_floor() {
        let mut p = Partitions::new(false, &policy());
        p.assigned(&[tp(0)]);
        p.loaded(&tp(0), Some(Offset(41)));
        assert_eq!(p.seen(&at(0, 10)), Seen::Write);
        assert!(p.commits_due(Instant::now()).is_empty(), "only the group's offsets record dead letters");
    }

    #[test]
    fn a_durable_flush_is_committed_once_and_then_the_partition_is_clean() {
        let mut p = assigned_with(None);
        let now = Instant::now();
        p.seen(&at(0, 5));
        p.flushed(&offsets(&[(0, 5)]));
        assert_eq!(pairs(&p.commits_due(now)), [(0, 5)]);
        assert!(!p.is_fully_committed());
        p.commit_finished(&vec![ok(0, 6)], now);
        assert!(p.is_fully_committed());
        assert!(p.commits_due(now).is_empty());
    }

    #[test]
    fn a_flush_committed_in_the_dead_letter_transaction_needs_no_commit() {
        let mut p = Partitions::new(false, &policy());
        p.assigned(&[tp(0)]);
        p.loaded(&tp(0), None);
        p.flushed_and_committed(&offsets(&[(0, 9)]));
        assert!(p.commits_due(Instant::now()).is_empty());
        assert!(p.is_fully_committed());
    }

    #[test]
    fn a_failed_commit_is_retried_with_backoff_without_new_messages_until_it_sticks() {
        let mut p = assigned_with(None);
        let start = Instant::now();
        p.flushed(&offsets(&[(0, 5)]));
        let sent = p.commits_due(start);
        assert_eq!(
            p.commit_finished(&vec![failed(0, 6)], start),
            CommitNews::FailingSince("Local: Waiting for coordinator".into())
        );
        let retry_at = p.commit_retry_at().expect("a retry is scheduled");
        assert!(retry_at > start && retry_at <= start + policy().max_delay);
        assert!(p.commits_due(start).is_empty(), "not before the backoff");
        assert_eq!(p.commits_due(retry_at), sent, "the same durable offsets again");
        assert_eq!(p.commit_finished(&vec![failed(0, 6)], retry_at), CommitNews::Quiet, "logged once per streak");
        assert_eq!(p.commit_failures(), 2);
        let again = p.commit_retry_at().expect("still retried");
        assert!(again > retry_at && again <= retry_at + policy().max_delay, "the backoff is bounded");
        assert_eq!(pairs(&p.commits_due(again)), [(0, 5)]);
        assert_eq!(p.commit_finished(&vec![ok(0, 6)], again), CommitNews::Recovered(2));
        assert!(p.is_fully_committed());
        assert_eq!(p.commit_retry_at(), None);
    }

    #[test]
    fn backoff_stays_within_the_configured_bounds_over_a_long_streak() {
        let mut p = assigned_with(None);
        let mut now = Instant::now();
        p.flushed(&offsets(&[(0, 5)]));
        for _ in 0..50 {
            assert_eq!(p.commits_due(now).len(), 1);
            p.commit_finished(&vec![failed(0, 6)], now);
            let at = p.commit_retry_at().expect("retried");
            assert!(at - now <= policy().max_delay, "{:?}", at - now);
            now = at;
        }
    }

    #[test]
    fn a_commit_whose_answer_is_lost_is_retried_like_a_refused_one() {
        let mut p = assigned_with(None);
        let now = Instant::now();
        p.flushed(&offsets(&[(0, 5)]));
        p.commits_due(now);
        assert!(matches!(p.commit_lost(now), CommitNews::FailingSince(_)));
        let retry_at = p.commit_retry_at().expect("retried");
        assert_eq!(pairs(&p.commits_due(retry_at)), [(0, 5)]);
    }

    #[test]
    fn a_newer_durable_offset_is_sent_while_an_older_commit_is_pending() {
        let mut p = assigned_with(None);
        let now = Instant::now();
        p.flushed(&offsets(&[(0, 5)]));
        p.commits_due(now);
        p.flushed(&offsets(&[(0, 9)]));
        assert_eq!(pairs(&p.commits_due(now)), [(0, 9)]);
        // The older one's result leaves the newer one pending.
        p.commit_finished(&vec![ok(0, 6)], now);
        assert!(!p.is_fully_committed());
        p.commit_finished(&vec![ok(0, 10)], now);
        assert!(p.is_fully_committed());
    }

    #[test]
    fn a_revoked_partition_is_dropped_from_commits_and_retries() {
        let mut p = Partitions::new(true, &policy());
        p.assigned(&[tp(0), tp(1)]);
        p.loaded(&tp(0), None);
        p.loaded(&tp(1), None);
        let now = Instant::now();
        p.flushed(&offsets(&[(0, 5), (1, 7)]));
        p.commits_due(now);
        p.commit_finished(&vec![failed(0, 6), failed(1, 8)], now);
        p.revoked(&[tp(1)]);
        let retry_at = p.commit_retry_at().expect("partition 0 still retried");
        assert_eq!(pairs(&p.commits_due(retry_at)), [(0, 5)]);
        p.revoked(&[tp(0)]);
        assert_eq!(p.commit_retry_at(), None, "nothing left to retry");
        assert!(p.is_fully_committed());
        // A late result for a revoked partition changes nothing.
        assert_eq!(p.commit_finished(&vec![ok(0, 6)], retry_at), CommitNews::Quiet);
    }

    #[test]
    fn revocation_mid_flush_ignores_the_flush_for_the_revoked_partition() {
        let mut p = assigned_with(None);
        p.seen(&at(0, 3));
        p.revoked(&[tp(0)]);
        p.flushed(&offsets(&[(0, 3)]));
        assert!(p.commits_due(Instant::now()).is_empty(), "offsets of a revoked partition are never committed");
        // Assigned again later: it starts afresh and is loaded again.
        p.assigned(&[tp(0)]);
        assert_eq!(p.to_load(), [tp(0)]);
        assert_eq!(p.seen(&at(0, 3)), Seen::Unknown);
    }

    #[test]
    fn rewind_after_an_aborted_transaction_goes_back_to_the_last_durable_offset() {
        // Reading starts where the group stands (auto_offset_reset = latest), not at the log start.
        let mut p = Partitions::new(false, &policy()).with_unrecorded_from_start(false);
        p.assigned(&[tp(0), tp(1), tp(2)]);
        for i in 0..3 {
            p.loaded(&tp(i), None);
        }
        // Partition 0: a flush was committed before; 1: nothing durable, read from 20;
        // 2: the group's committed offset is known.
        p.seen(&at(0, 4));
        p.flushed_and_committed(&offsets(&[(0, 4)]));
        p.seen(&at(0, 5));
        p.seen(&at(0, 6));
        p.seen(&at(1, 20));
        p.seen(&at(1, 21));
        p.committed_looked_up(&[(tp(2), Offset(30))]);
        p.seen(&at(2, 30));
        let seeks = p.rewind(&[tp(0), tp(1), tp(2), tp(3)]);
        assert_eq!(seeks, [(tp(0), Offset(5)), (tp(1), Offset(20)), (tp(2), Offset(30))]);
        assert!(!p.is_read_to_end(|_| Some((Offset(0), Offset(7)))), "what was read is to be read again");
    }

    #[test]
    fn read_to_end_counts_the_table_record_and_the_group_offset_for_partitions_with_nothing_read() {
        let mut p = Partitions::new(true, &policy());
        assert!(!p.is_read_to_end(|_| Some((Offset(0), Offset(0)))), "nothing assigned yet");
        p.assigned(&[tp(0), tp(1), tp(2), tp(3)]);
        for i in 0..4 {
            p.loaded(&tp(i), if i == 0 { Some(Offset(9)) } else { None });
        }
        // Partition 3's log was emptied by retention: it starts and ends at 8.
        let marks = |t: &TopicPartition| Some([(0, 10), (0, 5), (0, 0), (8, 8)][t.partition.0 as usize]);
        let watermarks = |t: &TopicPartition| marks(t).map(|(l, h)| (Offset(l), Offset(h)));
        assert_eq!(p.unknown_positions(), [tp(1), tp(2), tp(3)]);
        assert!(!p.is_read_to_end(watermarks), "partition 1's position is unknown");
        p.committed_looked_up(&[(tp(1), Offset(5))]);
        assert_eq!(p.unknown_positions(), [tp(2), tp(3)]);
        assert!(p.is_read_to_end(watermarks), "empty partitions are at their end");
        assert!(!p.is_read_to_end(|_| None), "an unknown high watermark is not an end");
        p.seen(&at(0, 10));
        assert!(!p.is_read_to_end(|t| if t.partition.0 == 0 { Some((Offset(0), Offset(12))) } else { watermarks(t) }));
    }

    #[test]
    fn reading_records_the_first_and_next_offsets_and_a_move_back_keeps_only_the_first() {
        let read = Read::Nothing.and(Offset(5));
        assert_eq!(read, Read::From { first: Offset(5), next: Offset(6) });
        let read = read.and(Offset(9)).and(Offset(7));
        assert_eq!(read, Read::From { first: Offset(5), next: Offset(10) }, "next only grows");
        assert_eq!(read.again(), Read::Again { first: Offset(5) });
        assert_eq!(read.again().and(Offset(5)), Read::From { first: Offset(5), next: Offset(6) });
        assert_eq!(Read::Nothing.again(), Read::Nothing);
    }

    #[test]
    fn each_phase_is_entered_by_its_transition() {
        let mut p = Partitions::new(true, &policy());
        p.assigned(&[tp(0)]);
        assert_eq!(p.states[&tp(0)].phase, Phase::Assigned);
        assert_eq!(p.seen(&at(0, 3)), Seen::Unknown, "an assigned partition's messages wait for its record");
        p.loaded(&tp(0), Some(Offset(9)));
        let loaded = |p: &Partitions| p.states[&tp(0)].loaded().cloned().expect("loaded");
        assert_eq!(
            loaded(&p),
            Loaded {
                floor: Some(Offset(10)),
                sought: false,
                start: Move::Due(Start::At(Offset(10))),
                read: Read::Nothing
            }
        );
        p.moved_to_start(&tp(0), Start::At(Offset(10)));
        assert_eq!((loaded(&p).start, loaded(&p).sought), (Move::Made(Start::At(Offset(10))), true));
        assert_eq!(p.seen(&at(0, 10)), Seen::Write);
        assert_eq!(loaded(&p).read, Read::From { first: Offset(10), next: Offset(11) });
        p.rewind(&[tp(0)]);
        assert_eq!(loaded(&p).read, Read::Again { first: Offset(10) });
        p.rewind_failed(&tp(0), Start::At(Offset(10)));
        assert_eq!(loaded(&p).start, Move::Due(Start::At(Offset(10))));
        p.revoked(&[tp(0)]);
        assert!(p.is_empty());
    }
}
