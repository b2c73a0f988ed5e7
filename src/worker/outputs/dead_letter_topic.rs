//! Dead letters to a Kafka topic: one Kafka transaction, after the positions table,
//! holding the dead letters and the consumer offsets of the batch.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{FlushContext, Output, OutputReport, Place};
use crate::config::Config;
use crate::dead_letter::DeadLetterTopic;
use crate::status::{Progress, ReasonCounts};
use crate::worker::batch::Batch;
use crate::worker::flush::FlushError;

/// The dead-letter topic as a flush output.
#[derive(Debug)]
pub struct DeadLetterTopicOutput {
    topic: Arc<DeadLetterTopic>,
}

impl DeadLetterTopicOutput {
    /// Connects a transactional producer to `dead_letter.topic`.
    ///
    /// # Errors
    /// When the producer cannot be set up.
    pub async fn open(config: &Config) -> Result<Self, FlushError> {
        Ok(Self { topic: DeadLetterTopic::connect(&config.kafka, &config.dead_letter).await? })
    }
}

impl Output for DeadLetterTopicOutput {
    fn describe(&self) -> String {
        format!("dead letters to topic {}", self.topic.topic())
    }

    fn place(&self) -> Place {
        Place::CommitsOffsets
    }

    fn write<'a>(
        &'a mut self,
        batch: &'a Batch,
        context: &'a FlushContext<'a>,
    ) -> BoxFuture<'a, Result<OutputReport, FlushError>> {
        Box::pin(async move {
            let group = context.group.clone().ok_or(FlushError::NotInGroup)?;
            Progress::bump(&context.progress.dead_letter_commits);
            #[cfg(feature = "fault-injection")]
            if context.crash.leaves_transaction_open(context.progress) {
                self.topic.publish_without_commit(&batch.dead_letters, &batch.offsets, group).await?;
                return Err(FlushError::InjectedCrash("with the dead-letter transaction sent but not committed"));
            }
            self.topic.publish(&batch.dead_letters, &batch.offsets, group).await?;
            let mut dead_letters = ReasonCounts::default();
            for d in &batch.dead_letters {
                dead_letters.add(&d.category, 1);
            }
            Ok(OutputReport { dead_letters, offsets_committed: true })
        })
    }
}
