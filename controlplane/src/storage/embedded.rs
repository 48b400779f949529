//! The embedded store: one redb file, no extra process.
//!
//! Layout (kine-like): `kv` holds the current value of every key with its
//! create/mod revisions; `log` is an append-only table keyed by revision
//! holding every change (with the previous value) for watchers; `meta`
//! holds the current and the compacted revision. Each write is one redb
//! transaction committed with `Durability::Immediate` (fsync), so an
//! acknowledged write survives `kill -9`. Writes are serialised by a mutex
//! that also covers the broadcast to live watchers, so watchers see events
//! in revision order.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};

use super::{Event, EventKind, EventStream, ListResult, Record, Result, Store, StorageError};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REV: &str = "revision";
const META_COMPACT: &str = "compacted";

fn db_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Database(e.to_string())
}

pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    write_lock: Mutex<()>,
    events: broadcast::Sender<Arc<Event>>,
    /// How many revisions of history to keep for watchers.
    history: u64,
}

fn encode_kv(create: i64, modr: i64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create.to_le_bytes());
    out.extend_from_slice(&modr.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_kv(key: &str, raw: &[u8]) -> Result<Record> {
    if raw.len() < 16 {
        return Err(StorageError::Database(format!("corrupt record for {key}")));
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[0..8]);
    let create_revision = i64::from_le_bytes(a);
    a.copy_from_slice(&raw[8..16]);
    let mod_revision = i64::from_le_bytes(a);
    Ok(Record { key: key.to_string(), value: raw[16..].to_vec(), mod_revision, create_revision })
}

fn put_chunk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode_event(ev: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(ev.key.len() + ev.value.len() + 16);
    out.push(u8::from(ev.kind == EventKind::Delete));
    out.push(u8::from(ev.created));
    put_chunk(&mut out, ev.key.as_bytes());
    put_chunk(&mut out, &ev.value);
    match &ev.prev {
        Some(p) => {
            out.push(1);
            put_chunk(&mut out, p);
        }
        None => out.push(0),
    }
    out
}

fn decode_event(revision: i64, raw: &[u8]) -> Result<Event> {
    let corrupt = || StorageError::Database(format!("corrupt log entry at revision {revision}"));
    let mut pos = 0usize;
    let byte = |pos: &mut usize| -> Result<u8> {
        let b = *raw.get(*pos).ok_or_else(corrupt)?;
        *pos += 1;
        Ok(b)
    };
    let chunk = |pos: &mut usize| -> Result<Vec<u8>> {
        let len_bytes = raw.get(*pos..*pos + 4).ok_or_else(corrupt)?;
        let mut l = [0u8; 4];
        l.copy_from_slice(len_bytes);
        let len = u32::from_le_bytes(l) as usize;
        *pos += 4;
        let v = raw.get(*pos..*pos + len).ok_or_else(corrupt)?.to_vec();
        *pos += len;
        Ok(v)
    };
    let kind = if byte(&mut pos)? == 1 { EventKind::Delete } else { EventKind::Put };
    let created = byte(&mut pos)? == 1;
    let key = String::from_utf8(chunk(&mut pos)?).map_err(|_| corrupt())?;
    let value = chunk(&mut pos)?;
    let prev = if byte(&mut pos)? == 1 { Some(chunk(&mut pos)?) } else { None };
    Ok(Event { kind, key, value, prev, revision, created })
}

/// Revisions are u64 in redb and i64 in the API (etcd's type).
fn rev_i64(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}
fn rev_u64(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

enum WriteOp {
    Create(Vec<u8>),
    Update(Vec<u8>, i64),
    Delete(Option<i64>),
}

impl EmbeddedStore {
    /// Open (or create) the database at `path`, keeping `history` revisions
    /// of change log for watchers.
    pub fn open(path: &Path, history: u64) -> Result<Self> {
        // The database holds every Secret: owner-only from its first byte
        // (redb initialises an empty file as a new database).
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| StorageError::Database(format!("creating {}: {e}", path.display())))?;
        }
        let db = Database::create(path).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(KV).map_err(db_err)?;
            txn.open_table(LOG).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            if meta.get(META_REV).map_err(db_err)?.is_none() {
                // Start at 1 like etcd, so "0" keeps meaning "any".
                meta.insert(META_REV, 1).map_err(db_err)?;
                meta.insert(META_COMPACT, 0).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        let (events, _) = broadcast::channel(16384);
        Ok(Self {
            inner: Arc::new(Inner { db, write_lock: Mutex::new(()), events, history: history.max(1) }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StorageError::Task(e.to_string()))?
    }

    async fn write(&self, key: &str, op: WriteOp) -> Result<(i64, Option<Record>)> {
        let key = key.to_string();
        self.blocking(move |inner| inner.write(&key, op)).await
    }
}

impl Inner {
    fn write(&self, key: &str, op: WriteOp) -> Result<(i64, Option<Record>)> {
        let _guard = self.write_lock.lock().map_err(|_| db_err("write lock poisoned"))?;
        let txn = self.db.begin_write().map_err(db_err)?;
        let (event, old) = {
            let mut kv = txn.open_table(KV).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let mut log = txn.open_table(LOG).map_err(db_err)?;
            let current = meta.get(META_REV).map_err(db_err)?.map_or(1, |g| g.value());
            let rev = current + 1;
            let irev = rev_i64(rev);
            let old = match kv.get(key).map_err(db_err)? {
                Some(g) => Some(decode_kv(key, g.value())?),
                None => None,
            };
            let event = match op {
                WriteOp::Create(value) => {
                    if old.is_some() {
                        return Err(StorageError::AlreadyExists { key: key.to_string() });
                    }
                    kv.insert(key, encode_kv(irev, irev, &value).as_slice()).map_err(db_err)?;
                    Event { kind: EventKind::Put, key: key.to_string(), value, prev: None, revision: irev, created: true }
                }
                WriteOp::Update(value, expected) => {
                    let Some(o) = &old else {
                        return Err(StorageError::NotFound { key: key.to_string() });
                    };
                    if o.mod_revision != expected {
                        return Err(StorageError::Conflict { key: key.to_string(), expected, found: o.mod_revision });
                    }
                    kv.insert(key, encode_kv(o.create_revision, irev, &value).as_slice()).map_err(db_err)?;
                    Event { kind: EventKind::Put, key: key.to_string(), value, prev: Some(o.value.clone()), revision: irev, created: false }
                }
                WriteOp::Delete(expected) => {
                    let Some(o) = &old else {
                        return Err(StorageError::NotFound { key: key.to_string() });
                    };
                    if let Some(expected) = expected
                        && o.mod_revision != expected
                    {
                        return Err(StorageError::Conflict { key: key.to_string(), expected, found: o.mod_revision });
                    }
                    kv.remove(key).map_err(db_err)?;
                    Event { kind: EventKind::Delete, key: key.to_string(), value: o.value.clone(), prev: Some(o.value.clone()), revision: irev, created: false }
                }
            };
            log.insert(rev, encode_event(&event).as_slice()).map_err(db_err)?;
            meta.insert(META_REV, rev).map_err(db_err)?;
            // Compact in batches (10% slack) so not every write pays for it.
            let compacted = meta.get(META_COMPACT).map_err(db_err)?.map_or(0, |g| g.value());
            if rev.saturating_sub(compacted) > self.history + self.history / 10 + 1 {
                let upto = rev - self.history;
                log.retain_in(..=upto, |_, _| false).map_err(db_err)?;
                meta.insert(META_COMPACT, upto).map_err(db_err)?;
            }
            (event, old)
        };
        txn.commit().map_err(db_err)?;
        let rev = event.revision;
        // No receivers is fine.
        let _ = self.events.send(Arc::new(event));
        Ok((rev, old))
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Record>> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let kv = txn.open_table(KV).map_err(db_err)?;
            match kv.get(key.as_str()).map_err(db_err)? {
                Some(g) => Ok(Some(decode_kv(&key, g.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListResult> {
        let prefix = prefix.to_string();
        let start_after = start_after.map(str::to_string);
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let kv = txn.open_table(KV).map_err(db_err)?;
            let meta = txn.open_table(META).map_err(db_err)?;
            let revision = rev_i64(meta.get(META_REV).map_err(db_err)?.map_or(1, |g| g.value()));
            let start = match &start_after {
                Some(s) if s.as_str() >= prefix.as_str() => s.clone(),
                _ => prefix.clone(),
            };
            let mut records = Vec::new();
            let mut more = false;
            for item in kv.range(start.as_str()..).map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                if start_after.as_deref() == Some(k) {
                    continue;
                }
                if limit > 0 && records.len() == limit {
                    more = true;
                    break;
                }
                records.push(decode_kv(k, v.value())?);
            }
            Ok(ListResult { records, revision, more })
        })
        .await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        super::check_value_size(key, &value)?;
        Ok(self.write(key, WriteOp::Create(value)).await?.0)
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected_revision: i64) -> Result<i64> {
        super::check_value_size(key, &value)?;
        Ok(self.write(key, WriteOp::Update(value, expected_revision)).await?.0)
    }

    async fn delete(&self, key: &str, expected_revision: Option<i64>) -> Result<(i64, Record)> {
        let (rev, old) = self.write(key, WriteOp::Delete(expected_revision)).await?;
        let old = old.ok_or_else(|| StorageError::NotFound { key: key.to_string() })?;
        Ok((rev, old))
    }

    async fn current_revision(&self) -> Result<i64> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let meta = txn.open_table(META).map_err(db_err)?;
            Ok(rev_i64(meta.get(META_REV).map_err(db_err)?.map_or(1, |g| g.value())))
        })
        .await
    }

    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<EventStream> {
        // Subscribe before reading history so no write falls in between.
        let rx = self.inner.events.subscribe();
        let p = prefix.to_string();
        let (history, history_end) = self
            .blocking(move |inner| {
                let txn = inner.db.begin_read().map_err(db_err)?;
                let meta = txn.open_table(META).map_err(db_err)?;
                let log = txn.open_table(LOG).map_err(db_err)?;
                let current = meta.get(META_REV).map_err(db_err)?.map_or(1, |g| g.value());
                let compacted = meta.get(META_COMPACT).map_err(db_err)?.map_or(0, |g| g.value());
                let after = rev_u64(after_revision);
                if after < compacted {
                    return Err(StorageError::Compacted { requested: after_revision, compacted: rev_i64(compacted) });
                }
                let mut events = Vec::new();
                for item in log.range(after + 1..=current).map_err(db_err)? {
                    let (r, v) = item.map_err(db_err)?;
                    let ev = decode_event(rev_i64(r.value()), v.value())?;
                    if ev.key.starts_with(p.as_str()) {
                        events.push(Ok(ev));
                    }
                }
                Ok((events, rev_i64(current)))
            })
            .await?;
        let prefix = prefix.to_string();
        let live = BroadcastStream::new(rx).filter_map(move |item| {
            let out = match item {
                Ok(ev) if ev.revision > history_end && ev.key.starts_with(prefix.as_str()) => {
                    Some(Ok((*ev).clone()))
                }
                Ok(_) => None,
                Err(BroadcastStreamRecvError::Lagged(_)) => Some(Err(StorageError::WatcherLagged)),
            };
            futures::future::ready(out)
        });
        // A lagged watcher must stop: it missed events.
        let live = live.scan(false, |failed, item| {
            if *failed {
                return futures::future::ready(None);
            }
            *failed = item.is_err();
            futures::future::ready(Some(item))
        });
        Ok(Box::pin(futures::stream::iter(history).chain(live)))
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn crud_watch_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(&dir.path().join("db"), 5).unwrap();
        let r1 = s.create("/a/x", b"1".to_vec()).await.unwrap();
        assert!(matches!(s.create("/a/x", b"1".to_vec()).await, Err(StorageError::AlreadyExists { .. })));
        let r2 = s.update("/a/x", b"2".to_vec(), r1).await.unwrap();
        assert!(matches!(s.update("/a/x", b"3".to_vec(), r1).await, Err(StorageError::Conflict { .. })));
        s.create("/b/y", b"b".to_vec()).await.unwrap();
        let l = s.list("/a/", None, 0).await.unwrap();
        assert_eq!(l.records.len(), 1);
        assert_eq!(l.records[0].mod_revision, r2);
        let mut w = s.watch("/a/", r1 - 1).await.unwrap();
        let e = w.next().await.unwrap().unwrap();
        assert!(e.created && e.revision == r1);
        let e = w.next().await.unwrap().unwrap();
        assert_eq!(e.revision, r2);
        let (rd, _) = s.delete("/a/x", None).await.unwrap();
        let e = w.next().await.unwrap().unwrap();
        assert_eq!((e.kind, e.revision), (EventKind::Delete, rd));
        for i in 0..20 {
            s.create(&format!("/c/{i}"), vec![]).await.unwrap();
        }
        assert!(matches!(s.watch("/a/", r1).await, Err(StorageError::Compacted { .. })));
    }
}
