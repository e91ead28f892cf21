//! KV namespaces in moat's own redb file: each namespace one table (`kv/NAME`,
//! `storage/CONTAINER`), each value stored with its expiration and metadata in front of it:
//! `[1][expiration: u64 LE, 0 = none][metadata length: u32 LE][metadata JSON][value]`.

use std::sync::Arc;

use redb::{ReadableDatabase, TableDefinition, TableHandle};

use super::{Entry, KvBackend, KvError, Listed, live};

fn storage(e: impl Into<redb::Error>) -> KvError {
    KvError::Storage(crate::db::describe(e.into()))
}

fn table(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// The embedded default: durable once a write returns (redb commits with immediate durability).
pub struct RedbKv {
    pub db: Arc<redb::Database>,
}

fn encode(e: &Entry, meta: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + meta.len() + e.value.len());
    out.push(1);
    out.extend_from_slice(&e.expiration.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(&e.value);
    out
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

impl KvBackend for RedbKv {
    fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Entry>, KvError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let t = match tx.open_table(table(ns)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        Ok(t.get(key).map_err(storage)?.and_then(|raw| decode(raw.value())))
    }

    fn put(&self, ns: &str, key: &[u8], entry: &Entry, metadata_json: &[u8]) -> Result<(), KvError> {
        let raw = encode(entry, metadata_json);
        let tx = self.db.begin_write().map_err(storage)?;
        tx.open_table(table(ns)).map_err(storage)?.insert(key, raw.as_slice()).map_err(storage)?;
        tx.commit().map_err(storage)
    }

    fn delete(&self, ns: &str, key: &[u8]) -> Result<(), KvError> {
        let tx = self.db.begin_write().map_err(storage)?;
        tx.open_table(table(ns)).map_err(storage)?.remove(key).map_err(storage)?;
        tx.commit().map_err(storage)
    }

    fn list(
        &self,
        ns: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        take: usize,
        now: u64,
    ) -> Result<Vec<Listed>, KvError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let t = match tx.open_table(table(ns)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let start: &[u8] = after.filter(|a| *a > prefix).unwrap_or(prefix);
        let mut out = Vec::new();
        for row in t.range::<&[u8]>(start..).map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let key = k.value();
            if after == Some(key) {
                continue;
            }
            if !key.starts_with(prefix) || out.len() == take {
                break;
            }
            let Some(e) = decode(v.value()).filter(|e| live(e, now)) else { continue };
            out.push(Listed { name: key.to_vec(), expiration: e.expiration, metadata: e.metadata });
        }
        Ok(out)
    }

    fn purge_expired(&self, now: u64) -> Result<usize, KvError> {
        let names: Vec<String> = {
            let tx = self.db.begin_read().map_err(storage)?;
            tx.list_tables()
                .map_err(storage)?
                .map(|h| h.name().to_string())
                .filter(|n| n.starts_with("kv/") || n.starts_with("storage/"))
                .collect()
        };
        let mut purged = 0;
        for name in names {
            let tx = self.db.begin_write().map_err(storage)?;
            {
                let mut t = tx.open_table(table(&name)).map_err(storage)?;
                purged += t.extract_if(|_, v| decode(v).is_some_and(|e| !live(&e, now))).map_err(storage)?.count();
            }
            tx.commit().map_err(storage)?;
        }
        Ok(purged)
    }
}
