//! etcd v3 storage: the same contract on etcd's own MVCC.
//!
//! etcd already has what the apiserver needs: a global revision (used as
//! resourceVersion), compare-and-swap transactions on a key's mod revision,
//! watches from a revision with the previous value, and compaction that
//! makes old revisions unavailable. Keys are stored under a prefix so
//! several clusters can share an etcd. A background task compacts history
//! to the last `history` revisions, as kube-apiserver does periodically.

use std::{sync::Arc, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, TxnOp, TxnOpResponse,
    WatchOptions,
};
use futures::StreamExt;

use super::{Event, EventKind, EventStream, ListResult, Record, Result, Store, StorageError};

fn etcd_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Etcd(e.to_string())
}

pub struct EtcdStore {
    client: Client,
    prefix: String,
    compactor: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.compactor.abort();
    }
}

/// The first key after every key starting with `p` (etcd's prefix range end).
fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Largest gRPC response we accept (kube-apiserver sets MaxInt32 too).
const MAX_MESSAGE: usize = i32::MAX as usize;

impl EtcdStore {
    /// Connect to `endpoints` (e.g. `http://127.0.0.1:2379`), storing keys
    /// under `prefix` and keeping about `history` revisions.
    pub async fn connect(endpoints: &[String], prefix: &str, history: u64) -> Result<Self> {
        let client = Client::connect(endpoints, None).await.map_err(etcd_err)?;
        // Fail early if etcd is not reachable.
        client.kv_client().get("health-probe", None).await.map_err(etcd_err)?;
        let history = i64::try_from(history.max(1)).unwrap_or(i64::MAX);
        let compactor = tokio::spawn(compact_loop(client.clone(), history));
        Ok(Self { client, prefix: prefix.trim_end_matches('/').to_string(), compactor })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn strip(&self, key: &[u8]) -> Result<String> {
        let k = std::str::from_utf8(key).map_err(etcd_err)?;
        Ok(k.strip_prefix(self.prefix.as_str()).unwrap_or(k).to_string())
    }

    fn record(&self, kv: &etcd_client::KeyValue) -> Result<Record> {
        Ok(Record {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
        })
    }

    async fn current_of(&self, key: &str) -> Result<i64> {
        let resp = self.client.kv_client().get(self.full(key), None).await.map_err(etcd_err)?;
        Ok(resp.kvs().first().map_or(0, etcd_client::KeyValue::mod_revision))
    }
}

async fn compact_loop(client: Client, history: i64) {
    let mut compacted = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Ok(resp) = client.kv_client().get("compact-probe", None).await else { continue };
        let rev = resp.header().map_or(0, etcd_client::ResponseHeader::revision);
        let target = rev - history;
        if target > compacted {
            match client.kv_client().compact(target, None).await {
                Ok(_) => compacted = target,
                Err(e) => tracing::debug!(error = %e, "etcd compaction"),
            }
        }
    }
}

fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, etcd_client::ResponseHeader::revision)
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Record>> {
        let resp = self.client.kv_client().get(self.full(key), None).await.map_err(etcd_err)?;
        resp.kvs().first().map(|kv| self.record(kv)).transpose()
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListResult> {
        let full_prefix = self.full(prefix);
        let end = prefix_end(full_prefix.as_bytes());
        let start = match start_after {
            Some(s) => {
                let mut k = self.full(s).into_bytes();
                k.push(0);
                k
            }
            None => full_prefix.into_bytes(),
        };
        let mut opts = GetOptions::new().with_range(end);
        if limit > 0 {
            opts = opts.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        // A list of every pod can be far above gRPC's default 4 MiB.
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let resp = kv.get(start, Some(opts)).await.map_err(etcd_err)?;
        let records = resp.kvs().iter().map(|kv| self.record(kv)).collect::<Result<Vec<_>>>()?;
        Ok(ListResult { records, revision: header_rev(resp.header()), more: resp.more() })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        super::check_value_size(key, &value)?;
        let k = self.full(key);
        let txn = etcd_client::Txn::new()
            .when(vec![Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(k, value, None)]);
        let resp = self.client.kv_client().txn(txn).await.map_err(etcd_err)?;
        if !resp.succeeded() {
            return Err(StorageError::AlreadyExists { key: key.to_string() });
        }
        Ok(header_rev(resp.header()))
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected_revision: i64) -> Result<i64> {
        super::check_value_size(key, &value)?;
        let k = self.full(key);
        let txn = etcd_client::Txn::new()
            .when(vec![Compare::mod_revision(k.clone(), CompareOp::Equal, expected_revision)])
            .and_then(vec![TxnOp::put(k, value, None)]);
        let resp = self.client.kv_client().txn(txn).await.map_err(etcd_err)?;
        if !resp.succeeded() {
            let found = self.current_of(key).await?;
            if found == 0 {
                return Err(StorageError::NotFound { key: key.to_string() });
            }
            return Err(StorageError::Conflict { key: key.to_string(), expected: expected_revision, found });
        }
        Ok(header_rev(resp.header()))
    }

    async fn delete(&self, key: &str, expected_revision: Option<i64>) -> Result<(i64, Record)> {
        let k = self.full(key);
        let cmp = match expected_revision {
            Some(r) => Compare::mod_revision(k.clone(), CompareOp::Equal, r),
            None => Compare::create_revision(k.clone(), CompareOp::Greater, 0),
        };
        let txn = etcd_client::Txn::new()
            .when(vec![cmp])
            .and_then(vec![TxnOp::delete(k, Some(DeleteOptions::new().with_prev_key()))]);
        let resp = self.client.kv_client().txn(txn).await.map_err(etcd_err)?;
        if !resp.succeeded() {
            let found = self.current_of(key).await?;
            if found == 0 {
                return Err(StorageError::NotFound { key: key.to_string() });
            }
            return Err(StorageError::Conflict {
                key: key.to_string(),
                expected: expected_revision.unwrap_or(0),
                found,
            });
        }
        let rev = header_rev(resp.header());
        for op in resp.op_responses() {
            if let TxnOpResponse::Delete(d) = op
                && let Some(prev) = d.prev_kvs().first()
            {
                return Ok((rev, self.record(prev)?));
            }
        }
        Err(StorageError::NotFound { key: key.to_string() })
    }

    async fn current_revision(&self) -> Result<i64> {
        let resp = self.client.kv_client().get("revision-probe", None).await.map_err(etcd_err)?;
        Ok(header_rev(resp.header()))
    }

    async fn watch(&self, prefix: &str, after_revision: i64) -> Result<EventStream> {
        let full_prefix = self.full(prefix);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after_revision + 1);
        let mut stream =
            self.client.watch_client().max_decoding_message_size(MAX_MESSAGE).watch(full_prefix, Some(opts)).await.map_err(etcd_err)?;
        // etcd answers a compacted start revision with a canceled response
        // carrying compact_revision; look at the first response to report it
        // synchronously, like the embedded store.
        let first = stream.message().await.map_err(etcd_err)?;
        let strip_len = self.prefix.len();
        let convert = Arc::new(move |resp: etcd_client::WatchResponse| -> Vec<Result<Event>> {
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return vec![Err(StorageError::Compacted {
                        requested: after_revision,
                        compacted: resp.compact_revision(),
                    })];
                }
                return vec![Err(StorageError::Etcd(format!("watch canceled: {}", resp.cancel_reason())))];
            }
            resp.events()
                .iter()
                .filter_map(|e| {
                    let kv = e.kv()?;
                    let key = String::from_utf8_lossy(kv.key()).get(strip_len..)?.to_string();
                    let prev = e.prev_kv().map(|p| p.value().to_vec());
                    Some(Ok(match e.event_type() {
                        EventType::Put => Event {
                            kind: EventKind::Put,
                            key,
                            value: kv.value().to_vec(),
                            created: kv.create_revision() == kv.mod_revision(),
                            prev,
                            revision: kv.mod_revision(),
                        },
                        EventType::Delete => Event {
                            kind: EventKind::Delete,
                            key,
                            value: prev.clone().unwrap_or_default(),
                            created: false,
                            prev,
                            revision: kv.mod_revision(),
                        },
                    }))
                })
                .collect()
        });
        let mut initial = Vec::new();
        if let Some(resp) = first {
            let evs = convert(resp);
            if let Some(Err(StorageError::Compacted { requested, compacted })) = evs.first() {
                return Err(StorageError::Compacted { requested: *requested, compacted: *compacted });
            }
            initial = evs;
        }
        let conv = convert.clone();
        let rest = stream
            .map(move |r| match r {
                Ok(resp) => conv(resp),
                Err(e) => vec![Err(etcd_err(e))],
            })
            .flat_map(futures::stream::iter);
        Ok(Box::pin(futures::stream::iter(initial).chain(rest)))
    }

    fn name(&self) -> &'static str {
        "etcd"
    }
}
