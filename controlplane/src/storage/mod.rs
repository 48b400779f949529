//! Storage for API objects: one trait, two engines.
//!
//! Objects are opaque bytes (JSON) under string keys. Every write bumps one
//! global revision, which the apiserver exposes as `metadata.resourceVersion`
//! (the kine/etcd model). Watches replay history after a revision and then
//! follow live writes; a revision older than the retained history is
//! reported as [`StorageError::Compacted`] so the apiserver can answer 410
//! Expired exactly like kube-apiserver.

use std::pin::Pin;

use futures::Stream;

pub mod embedded;
pub mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A stored object with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write to this key (= resourceVersion).
    pub mod_revision: i64,
    /// Revision that created this key.
    pub create_revision: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as delivered to watchers.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub key: String,
    /// New value for puts; the last value for deletes.
    pub value: Vec<u8>,
    /// The previous value (absent for creates).
    pub prev: Option<Vec<u8>>,
    pub revision: i64,
    /// True when this put created the key.
    pub created: bool,
}

/// A page of a list.
#[derive(Debug, Clone)]
pub struct ListResult {
    pub records: Vec<Record>,
    /// Revision the list was read at.
    pub revision: i64,
    /// More keys follow the last record.
    pub more: bool,
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("key {key} already exists")]
    AlreadyExists { key: String },
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} was modified: expected revision {expected}, found {found}")]
    Conflict { key: String, expected: i64, found: i64 },
    #[error("revision {requested} has been compacted (oldest available {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    #[error("watcher fell too far behind")]
    WatcherLagged,
    #[error("embedded database: {0}")]
    Database(String),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("value of {key} is {size} bytes, more than the limit of {limit}")]
    TooLarge { key: String, size: usize, limit: usize },
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Largest value either engine stores: etcd's default request limit
/// (`--max-request-bytes`, 1.5 MiB), enforced before the write so the
/// embedded store and etcd refuse the same objects with the same error.
pub const MAX_VALUE_BYTES: usize = 1536 << 10;

/// `TooLarge` when `value` exceeds [`MAX_VALUE_BYTES`].
pub fn check_value_size(key: &str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StorageError::TooLarge { key: key.to_string(), size: value.len(), limit: MAX_VALUE_BYTES });
    }
    Ok(())
}

/// The storage contract shared by the embedded store and etcd.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Record>>;
    /// Keys with `prefix`, ordered, strictly after `start_after` if given,
    /// at most `limit` (0 = all).
    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize)
    -> Result<ListResult>;
    /// Create; fails with `AlreadyExists`, or `TooLarge` above
    /// [`MAX_VALUE_BYTES`] (as does `update`). Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<i64>;
    /// Compare-and-swap on the key's mod revision.
    async fn update(&self, key: &str, value: Vec<u8>, expected_revision: i64) -> Result<i64>;
    /// Delete, optionally only if the key is still at `expected_revision`.
    /// Returns the deletion revision and the deleted record.
    async fn delete(&self, key: &str, expected_revision: Option<i64>) -> Result<(i64, Record)>;
    async fn current_revision(&self) -> Result<i64>;
    /// Events for keys under `prefix` with revision > `after_revision`.
    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<EventStream>;
    fn name(&self) -> &'static str;
}
