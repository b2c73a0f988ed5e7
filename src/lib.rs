//! position-sink: Kafka position updates → a last-write-wins Delta Lake table,
//! exactly-once in effect.
//!
//! # Layout
//!
//! ```text
//!  Kafka (consumer group, manual offsets)             kafka.rs
//!    │ key + value bytes, topic/partition/offset
//!    ▼
//!  decode + validate ──── invalid ──▶ stop with coordinates   decode.rs
//!    │ PositionUpdate
//!    ▼
//!  buffer: dedup per key, last write wins                     batch.rs, update.rs
//!    │ flush every flush.interval, or early on size limits
//!    ▼
//!  Arrow record batch                                          arrow.rs
//!    ▼
//!  Delta MERGE (LWW guard) + txn offsets, one commit           table.rs
//!    ▼
//!  Kafka offset commit (after the Delta commit)                kafka.rs
//! ```
//!
//! The loop that ties these together is [`worker`]; [`run`] is the entry point used
//! by the binary and by the tests. Retries of I/O live in [`retry`], configuration in
//! [`config`].

pub mod arrow;
pub mod batch;
pub mod config;
pub mod decode;
pub mod inspect;
pub mod kafka;
pub mod offsets;
pub mod retry;
pub mod sample;
pub mod table;
pub mod update;
pub mod worker;

pub use config::Config;
pub use worker::{Faults, Progress, RunSummary, WorkerError, run, run_with_faults};
