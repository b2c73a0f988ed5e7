//! Dead letters to a Delta table: appended with the batch's offsets as `txn`, before
//! the positions table, whose recorded offsets then vouch for them.

use futures::future::BoxFuture;

use super::{FlushContext, Output, OutputReport, Place};
use crate::config::Config;
use crate::dead_letter::DeadLetterTable;
use crate::delta::TableError;
use crate::maintenance::run::Target;
use crate::retry::retry;
use crate::status::Progress;
use crate::worker::batch::Batch;
use crate::worker::flush::{FlushError, retry_write};

/// The dead-letter table as a flush output.
#[derive(Debug)]
pub struct DeadLetterTableOutput {
    table: DeadLetterTable,
}

impl DeadLetterTableOutput {
    /// Opens (or creates) the table `dead_letter.table_uri` names.
    ///
    /// # Errors
    /// When it cannot be opened after retries.
    pub async fn open(config: &Config) -> Result<Self, FlushError> {
        let uri = config.dead_letter.resolved_table_uri(&config.delta);
        let (storage, properties) = (&config.delta.storage_options, &config.delta.table_properties);
        let group = &config.kafka.group_id;
        let table = retry(
            &config.retry,
            "open the dead-letter table",
            || DeadLetterTable::open_or_create(&uri, storage, properties, group),
            TableError::is_retryable,
        )
        .await?
        .with_write_deadline(config.maintenance.write_deadline());
        Ok(Self { table })
    }
}

impl Output for DeadLetterTableOutput {
    fn describe(&self) -> String {
        format!("dead letters to table {}", self.table.uri())
    }

    fn place(&self) -> Place {
        Place::BeforePositions
    }

    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    fn write<'a>(
        &'a mut self,
        batch: &'a Batch,
        context: &'a FlushContext<'a>,
    ) -> BoxFuture<'a, Result<OutputReport, FlushError>> {
        Box::pin(async move {
            if batch.dead_letters.is_empty() {
                return Ok(OutputReport::default());
            }
            let table = &self.table;
            let (written_table, written) =
                retry_write(context.retry, "write dead letters to Delta", context.progress, || {
                    table.write(&batch.dead_letters, &batch.offsets)
                })
                .await?;
            self.table = written_table;
            if written.total() > 0 {
                Progress::bump(&context.progress.dead_letter_commits);
                #[cfg(feature = "fault-injection")]
                if let Some(crash) = context.crash.after_dead_letter_commit(context.progress) {
                    return Err(FlushError::InjectedCrash(crash));
                }
            }
            Ok(OutputReport { dead_letters: written, offsets_committed: false })
        })
    }

    fn appended_table(&self) -> Option<Target> {
        Some(self.table.maintenance_target())
    }
}
