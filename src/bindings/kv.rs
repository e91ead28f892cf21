//! KV namespaces (SPEC 6) on redb: Workers-KV-shaped, durable once a write returns.
//!
//! Each namespace is one redb table (`kv/NAME`, and `storage/CONTAINER` for `ctx.storage`).
//! A value is stored with its expiration and metadata in front of it:
//! `[1][expiration: u64 LE, 0 = none][metadata length: u32 LE][metadata JSON][value]`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, TableDefinition, TableHandle};

/// Longest key, in bytes (as Workers KV).
pub const MAX_KEY: usize = 512;
/// Largest value (as Workers KV).
pub const MAX_VALUE: usize = 25 << 20;
/// Largest serialised metadata (as Workers KV).
pub const MAX_METADATA: usize = 1024;
/// Most keys one `list` returns.
pub const MAX_LIST: usize = 1000;

/// A KV failure; the message is what a script sees.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{0}")]
    Invalid(String),
    #[error("KV storage failed: {0}")]
    Storage(String),
}

fn storage(e: impl Into<redb::Error>) -> KvError {
    KvError::Storage(crate::db::describe(e.into()))
}

/// One stored value.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: Vec<u8>,
    /// Seconds since the epoch after which the entry is gone.
    pub expiration: Option<u64>,
    pub metadata: Option<serde_json::Value>,
}

/// A key in a `list` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub name: Vec<u8>,
    pub expiration: Option<u64>,
    pub metadata: Option<serde_json::Value>,
}

/// One page of `list`.
#[derive(Debug, Default)]
pub struct Page {
    pub keys: Vec<Listed>,
    pub complete: bool,
    /// Pass back as `cursor` to continue (hex of the last key returned).
    pub cursor: Option<String>,
}

/// One namespace's cached entries: key → entry (`None`: known to be absent).
type TableCache = std::collections::HashMap<Vec<u8>, Option<Arc<Entry>>>;

/// Bytes of values the read cache may hold before it starts over.
const CACHE_BUDGET: usize = 32 << 20;

/// Every KV namespace of this instance, in one database, with a write-through read cache:
/// a running moat is the only writer of its database (the CLI goes through it), so cached
/// entries never go stale, and reads that hit never touch redb or the blocking pool.
pub struct KvStore {
    db: Arc<redb::Database>,
    /// table → key → entry (`None`: known to be absent).
    cache: std::sync::RwLock<std::collections::HashMap<String, TableCache>>,
    cache_bytes: std::sync::atomic::AtomicUsize,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn encode(e: &Entry) -> Result<Vec<u8>, KvError> {
    let meta = match &e.metadata {
        Some(m) => serde_json::to_vec(m).map_err(|e| KvError::Invalid(format!("metadata: {e}")))?,
        None => Vec::new(),
    };
    let mut out = Vec::with_capacity(13 + meta.len() + e.value.len());
    out.push(1);
    out.extend_from_slice(&e.expiration.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&e.value);
    Ok(out)
}

fn decode(raw: &[u8]) -> Option<Entry> {
    if raw.len() < 13 || raw[0] != 1 {
        return None;
    }
    let exp = u64::from_le_bytes(raw[1..9].try_into().ok()?);
    let mlen = u32::from_le_bytes(raw[9..13].try_into().ok()?) as usize;
    let meta = raw.get(13..13 + mlen)?;
    let metadata = if mlen == 0 { None } else { serde_json::from_slice(meta).ok() };
    Some(Entry { value: raw[13 + mlen..].to_vec(), expiration: (exp != 0).then_some(exp), metadata })
}

fn live(e: &Entry, now: u64) -> bool {
    e.expiration.is_none_or(|x| x > now)
}

fn table(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// The table name of a namespace.
pub fn kv_table(binding: &str) -> String {
    format!("kv/{binding}")
}

/// The table name of a container's `ctx.storage`.
pub fn storage_table(container: &str) -> String {
    format!("storage/{container}")
}

impl KvStore {
    pub fn new(db: Arc<redb::Database>) -> Self {
        Self { db, cache: Default::default(), cache_bytes: Default::default() }
    }

    /// A cached answer for `get`: `Some(None)` means known absent; `None` means not cached.
    pub fn cached(&self, ns: &str, key: &[u8]) -> Option<Option<Arc<Entry>>> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let hit = cache.get(ns)?.get(key)?.clone();
        Some(hit.filter(|e| live(e, now_secs())))
    }

    fn remember(&self, ns: &str, key: &[u8], entry: Option<Arc<Entry>>) {
        use std::sync::atomic::Ordering;
        let size = key.len() + entry.as_ref().map_or(0, |e| e.value.len());
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if self.cache_bytes.fetch_add(size, Ordering::Relaxed) + size > CACHE_BUDGET {
            cache.clear();
            self.cache_bytes.store(size, Ordering::Relaxed);
        }
        cache.entry(ns.to_string()).or_default().insert(key.to_vec(), entry);
    }

    pub fn validate_key(key: &[u8]) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::Invalid("KV key must not be empty".into()));
        }
        if key.len() > MAX_KEY {
            return Err(KvError::Invalid(format!("KV key is {} bytes; the limit is {MAX_KEY}", key.len())));
        }
        Ok(())
    }

    /// The entry, or `None` if missing or expired.
    pub fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Entry>, KvError> {
        Self::validate_key(key)?;
        let tx = self.db.begin_read().map_err(storage)?;
        let t = match tx.open_table(table(ns)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        let found = t.get(key).map_err(storage)?.and_then(|raw| decode(raw.value()));
        self.remember(ns, key, found.clone().map(Arc::new));
        Ok(found.filter(|e| live(e, now_secs())))
    }

    /// Stores `entry`; durable when this returns (redb commits with immediate durability).
    pub fn put(&self, ns: &str, key: &[u8], entry: &Entry) -> Result<(), KvError> {
        Self::validate_key(key)?;
        if entry.value.len() > MAX_VALUE {
            return Err(KvError::Invalid(format!("KV value is {} bytes; the limit is 25 MiB", entry.value.len())));
        }
        let raw = encode(entry)?;
        if raw.len() - 13 - entry.value.len() > MAX_METADATA {
            return Err(KvError::Invalid(format!("KV metadata is larger than {MAX_METADATA} bytes of JSON")));
        }
        let tx = self.db.begin_write().map_err(storage)?;
        tx.open_table(table(ns)).map_err(storage)?.insert(key, raw.as_slice()).map_err(storage)?;
        tx.commit().map_err(storage)?;
        self.remember(ns, key, Some(Arc::new(entry.clone())));
        Ok(())
    }

    pub fn delete(&self, ns: &str, key: &[u8]) -> Result<(), KvError> {
        Self::validate_key(key)?;
        let tx = self.db.begin_write().map_err(storage)?;
        tx.open_table(table(ns)).map_err(storage)?.remove(key).map_err(storage)?;
        tx.commit().map_err(storage)?;
        self.remember(ns, key, None);
        Ok(())
    }

    /// Keys in byte order, starting after `cursor`, limited to `prefix`.
    pub fn list(&self, ns: &str, prefix: &[u8], limit: usize, cursor: Option<&str>) -> Result<Page, KvError> {
        let limit = limit.clamp(1, MAX_LIST);
        let after = match cursor {
            Some(c) => Some(hex_decode(c).ok_or_else(|| KvError::Invalid(format!("invalid list cursor {c:?}")))?),
            None => None,
        };
        let tx = self.db.begin_read().map_err(storage)?;
        let t = match tx.open_table(table(ns)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Page { complete: true, ..Default::default() }),
            Err(e) => return Err(storage(e)),
        };
        let start: &[u8] = after.as_deref().filter(|a| *a > prefix).unwrap_or(prefix);
        let now = now_secs();
        let mut page = Page::default();
        for row in t.range::<&[u8]>(start..).map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let key = k.value();
            if after.as_deref() == Some(key) {
                continue;
            }
            if !key.starts_with(prefix) {
                page.complete = true;
                return Ok(page);
            }
            let Some(e) = decode(v.value()).filter(|e| live(e, now)) else { continue };
            if page.keys.len() == limit {
                page.cursor = page.keys.last().map(|l| hex_encode(&l.name));
                return Ok(page);
            }
            page.keys.push(Listed { name: key.to_vec(), expiration: e.expiration, metadata: e.metadata });
        }
        page.complete = true;
        Ok(page)
    }

    /// Deletes expired entries of every namespace; returns how many.
    pub fn purge_expired(&self) -> Result<usize, KvError> {
        let names: Vec<String> = {
            let tx = self.db.begin_read().map_err(storage)?;
            tx.list_tables()
                .map_err(storage)?
                .map(|h| h.name().to_string())
                .filter(|n| n.starts_with("kv/") || n.starts_with("storage/"))
                .collect()
        };
        let now = now_secs();
        let mut purged = 0;
        for name in names {
            let tx = self.db.begin_write().map_err(storage)?;
            {
                let mut t = tx.open_table(table(&name)).map_err(storage)?;
                let n = t.extract_if(|_, v| decode(v).is_some_and(|e| !live(&e, now))).map_err(storage)?.count();
                purged += n;
            }
            tx.commit().map_err(storage)?;
        }
        Ok(purged)
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, KvStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        (dir, KvStore::new(Arc::new(db)))
    }

    fn entry(v: &str) -> Entry {
        Entry { value: v.as_bytes().to_vec(), expiration: None, metadata: None }
    }

    #[test]
    fn put_get_delete_and_expiry() {
        let (_d, kv) = store();
        assert_eq!(kv.get("kv/A", b"k").unwrap(), None);
        let e = Entry { metadata: Some(serde_json::json!({"a": 1})), ..entry("v") };
        kv.put("kv/A", b"k", &e).unwrap();
        assert_eq!(kv.get("kv/A", b"k").unwrap(), Some(e));
        assert_eq!(kv.get("kv/B", b"k").unwrap(), None, "namespaces are separate");
        kv.put("kv/A", b"old", &Entry { expiration: Some(now_secs() - 1), ..entry("x") }).unwrap();
        assert_eq!(kv.get("kv/A", b"old").unwrap(), None);
        assert_eq!(kv.purge_expired().unwrap(), 1);
        kv.delete("kv/A", b"k").unwrap();
        assert_eq!(kv.get("kv/A", b"k").unwrap(), None);
        assert!(kv.put("kv/A", &[b'x'; 513], &entry("v")).is_err());
    }

    #[test]
    fn list_pages_by_prefix() {
        let (_d, kv) = store();
        for k in ["a1", "a2", "a3", "a4", "a5", "b1"] {
            kv.put("kv/A", k.as_bytes(), &entry(k)).unwrap();
        }
        let p1 = kv.list("kv/A", b"a", 2, None).unwrap();
        assert_eq!(p1.keys.iter().map(|k| k.name.clone()).collect::<Vec<_>>(), [b"a1".to_vec(), b"a2".to_vec()]);
        assert!(!p1.complete);
        let p2 = kv.list("kv/A", b"a", 2, p1.cursor.as_deref()).unwrap();
        assert_eq!(p2.keys[0].name, b"a3");
        let p3 = kv.list("kv/A", b"a", 2, p2.cursor.as_deref()).unwrap();
        assert_eq!(p3.keys.len(), 1);
        assert!(p3.complete && p3.cursor.is_none());
        assert_eq!(kv.list("kv/A", b"", 1000, None).unwrap().keys.len(), 6);
    }
}
