//! Writing a stream's Delta table: every commit goes through `deltalake-core`'s commit
//! protocol (the next `_delta_log/<version>.json` is created only if absent; a writer that
//! loses the race re-reads the log, checks for conflicts and retries, or fails), with the
//! actions Candor built itself, so that every commit carries Candor's checksum of its actions
//! (see [`super::log`]). An epoch's appends, which cannot conflict, write the protocol's
//! commit entry without its post-commit snapshot rebuild ([`append`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake_core::kernel::{Action, EagerSnapshot, Metadata, Protocol, StructType};
use deltalake_core::logstore::{LogStoreRef, StorageConfig, logstore_for};
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::table::state::DeltaTableState;
use serde_json::Value;

use super::log::{ACTIONS_SHA256, actions_digest};
use crate::error::{Error, Result};

fn delta_error(table: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Archive(format!("{}: {what}: {e}", table.display()))
}

fn log_store(table: &Path) -> Result<LogStoreRef> {
    let url = url::Url::from_directory_path(table)
        .map_err(|_| Error::Internal(format!("{} is not an absolute directory path", table.display())))?;
    logstore_for(&url, StorageConfig::default()).map_err(|e| delta_error(table, "opening the Delta log", e))
}

/// The Delta schema of an Arrow schema.
fn delta_schema(schema: &arrow::datatypes::Schema) -> Result<StructType> {
    use deltalake_core::kernel::engine::arrow_conversion::TryIntoKernel;
    schema.try_into_kernel().map_err(|e| Error::Internal(format!("no Delta type for the schema: {e}")))
}

/// What one commit says about itself, besides its actions (goes into `commitInfo`).
pub(super) type CommitMeta = serde_json::Map<String, Value>;

/// Which version of a table a commit was decided on.
#[derive(Clone, Copy, Debug)]
pub(super) enum Base {
    /// Whatever the table holds when the commit is made (blind appends under the writer lock).
    Latest,
    /// The version the writer read (None: the table had no log yet). Commits made since are
    /// checked for conflicts against this one.
    Read(Option<u64>),
}

/// What a handle keeps of each table it commits to, by table directory.
#[derive(Debug, Default)]
pub(super) struct States {
    /// The Delta state after the last commit made through deltalake's commit protocol.
    /// Loading a table's state replays its whole log; kept, the next commit brings it up to
    /// date with only the versions written since.
    tables: Mutex<HashMap<PathBuf, DeltaTableState>>,
    /// The version of the last blind append this handle made ([`append`]).
    appended: Mutex<HashMap<PathBuf, u64>>,
}

/// Commits `actions` to the table at `table` (creating it, with `schema`, when its log does not
/// exist yet). `txn`: an application transaction id whose concurrent use by another writer
/// since `base` makes this commit fail instead of retrying (how epoch numbers stay unique).
#[allow(clippy::too_many_arguments)]
pub(super) fn commit(
    states: &States,
    table: &Path,
    schema: &arrow::datatypes::Schema,
    mut actions: Vec<Action>,
    operation: Operation,
    mut meta: CommitMeta,
    txn: Option<(&str, i64)>,
    base: Base,
) -> Result<u64> {
    let store = log_store(table)?;
    if let (Base::Latest, Operation::Append, None) = (base, operation, txn)
        && table.join("_delta_log").join(format!("{:020}.json", 0)).is_file()
    {
        return append(states, store, table, actions, meta, None);
    }
    if let Some((app_id, version)) = txn {
        actions.push(Action::Txn(deltalake_core::kernel::Transaction::new(app_id, version)));
    }
    // An append decided on the version read (a registration): the entry goes at the next
    // version or nowhere, so any commit made since the read is a conflict. The same entry
    // the protocol would write, without rebuilding the table's file list after it.
    if let (Base::Read(Some(read)), Operation::Append) = (base, operation) {
        return append(states, store, table, actions, meta, Some(read + 1));
    }
    let read_version = match base {
        Base::Latest => None,
        Base::Read(v) => v,
    };
    let exists = match base {
        Base::Latest => table.join("_delta_log").join(format!("{:020}.json", 0)).is_file(),
        Base::Read(v) => v.is_some(),
    };
    let table_path = table.to_path_buf();
    let schema = delta_schema(schema)?;
    // On the process's runtime, also when the caller is itself on a tokio runtime (the SQL
    // endpoint): see `crate::runtime::block_on`.
    // Held for the whole commit: one commit per table at a time through this handle.
    let mut states = states.tables.lock().unwrap_or_else(|p| p.into_inner());
    let kept = states.remove(&table_path);
    let (version, state) = crate::runtime::block_on(async move {
        let read = |e| delta_error(&table_path, "reading the Delta log", e);
        let snapshot = if exists {
            Some(match (base, kept) {
                (Base::Latest, Some(mut state)) => {
                    state.update(store.as_ref(), None).await.map_err(read)?;
                    state
                }
                (Base::Read(Some(v)), Some(state)) if state.version() == v => state,
                _ => DeltaTableState::new(EagerSnapshot::try_new(store.as_ref(), read_version).await.map_err(read)?),
            })
        } else {
            let protocol: Protocol =
                serde_json::from_value(serde_json::json!({"minReaderVersion": 1, "minWriterVersion": 2}))
                    .map_err(|e| Error::Internal(format!("Delta protocol: {e}")))?;
            let metadata: Metadata =
                deltalake_core::kernel::new_metadata(&schema, Vec::<String>::new(), Vec::<(String, String)>::new())
                    .map_err(|e| Error::Internal(format!("Delta metadata: {e}")))?;
            actions.insert(0, Action::Metadata(metadata));
            actions.insert(0, Action::Protocol(protocol));
            None
        };
        let digest = actions_digest(&actions, &meta)?;
        meta.insert(ACTIONS_SHA256.into(), Value::String(digest));
        let operation = match operation {
            Operation::Append if snapshot.is_none() => DeltaOperation::Create {
                mode: SaveMode::ErrorIfExists,
                location: store.root_url().clone(),
                protocol: match &actions[0] {
                    Action::Protocol(p) => p.clone(),
                    _ => unreachable!("inserted above"),
                },
                metadata: match &actions[1] {
                    Action::Metadata(m) => m.clone(),
                    _ => unreachable!("inserted above"),
                },
            },
            Operation::Append => DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None },
            Operation::Remove => DeltaOperation::Delete { predicate: None },
        };
        let app_metadata: HashMap<String, Value> = meta.into_iter().collect();
        // No Delta checkpoints, no log cleanup: Candor reads and checks every JSON commit itself.
        let properties =
            CommitProperties::default().with_create_checkpoint(false).with_cleanup_expired_logs(Some(false));
        let committed = CommitBuilder::from(properties)
            .with_actions(actions)
            .with_app_metadata(app_metadata)
            .with_max_retries(if txn.is_some() { 0 } else { 15 })
            .build(snapshot.as_ref().map(|s| s as &dyn deltalake_core::kernel::transaction::TableReference), store, operation)
            .await
            .map_err(|e| match e {
                deltalake_core::DeltaTableError::Transaction { source } => Error::Conflict(format!(
                    "{}: another writer committed to this table at the same time ({source}); nothing of this commit was written",
                    table_path.display()
                )),
                e => delta_error(&table_path, "committing", e),
            })?;
        Ok::<_, Error>((committed.version(), committed.snapshot()))
    })?;
    states.insert(table.to_path_buf(), state);
    Ok(version)
}

/// A blind append (new files only, decided on whatever the table holds) to an existing table:
/// the commit entry deltalake's commit protocol would write (the same `CommitData`, put at the
/// next version only if that version is absent, through the table's log store), without the
/// protocol's post-commit step, which rebuilds the table's full file list from every version's
/// statistics after each commit: a cost that grows with the table's history, at every epoch.
/// An append cannot conflict with another writer's commit (both only add files), so when the
/// next version is taken the append goes to the one after, as the protocol's retries would;
/// unless `at` names the one version it may take (an append decided on what the table held
/// then), when a version already taken is a conflict.
fn append(
    states: &States,
    store: LogStoreRef,
    table: &Path,
    actions: Vec<Action>,
    mut meta: CommitMeta,
    at: Option<u64>,
) -> Result<u64> {
    use deltalake_core::kernel::transaction::{CommitData, TransactionError};
    use deltalake_core::logstore::CommitOrBytes;
    let digest = actions_digest(&actions, &meta)?;
    meta.insert(ACTIONS_SHA256.into(), Value::String(digest));
    let operation = DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None };
    let data = CommitData::new(actions, operation, meta.into_iter().collect(), Vec::new());
    let bytes = data.get_bytes().map_err(|e| delta_error(table, "encoding a commit", e))?;
    // Held for the whole commit: one commit per table at a time through this handle.
    let mut appended = states.appended.lock().unwrap_or_else(|p| p.into_inner());
    let last = appended.get(table).copied();
    let version = crate::runtime::block_on(async {
        let store = &store;
        let latest = |from: u64| async move {
            store.get_latest_version(from).await.map_err(|e| delta_error(table, "reading the Delta log", e))
        };
        let mut version = match (at, last) {
            (Some(v), _) => v,
            (None, Some(v)) => v + 1,
            (None, None) => latest(0).await? + 1,
        };
        for _ in 0..16 {
            let entry = CommitOrBytes::LogBytes(bytes.clone());
            match store.write_commit_entry(version, entry, uuid::Uuid::new_v4()).await {
                Ok(()) => return Ok(version),
                Err(TransactionError::VersionAlreadyExists(_)) if at.is_some() => {
                    return Err(Error::Conflict(format!(
                        "{}: another writer committed version {version} since this commit's table was read; nothing of this commit was written",
                        table.display()
                    )));
                }
                Err(TransactionError::VersionAlreadyExists(_)) => version = latest(version).await? + 1,
                Err(e) => return Err(delta_error(table, "committing", e)),
            }
        }
        Err(Error::Conflict(format!(
            "{}: other writers took 16 versions in a row; nothing of this commit was written",
            table.display()
        )))
    })?;
    appended.insert(table.to_path_buf(), version);
    Ok(version)
}

/// What a commit does, for the Delta log's operation name.
#[derive(Clone, Copy, Debug)]
pub(super) enum Operation {
    Append,
    Remove,
}

#[allow(dead_code)]
fn _assert_send(_: Arc<()>) {}
