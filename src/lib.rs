//! position-sink: Kafka position updates → a last-write-wins Delta Lake table,
//! exactly-once in effect.
//!
//! # Layout
//!
//! ```text
//!  Kafka (consumer group, manual offsets)             kafka/ (settings per client kind,
//!                                                      connection faults, unreadable batches)
//!    │ key + value bytes, topic/partition/offset
//!    ▼
//!  decode + validate ── invalid ──▶ dead letter (bytes, coordinates, reason)
//!    │ PositionUpdate                     │                   decode.rs, dead_letter/
//!    ▼                                    ▼
//!  buffer: dedup per key, last write wins, dead letters kept  batch.rs, update.rs
//!    │ flush every flush.interval, or early on size limits
//!    ▼                                                         sink.rs (the order)
//!  dead letters → Delta table (append + txn offsets)          dead_letter/table.rs
//!    ▼
//!  Arrow record batch → merge into the files holding its keys  arrow.rs, key_index.rs,
//!    (LWW) → one Delta commit: removes + adds + txn offsets      rewrite.rs, table.rs
//!    ▼
//!  Kafka offset commit (after the Delta commits)              kafka/
//!    (or, with dead letters in a Kafka topic: one Kafka transaction with the
//!     dead letters and the offsets)                           dead_letter/topic.rs
//! ```
//!
//! The loop that ties these together is [`worker`]; [`run`] is the entry point used
//! by the binary and by the tests. The worker's bookkeeping per partition (what is
//! durable, what is committed, what to skip, where to seek) is the pure state machine
//! of [`partitions`]. The order of one flush's writes is [`sink`]'s; retries of I/O
//! live in [`retry`], configuration in [`config`], live counters and health in
//! [`status`]. Crash points for tests exist only with the `fault-injection` feature
//! ([`faults`]).

pub mod arrow;
pub mod batch;
pub mod config;
pub mod dead_letter;
pub mod decode;
pub mod delta;
pub mod faults;
pub mod http;
pub mod kafka;
pub mod key_index;
pub mod metrics;
pub mod offsets;
pub mod ops;
pub mod partitions;
pub mod retry;
pub mod rewrite;
pub mod sample;
pub mod sink;
pub mod status;
pub mod table;
pub mod update;
pub mod worker;

pub use config::Config;
pub use status::{Progress, RunSummary};
#[cfg(feature = "fault-injection")]
pub use worker::run_with_crash_points;
pub use worker::{WorkerError, run, run_with_progress};
