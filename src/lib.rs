//! position-sink: Kafka position updates → a last-write-wins Delta Lake table,
//! exactly-once in effect.
//!
//! # Layout
//!
//! ```text
//!  Kafka (consumer group, manual offsets)                     kafka/ (clients, settings per
//!    │ key + value bytes, topic/partition/offset                kind, connection faults,
//!    ▼                                                          unreadable batches)
//!  decode + validate ── invalid ──▶ dead letter (bytes, coordinates, reason)
//!    │ PositionUpdate                     │                   decode/, worker/receive.rs
//!    ▼                                    ▼
//!  buffer: dedup per key, last write wins, dead letters kept  worker/batch.rs, update.rs
//!    │ flush every flush.interval, or early on size limits
//!    ▼                                                         worker/flush.rs (the order)
//!  dead letters → Delta table (append + txn offsets)          dead_letter/table.rs
//!    ▼
//!  Arrow record batch → merge into the files holding its keys  table/ (schema, key_index,
//!    (LWW) → one Delta commit: removes + adds + txn offsets      merge, files, commit;
//!                                                                saved_index: the key index
//!                                                                beside the table)
//!    ▼
//!  Kafka offset commit (after the Delta commits)              worker/commit.rs
//!    (or, with dead letters in a Kafka topic: one Kafka transaction with the
//!     dead letters and the offsets)                           dead_letter/topic.rs
//! ```
//!
//! The loop that ties these together is [`worker`] (`worker/mod.rs`); [`run`] is the
//! entry point used by the binary and by the tests. Where each partition reads from is
//! `worker/resume.rs`; the worker's bookkeeping per partition (its phase, what is
//! durable, what is committed) is the pure state machine of [`worker::partitions`].
//! Retries of I/O live in [`retry`], configuration in [`config`], live counters, health,
//! probes and metrics in [`status`], the operator's commands in [`ops`]. Crash points for
//! tests exist only with the `fault-injection` feature ([`faults`]).

pub mod config;
pub mod dead_letter;
pub mod decode;
pub mod delta;
pub mod faults;
pub mod history;
pub mod kafka;
pub mod maintenance;
pub mod offsets;
pub mod ops;
pub mod retry;
pub mod sample;
pub mod status;
pub mod table;
pub mod update;
pub mod worker;

pub use config::Config;
pub use status::{Progress, RunSummary};
#[cfg(feature = "fault-injection")]
pub use worker::run_with_crash_points;
pub use worker::{WorkerError, run, run_with_progress};
