//! KV namespaces (SPEC 6): Workers-KV-shaped, durable once a write returns, on a backend
//! ([`KvBackend`]): moat's redb file by default ([`redb::RedbKv`]), or a shared PostgreSQL
//! database ([`postgres::PgKv`]). [`KvStore`] is what the rest of moat uses: it validates,
//! pages, routes each namespace to its backend and keeps a read cache.

pub mod postgres;
pub mod redb;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::db::pg::Event;

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

/// Where namespaces are stored. Keys, values and limits are checked before a backend is
/// called; a backend stores and finds. The contract every backend passes is the conformance
/// suite (`tests/it/kv_conformance.rs`).
pub trait KvBackend: Send + Sync {
    /// The entry as stored, expired or not.
    fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Entry>, KvError>;
    /// Stores `entry` (its metadata already serialised as `metadata_json`, empty for none);
    /// durable when this returns.
    fn put(&self, ns: &str, key: &[u8], entry: &Entry, metadata_json: &[u8]) -> Result<(), KvError>;
    fn delete(&self, ns: &str, key: &[u8]) -> Result<(), KvError>;
    /// Up to `take` live keys that start with `prefix` and sort after `after`, in byte order.
    fn list(
        &self,
        ns: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        take: usize,
        now: u64,
    ) -> Result<Vec<Listed>, KvError>;
    /// Deletes entries that expired at `now` or before; returns how many.
    fn purge_expired(&self, now: u64) -> Result<usize, KvError>;
    /// The shared database behind this backend, whose notifications say what other nodes
    /// changed; `None` when this process is the only writer.
    fn shared(&self) -> Option<&Arc<crate::db::pg::Pg>> {
        None
    }
}

/// One namespace's cached entries: key → entry (`None`: known to be absent).
type TableCache = HashMap<Vec<u8>, Option<Arc<Entry>>>;

/// Bytes of values the read cache may hold before it starts over.
const CACHE_BUDGET: usize = 32 << 20;

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn live(e: &Entry, now: u64) -> bool {
    e.expiration.is_none_or(|x| x > now)
}

/// The table name of a namespace.
pub fn kv_table(binding: &str) -> String {
    format!("kv/{binding}")
}

/// The table name of a container's `ctx.storage`.
pub fn storage_table(container: &str) -> String {
    format!("storage/{container}")
}

/// Every KV namespace of this instance, each on its backend, with a write-through read cache.
///
/// The cache is exact: a namespace in moat's own redb file has this process as its only
/// writer (the CLI goes through it); a namespace in a shared database is cached only while
/// the database's change notifications arrive, and each one drops the key it names. When the
/// notification connection is lost, the cache of shared namespaces is emptied and bypassed
/// until it is back.
pub struct KvStore {
    /// `kv/NAME` of a binding with its own backend → that backend.
    routes: HashMap<String, Arc<dyn KvBackend>>,
    /// Every other `kv/NAME`.
    default: Arc<dyn KvBackend>,
    /// `storage/CONTAINER` (ctx.storage).
    storage: Arc<dyn KvBackend>,
    /// table → key → entry (`None`: known to be absent).
    cache: std::sync::RwLock<HashMap<String, TableCache>>,
    cache_bytes: AtomicUsize,
    /// Whether any namespace is on a shared database (else every read may use the cache, and
    /// a cached read looks up no backend).
    any_shared: bool,
    /// Whether shared namespaces may be served from the cache now.
    shared_cache_on: AtomicBool,
    /// Bumped by every invalidation: a read that started before one must not fill the cache.
    epoch: AtomicU64,
}

impl KvStore {
    /// Every namespace in moat's redb file.
    pub fn new(db: Arc<::redb::Database>) -> Self {
        let backend: Arc<dyn KvBackend> = Arc::new(redb::RedbKv { db });
        Self::with_backends(backend.clone(), HashMap::new(), backend)
    }

    /// Namespaces on `default`, but those `routes` names (`kv/NAME`), and ctx.storage on `storage`.
    pub fn with_backends(
        default: Arc<dyn KvBackend>,
        routes: HashMap<String, Arc<dyn KvBackend>>,
        storage: Arc<dyn KvBackend>,
    ) -> Self {
        let any_shared = routes.values().chain([&default, &storage]).any(|b| b.shared().is_some());
        Self {
            any_shared,
            routes,
            default,
            storage,
            cache: Default::default(),
            cache_bytes: Default::default(),
            shared_cache_on: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }
    }

    /// Subscribes the cache to the change notifications of every shared database behind it.
    pub fn watch(self: &Arc<Self>) {
        let mut seen: Vec<*const crate::db::pg::Pg> = Vec::new();
        let backends = self.routes.values().chain([&self.default, &self.storage]);
        for pg in backends.filter_map(|b| b.shared()) {
            if seen.contains(&Arc::as_ptr(pg)) {
                continue;
            }
            seen.push(Arc::as_ptr(pg));
            let store = Arc::downgrade(self);
            pg.subscribe(crate::db::schema::KV_CHANNEL, move |event| {
                let Some(store) = store.upgrade() else { return };
                match event {
                    Event::Notified(payload) => {
                        if let Some((ns, key)) = payload.rsplit_once(' ').and_then(|(ns, k)| Some((ns, hex_decode(k)?)))
                        {
                            store.forget(Some((ns, &key)));
                        }
                    }
                    Event::Lost => {
                        store.shared_cache_on.store(false, Ordering::SeqCst);
                        store.forget(None);
                    }
                    Event::Listening => {
                        store.forget(None);
                        store.shared_cache_on.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
    }

    fn backend(&self, ns: &str) -> &Arc<dyn KvBackend> {
        if ns.starts_with("storage/") {
            return &self.storage;
        }
        self.routes.get(ns).unwrap_or(&self.default)
    }

    /// Whether `ns`'s entries may be cached now.
    fn cacheable(&self, ns: &str) -> bool {
        !self.any_shared || self.backend(ns).shared().is_none() || self.shared_cache_on.load(Ordering::SeqCst)
    }

    /// Drops one cached key, or everything.
    fn forget(&self, what: Option<(&str, &[u8])>) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        match what {
            Some((ns, key)) => {
                if let Some(t) = cache.get_mut(ns) {
                    t.remove(key);
                }
            }
            None => {
                cache.clear();
                self.cache_bytes.store(0, Ordering::Relaxed);
            }
        }
    }

    /// A cached answer for `get`: `Some(None)` means known absent; `None` means not cached.
    pub fn cached(&self, ns: &str, key: &[u8]) -> Option<Option<Arc<Entry>>> {
        if !self.cacheable(ns) {
            return None;
        }
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let hit = cache.get(ns)?.get(key)?.clone();
        Some(hit.filter(|e| live(e, now_secs())))
    }

    /// Caches what a read or write that began at `epoch` saw, unless something was
    /// invalidated since (it may be older than what the notification announced).
    fn remember(&self, ns: &str, key: &[u8], entry: Option<Arc<Entry>>, epoch: u64) {
        if !self.cacheable(ns) {
            return;
        }
        let size = key.len() + entry.as_ref().map_or(0, |e| e.value.len());
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
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
        let epoch = self.epoch.load(Ordering::SeqCst);
        let found = self.backend(ns).get(ns, key)?;
        self.remember(ns, key, found.clone().map(Arc::new), epoch);
        Ok(found.filter(|e| live(e, now_secs())))
    }

    /// Stores `entry`; durable when this returns.
    pub fn put(&self, ns: &str, key: &[u8], entry: &Entry) -> Result<(), KvError> {
        Self::validate_key(key)?;
        if entry.value.len() > MAX_VALUE {
            return Err(KvError::Invalid(format!("KV value is {} bytes; the limit is 25 MiB", entry.value.len())));
        }
        let meta = match &entry.metadata {
            Some(m) => serde_json::to_vec(m).map_err(|e| KvError::Invalid(format!("metadata: {e}")))?,
            None => Vec::new(),
        };
        if meta.len() > MAX_METADATA {
            return Err(KvError::Invalid(format!("KV metadata is larger than {MAX_METADATA} bytes of JSON")));
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.backend(ns).put(ns, key, entry, &meta)?;
        self.remember(ns, key, Some(Arc::new(entry.clone())), epoch);
        Ok(())
    }

    pub fn delete(&self, ns: &str, key: &[u8]) -> Result<(), KvError> {
        Self::validate_key(key)?;
        let epoch = self.epoch.load(Ordering::SeqCst);
        self.backend(ns).delete(ns, key)?;
        self.remember(ns, key, None, epoch);
        Ok(())
    }

    /// Keys in byte order, starting after `cursor`, limited to `prefix`.
    pub fn list(&self, ns: &str, prefix: &[u8], limit: usize, cursor: Option<&str>) -> Result<Page, KvError> {
        let limit = limit.clamp(1, MAX_LIST);
        let after = match cursor {
            Some(c) => Some(hex_decode(c).ok_or_else(|| KvError::Invalid(format!("invalid list cursor {c:?}")))?),
            None => None,
        };
        let mut keys = self.backend(ns).list(ns, prefix, after.as_deref(), limit + 1, now_secs())?;
        let complete = keys.len() <= limit;
        keys.truncate(limit);
        let cursor = if complete { None } else { keys.last().map(|l| hex_encode(&l.name)) };
        Ok(Page { keys, complete, cursor })
    }

    /// Deletes expired entries of every namespace; returns how many.
    pub fn purge_expired(&self) -> Result<usize, KvError> {
        let now = now_secs();
        let mut purged = 0;
        let mut seen: Vec<*const dyn KvBackend> = Vec::new();
        for b in self.routes.values().chain([&self.default, &self.storage]) {
            if !seen.iter().any(|p| std::ptr::addr_eq(*p, Arc::as_ptr(b))) {
                seen.push(Arc::as_ptr(b));
                purged += b.purge_expired(now)?;
            }
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
