//! Reviewing dead letters and re-publishing them: the `position-sink dead-letters`
//! command.
//!
//! Re-publishing sends a dead letter's original key and value, byte for byte, back to
//! its source topic (with a `position-sink.republished-from` header naming where it
//! was), for messages whose cause was fixed on this side (a raised
//! `decode.max_message_bytes`, a changed `delta.key_columns`). Messages the current
//! rules still reject are left out unless forced, so they are not dead-lettered again.
//! Re-publishing one message twice is harmless: both copies carry the same event
//! timestamp and last-write-wins keeps one row.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};

use super::DeadLetter;
use crate::config::{Config, DeadLetterDestination};
use crate::decode::{Rejection, decode};
use crate::delta::TableError;
use crate::kafka::Outgoing;
use crate::offsets::Coordinates;

/// Header naming the dead letter a re-published message came from.
pub const HEADER_REPUBLISHED_FROM: &str = "position-sink.republished-from";

/// Failures of reviewing or re-publishing.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The dead-letter table cannot be read.
    #[error("{0}. Check dead_letter.table_uri (or that a worker has run: it creates the table)")]
    Table(#[from] TableError),
    /// Kafka cannot be read or written.
    #[error("Kafka failed: {0}. Check kafka.brokers and dead_letter.topic")]
    Kafka(#[from] crate::kafka::ClientError),
}

impl From<KafkaError> for ReviewError {
    fn from(error: KafkaError) -> Self {
        ReviewError::Kafka(error.into())
    }
}

/// Which dead letters to re-publish.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// These messages, by source coordinates.
    pub at: Vec<Coordinates>,
    /// Every dead letter of this reason category.
    pub category: Option<String>,
}

impl Selection {
    fn contains(&self, d: &DeadLetter) -> bool {
        self.at.contains(&d.source) || self.category.as_deref().is_some_and(|c| c == d.category)
    }
}

/// What [`republish`] did.
#[derive(Debug, Clone, Default)]
pub struct RepublishReport {
    /// Re-published (or, in a dry run, would be).
    pub republished: Vec<Coordinates>,
    /// Selected but still rejected by the current rules, with the reason; not re-published.
    pub still_invalid: Vec<(Coordinates, Rejection)>,
    /// Selected coordinates that have no dead letter.
    pub not_found: Vec<Coordinates>,
}

/// The most recent dead letters (newest first), optionally of one category.
///
/// # Errors
/// When the destination cannot be read.
pub async fn list(config: &Config, category: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, ReviewError> {
    let mut found = match config.dead_letter.destination {
        DeadLetterDestination::Table => {
            let uri = config.dead_letter.resolved_table_uri(&config.delta);
            super::table::read(&uri, &config.delta.storage_options, category, limit).await?
        }
        DeadLetterDestination::Topic => {
            let (kafka, topic, category) =
                (config.kafka.clone(), config.dead_letter.topic.clone(), category.map(String::from));
            tokio::task::spawn_blocking(move || super::topic::read(&kafka, &topic, category.as_deref(), limit))
                .await
                .map_err(|_| KafkaError::Canceled)??
        }
    };
    found.truncate(limit);
    Ok(found)
}

/// Re-publishes the selected dead letters to their source topics (see the module docs).
/// With `force`, also those the current rules reject; with `dry_run`, publishes nothing.
///
/// # Errors
/// When the destination cannot be read or a message cannot be published.
pub async fn republish(
    config: &Config,
    selection: &Selection,
    force: bool,
    dry_run: bool,
) -> Result<RepublishReport, ReviewError> {
    let all = list(config, None, usize::MAX >> 1).await?;
    let mut selected: Vec<&DeadLetter> = all.iter().filter(|d| selection.contains(d)).collect();
    selected.sort_by(|a, b| a.source.cmp(&b.source));
    selected.dedup_by(|a, b| a.source == b.source);
    let mut report = RepublishReport {
        not_found: selection.at.iter().filter(|c| !all.iter().any(|d| d.source == **c)).cloned().collect(),
        ..RepublishReport::default()
    };
    let options = config.decode_options();
    let mut to_send = Vec::new();
    for d in selected {
        match decode(d.key.as_deref(), d.value.as_deref(), d.source.clone(), &options) {
            Err(reason) if !force => report.still_invalid.push((d.source.clone(), reason)),
            _ => to_send.push(d),
        }
    }
    if !dry_run && !to_send.is_empty() {
        publish(config, &to_send).await?;
    }
    report.republished = to_send.iter().map(|d| d.source.clone()).collect();
    Ok(report)
}

async fn publish(config: &Config, dead_letters: &[&DeadLetter]) -> Result<usize, crate::kafka::ClientError> {
    let origins: Vec<String> = dead_letters.iter().map(|d| d.source.to_string()).collect();
    crate::kafka::publish(
        &config.kafka,
        dead_letters.iter().zip(&origins).map(|(d, from)| Outgoing {
            topic: &d.source.tp.topic,
            key: d.key.as_deref(),
            value: d.value.as_deref(),
            headers: Some(
                OwnedHeaders::new().insert(Header { key: HEADER_REPUBLISHED_FROM, value: Some(from.as_str()) }),
            ),
        }),
    )
    .await
}
