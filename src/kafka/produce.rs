//! Publishing: an idempotent producer of the cluster's brokers, and messages sent through
//! it until each is acknowledged. The sample publisher and the dead-letter review
//! publish through here; the dead-letter topic's transactional producer is its own
//! (`dead_letter/topic.rs`).

use std::sync::Arc;

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::Producer as _;

use super::{CONNECT_TIMEOUT, ClientError, ClientKind, ConnectionWatch, Watched, client_config, until_connected};
use crate::config::KafkaConfig;

/// One message to publish.
pub struct Outgoing<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// Key bytes, if any.
    pub key: Option<&'a [u8]>,
    /// Value bytes, if any.
    pub value: Option<&'a [u8]>,
    /// Headers, if any.
    pub headers: Option<rdkafka::message::OwnedHeaders>,
}

/// Publishes `messages` with an idempotent producer and waits until all are
/// acknowledged, in order per partition.
///
/// # Errors
/// The first delivery failure.
pub async fn publish<'a>(
    config: &KafkaConfig,
    messages: impl IntoIterator<Item = Outgoing<'a>>,
) -> Result<usize, ClientError> {
    let owned = config.clone();
    let (producer, watch) =
        tokio::task::spawn_blocking(move || producer(&owned)).await.map_err(|_| KafkaError::Canceled)??;
    send_all(&producer, messages).await.map_err(|e| watch.explain(e))
}

/// An idempotent producer for [`send_all`].
pub type Producer = rdkafka::producer::FutureProducer<Watched>;

/// An idempotent producer of `config`'s brokers, for [`send_all`], and what its
/// connections do; connected, so that wrong credentials or certificates are reported
/// before anything is sent. Blocking.
///
/// # Errors
/// When librdkafka rejects the configuration, or no connection can be made.
pub fn producer(config: &KafkaConfig) -> Result<(Producer, Arc<ConnectionWatch>), ClientError> {
    let watched = Watched::default();
    let watch = watched.watch.clone();
    let producer: Producer =
        client_config(config, ClientKind::Producer, &[("linger.ms", "5"), ("queue.buffering.max.messages", "1000000")])
            .set("enable.idempotence", "true")
            .create_with_context(watched)?;
    until_connected(&watch, CONNECT_TIMEOUT, |timeout| producer.client().fetch_metadata(None, timeout).map(|_| ()))?;
    Ok((producer, watch))
}

/// Sends `messages` through `producer` and waits until each is acknowledged; returns how
/// many were sent.
///
/// # Errors
/// The first delivery failure.
pub async fn send_all<'a>(producer: &Producer, messages: impl IntoIterator<Item = Outgoing<'a>>) -> KafkaResult<usize> {
    use futures::StreamExt;
    use rdkafka::producer::FutureRecord;
    let deliveries = futures::stream::iter(messages.into_iter().map(|m| async move {
        let mut record = FutureRecord::<[u8], [u8]>::to(m.topic);
        if let Some(key) = m.key {
            record = record.key(key);
        }
        if let Some(value) = m.value {
            record = record.payload(value);
        }
        if let Some(headers) = m.headers {
            record = record.headers(headers);
        }
        producer.send(record, std::time::Duration::from_secs(30)).await.map_err(|(error, _)| error)
    }))
    .buffered(10_000);
    let results: Vec<_> = deliveries.collect().await;
    let mut sent = 0;
    for result in results {
        result?;
        sent += 1;
    }
    Ok(sent)
}
