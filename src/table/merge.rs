//! The copy-on-write merge of one flush, planned over Arrow: which rows win, which
//! touched files must be rewritten, and the new files laid out by group. Pure: the
//! table module reads the touched files, writes the planned files and commits.
//!
//! Invariants kept here:
//! - Exactly one row per key survives among the touched files and the batch: the one
//!   with the highest [`crate::update::PositionUpdate::precedence`] (timestamp, offset,
//!   topic, partition); on a tie the stored row stays, so a replay changes nothing.
//! - A touched file is rewritten only when it loses a row or hosts new ones, and then
//!   all its surviving rows are in the new files.
//! - Every new file holds rows of one [`FileGroup`], sorted by `symbol` then `conid`,
//!   and at most `max_rows_per_file` rows.

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array,
};
use deltalake::arrow::compute::{concat_batches, take_record_batch};
use deltalake::arrow::datatypes::{Int32Type, Int64Type};
use deltalake::arrow::error::ArrowError;

use crate::config::PartitionBy;
use crate::offsets::TopicPartition;
use crate::table::key_index::{FileGroup, FileId};
use crate::table::schema::{PARTITION_COLUMN, columns, schema};
use crate::update::{KeyColumn, RowKey};

/// The rows of one touched file, in the table's schema (the partition column filled in).
#[derive(Debug)]
pub struct TouchedFile {
    /// The file.
    pub id: FileId,
    /// The group its rows belong to.
    pub group: FileGroup,
    /// Its rows.
    pub rows: RecordBatch,
    /// Whether it takes in the batch's new rows of its group: then it is rewritten
    /// when the batch has a winning row for its group.
    pub hosts_new_keys: bool,
}

/// One file to write.
#[derive(Debug)]
pub struct NewFile {
    /// The group it belongs to.
    pub group: FileGroup,
    /// Its rows, in the table's schema.
    pub rows: RecordBatch,
    /// The key of each row, for the key index.
    pub keys: Vec<RowKey>,
}

/// What one flush changes.
#[derive(Debug, Default)]
pub struct Plan {
    /// Touched files to remove.
    pub rewritten: Vec<FileId>,
    /// Files to add in their place, with the batch's winning rows.
    pub files: Vec<NewFile>,
    /// Batch rows for keys the touched files did not hold.
    pub inserted: usize,
    /// Batch rows that replaced a stored row.
    pub updated: usize,
    /// Batch rows older than (or equal to) the stored row, dropped.
    pub unchanged: usize,
}

/// Where each row of the candidate set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    File(usize),
    Batch,
}

/// Plans the merge of `batch` (one row per key, the table's schema) into `touched`.
///
/// # Errors
/// Only when Arrow rejects the arrays (a file whose columns do not match the schema).
pub fn plan(
    touched: &[TouchedFile],
    batch: &RecordBatch,
    layout: PartitionBy,
    key_columns: &[KeyColumn],
    max_rows_per_file: usize,
) -> Result<Plan, ArrowError> {
    lay_out(touched, batch, layout, key_columns, max_rows_per_file, false)
}

/// Plans the compaction of `files`: all of them rewritten into as few files of at most
/// `max_rows_per_file` rows per group as hold their rows (a key held twice keeps only
/// its newest row).
///
/// # Errors
/// As [`plan`].
pub fn pack(
    files: &[TouchedFile],
    layout: PartitionBy,
    key_columns: &[KeyColumn],
    max_rows_per_file: usize,
) -> Result<Plan, ArrowError> {
    let nothing = RecordBatch::new_empty(schema());
    lay_out(files, &nothing, layout, key_columns, max_rows_per_file, true)
}

fn lay_out(
    touched: &[TouchedFile],
    batch: &RecordBatch,
    layout: PartitionBy,
    key_columns: &[KeyColumn],
    max_rows_per_file: usize,
    rewrite_all: bool,
) -> Result<Plan, ArrowError> {
    let mut parts: Vec<&RecordBatch> = touched.iter().map(|f| &f.rows).collect();
    parts.push(batch);
    let rows = concat_batches(&schema(), parts)?;
    let mut origins = Vec::with_capacity(rows.num_rows());
    for (i, file) in touched.iter().enumerate() {
        origins.extend(std::iter::repeat_n(Origin::File(i), file.rows.num_rows()));
    }
    origins.extend(std::iter::repeat_n(Origin::Batch, batch.num_rows()));
    let columns = Columns::of(&rows)?;
    let keys = keys_of(&rows, key_columns)?;

    let mut plan = Plan::default();
    let mut winner: HashMap<&RowKey, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(keys.len(), Default::default());
    for (row, key) in keys.iter().enumerate() {
        match winner.get_mut(key) {
            None => {
                if origins[row] == Origin::Batch {
                    plan.inserted += 1;
                }
                winner.insert(key, row);
            }
            Some(current) => {
                let newer = columns.precedence(row) > columns.precedence(*current);
                if origins[row] == Origin::Batch {
                    if newer {
                        plan.updated += 1;
                    } else {
                        plan.unchanged += 1;
                    }
                }
                if newer {
                    *current = row;
                }
            }
        }
    }
    let mut is_winner = vec![false; rows.num_rows()];
    for row in winner.into_values() {
        is_winner[row] = true;
    }
    let mut gaining = std::collections::HashSet::new();
    let mut rewrite = vec![rewrite_all; touched.len()];
    for (row, origin) in origins.iter().enumerate() {
        match origin {
            Origin::File(file) if !is_winner[row] => rewrite[*file] = true,
            Origin::Batch if is_winner[row] => {
                gaining.insert(columns.group(row, layout));
            }
            _ => {}
        }
    }
    for (file, rewritten) in touched.iter().zip(rewrite.iter_mut()) {
        *rewritten |= file.hosts_new_keys && gaining.contains(&file.group);
    }
    plan.rewritten = touched.iter().zip(&rewrite).filter(|(_, r)| **r).map(|(f, _)| f.id).collect();

    let mut groups: HashMap<FileGroup, Vec<u32>> = HashMap::new();
    for (row, origin) in origins.iter().enumerate() {
        let kept = match origin {
            Origin::Batch => is_winner[row],
            Origin::File(file) => rewrite[*file] && is_winner[row],
        };
        if kept {
            groups.entry(columns.group(row, layout)).or_default().push(row as u32);
        }
    }
    let mut groups: Vec<(FileGroup, Vec<u32>)> = groups.into_iter().collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    for (group, mut members) in groups {
        members.sort_by(|a, b| columns.cluster_order(*a as usize).cmp(&columns.cluster_order(*b as usize)));
        let chunks = members.len().div_ceil(max_rows_per_file.max(1));
        let per_chunk = members.len().div_ceil(chunks);
        for chunk in members.chunks(per_chunk) {
            let file_rows = take_record_batch(&rows, &UInt32Array::from(chunk.to_vec()))?;
            let file_keys = chunk.iter().map(|row| keys[*row as usize].clone()).collect();
            plan.files.push(NewFile { group: group.clone(), rows: file_rows, keys: file_keys });
        }
    }
    Ok(plan)
}

/// The columns the plan reads, typed once.
struct Columns<'a> {
    conid: &'a [i64],
    symbol: &'a StringArray,
    timestamp: &'a TimestampMicrosecondArray,
    kafka_topic: &'a StringArray,
    kafka_partition: &'a [i32],
    kafka_offset: &'a [i64],
}

impl<'a> Columns<'a> {
    fn of(rows: &'a RecordBatch) -> Result<Self, ArrowError> {
        let column = |name: &str| column(rows, name);
        Ok(Self {
            conid: column(columns::CONID)?.as_primitive::<Int64Type>().values(),
            symbol: column(columns::SYMBOL)?.as_string::<i32>(),
            timestamp: column(columns::TIMESTAMP)?.as_primitive(),
            kafka_topic: column(columns::KAFKA_TOPIC)?.as_string::<i32>(),
            kafka_partition: column(columns::KAFKA_PARTITION)?.as_primitive::<Int32Type>().values(),
            kafka_offset: column(columns::KAFKA_OFFSET)?.as_primitive::<Int64Type>().values(),
        })
    }

    /// The same order as [`crate::update::PositionUpdate::precedence`].
    fn precedence(&self, row: usize) -> (i64, i64, &str, i32) {
        (self.timestamp.value(row), self.kafka_offset[row], self.kafka_topic.value(row), self.kafka_partition[row])
    }

    fn group(&self, row: usize, layout: PartitionBy) -> FileGroup {
        let owner = TopicPartition::new(self.kafka_topic.value(row), self.kafka_partition[row]);
        FileGroup::of(layout, self.symbol.value(row), owner)
    }

    fn cluster_order(&self, row: usize) -> (&str, i64) {
        (self.symbol.value(row), self.conid[row])
    }
}

/// The column `name` of `rows`, or an error naming it.
pub(crate) fn column<'a>(rows: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, ArrowError> {
    rows.column_by_name(name).ok_or_else(|| ArrowError::SchemaError(format!("no column `{name}`")))
}

/// The key of each row of `rows`, which need hold only the key columns.
///
/// # Errors
/// When a key column is missing.
pub fn keys_of(rows: &RecordBatch, key_columns: &[KeyColumn]) -> Result<Vec<RowKey>, ArrowError> {
    let conid = column(rows, columns::CONID)?.as_primitive::<Int64Type>().values();
    let text_column = |wanted: KeyColumn| -> Result<Option<&StringArray>, ArrowError> {
        if key_columns.contains(&wanted) { Ok(Some(column(rows, wanted.name())?.as_string::<i32>())) } else { Ok(None) }
    };
    let (account, sec_type, currency) =
        (text_column(KeyColumn::Account)?, text_column(KeyColumn::SecType)?, text_column(KeyColumn::Currency)?);
    let text =
        |array: Option<&StringArray>, row: usize| array.filter(|a| !a.is_null(row)).map(|a| a.value(row).to_string());
    Ok((0..rows.num_rows())
        .map(|row| RowKey {
            conid: conid[row],
            account: text(account, row),
            sec_type: text(sec_type, row),
            currency: text(currency, row),
        })
        .collect())
}

/// `rows` read from a data file, in the table's schema: the partition column filled in
/// from the file's partition value, and each column cast to the table's type.
///
/// # Errors
/// When a column is missing or cannot be cast.
pub fn with_table_schema(rows: &RecordBatch, symbol: Option<&str>) -> Result<RecordBatch, ArrowError> {
    let table = schema();
    let columns = table
        .fields()
        .iter()
        .map(|field| match (field.name().as_str(), symbol) {
            (PARTITION_COLUMN, Some(symbol)) => {
                Ok(Arc::new(StringArray::from(vec![symbol; rows.num_rows()])) as ArrayRef)
            }
            (name, _) => {
                let column = rows
                    .column_by_name(name)
                    .ok_or_else(|| ArrowError::SchemaError(format!("the data file has no column `{name}`")))?;
                if column.data_type() == field.data_type() {
                    Ok(column.clone())
                } else {
                    deltalake::arrow::compute::cast(column, field.data_type())
                }
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(table, columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::schema::to_record_batch;
    use crate::update::PositionUpdate;
    use crate::update::tests::update;

    fn rows(updates: &[PositionUpdate]) -> RecordBatch {
        to_record_batch(updates.iter(), 1).expect("valid rows")
    }

    fn file(id: FileId, updates: &[PositionUpdate]) -> TouchedFile {
        let group = FileGroup { symbol: None, owner: Some(TopicPartition::new("positions", 0)) };
        TouchedFile { id, group, rows: rows(updates), hosts_new_keys: false }
    }

    fn conids(plan: &Plan) -> Vec<Vec<i64>> {
        plan.files.iter().map(|f| f.keys.iter().map(|k| k.conid).collect()).collect()
    }

    #[test]
    fn a_newer_update_replaces_the_stored_row_and_rewrites_its_file() {
        let touched = [file(7, &[update(1, "A", 10, 0, 1), update(2, "A", 10, 0, 2)])];
        let batch = rows(&[update(2, "A", 20, 0, 5)]);
        let plan = plan(&touched, &batch, PartitionBy::None, &[KeyColumn::Conid], 100).expect("plan");
        assert_eq!(plan.rewritten, vec![7]);
        assert_eq!((plan.inserted, plan.updated, plan.unchanged), (0, 1, 0));
        assert_eq!(conids(&plan), vec![vec![1, 2]]);
        let offsets = plan.files[0].rows.column_by_name("kafka_offset").expect("column");
        assert_eq!(offsets.as_primitive::<Int64Type>().values().to_vec(), vec![1, 5]);
    }

    #[test]
    fn an_older_or_replayed_update_leaves_the_file_alone() {
        let stored = update(1, "A", 10, 0, 3);
        let touched = [file(7, std::slice::from_ref(&stored))];
        let batch = rows(&[update(1, "A", 5, 0, 9)]);
        let plan = plan(&touched, &batch, PartitionBy::None, &[KeyColumn::Conid], 100).expect("plan");
        assert!(plan.rewritten.is_empty() && plan.files.is_empty());
        assert_eq!(plan.unchanged, 1);
        let replay = plan_of(&touched, &[stored]);
        assert!(replay.rewritten.is_empty() && replay.files.is_empty(), "a replay changes nothing");
    }

    fn plan_of(touched: &[TouchedFile], batch: &[PositionUpdate]) -> Plan {
        plan(touched, &rows(batch), PartitionBy::Symbol, &[KeyColumn::Conid], 100).expect("plan")
    }

    #[test]
    fn a_symbol_change_moves_the_row_to_its_new_group() {
        let touched = [file(3, &[update(1, "OLD", 10, 0, 1), update(2, "OLD", 10, 0, 2)])];
        let plan = plan_of(&touched, &[update(1, "NEW", 20, 0, 4)]);
        assert_eq!(plan.rewritten, vec![3]);
        let symbols: Vec<_> = plan.files.iter().map(|f| f.group.symbol.clone().unwrap_or_default()).collect();
        assert_eq!(symbols, vec!["NEW", "OLD"]);
        assert_eq!(conids(&plan), vec![vec![1], vec![2]]);
    }

    #[test]
    fn new_keys_join_their_host_file_and_files_are_split_at_the_limit() {
        let mut host = file(1, &[update(1, "A", 1, 0, 1), update(2, "B", 1, 0, 2), update(3, "A", 1, 0, 3)]);
        host.hosts_new_keys = true;
        let batch = rows(&[update(4, "A", 2, 0, 4), update(5, "C", 2, 0, 5)]);
        let plan = plan(&[host], &batch, PartitionBy::None, &[KeyColumn::Conid], 3).expect("plan");
        assert_eq!(plan.rewritten, vec![1]);
        assert_eq!(plan.inserted, 2);
        assert_eq!(conids(&plan), vec![vec![1, 3, 4], vec![2, 5]], "sorted by symbol, then conid, split evenly");
    }

    #[test]
    fn a_key_stored_twice_keeps_only_its_newest_row() {
        let touched = [file(1, &[update(1, "A", 10, 0, 1)]), file(2, &[update(1, "A", 30, 1, 1)])];
        let plan = plan_of(&touched, &[update(1, "A", 20, 0, 2)]);
        assert_eq!(plan.rewritten, vec![1]);
        assert!(plan.files.is_empty(), "file 2 keeps the newest row and is not rewritten");
        assert_eq!((plan.updated, plan.unchanged), (0, 1));
    }

    #[test]
    fn each_file_holds_one_kafka_partition() {
        let plan = plan_of(&[], &[update(1, "A", 1, 0, 1), update(2, "A", 1, 1, 1), update(3, "A", 1, 0, 2)]);
        let owners: Vec<_> = plan.files.iter().map(|f| f.group.owner.as_ref().map(|o| o.partition.0)).collect();
        assert_eq!(owners, vec![Some(0), Some(1)]);
        assert_eq!(conids(&plan), vec![vec![1, 3], vec![2]]);
    }

    #[test]
    fn packing_rewrites_every_file_into_as_few_as_hold_the_rows() {
        let small =
            |id, conids: &[i64]| file(id, &conids.iter().map(|c| update(*c, "A", 1, 0, *c)).collect::<Vec<_>>());
        let files = [small(1, &[5, 1]), small(2, &[2]), small(3, &[4, 3])];
        let plan = pack(&files, PartitionBy::Symbol, &[KeyColumn::Conid], 3).expect("pack");
        assert_eq!(plan.rewritten, vec![1, 2, 3]);
        assert_eq!(conids(&plan), vec![vec![1, 2, 3], vec![4, 5]], "two files of at most 3 rows, in key order");
        assert_eq!((plan.inserted, plan.updated, plan.unchanged), (0, 0, 0));
    }
}
