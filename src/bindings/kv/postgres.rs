//! KV namespaces in a shared PostgreSQL database (`backend = "postgres"`): one table
//! `moat_kv (ns, key, value, expiration, metadata)` for every namespace. Each write notifies
//! [`crate::db::schema::KV_CHANNEL`] in the same statement, so every node drops its cached
//! copy of the key.

use std::sync::Arc;

use crate::db::pg::{Conn, Pg, Query};

use super::{Entry, KvBackend, KvError, Listed};

/// A KV backend on `pg`.
pub struct PgKv {
    pub pg: Arc<Pg>,
}

fn storage(e: String) -> KvError {
    KvError::Storage(e)
}

const GET: &str = "SELECT value, expiration, metadata FROM moat_kv WHERE ns = $1 AND key = $2";
const PUT: &str = "WITH w AS (
    INSERT INTO moat_kv (ns, key, value, expiration, metadata) VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value, expiration = EXCLUDED.expiration, metadata = EXCLUDED.metadata
    RETURNING 1)
SELECT pg_notify('moat_kv', $1 || ' ' || encode($2, 'hex')) FROM w";
const DELETE: &str = "WITH d AS (DELETE FROM moat_kv WHERE ns = $1 AND key = $2 RETURNING 1)
SELECT pg_notify('moat_kv', $1 || ' ' || encode($2, 'hex')) FROM d";
const LIST: &str = "SELECT key, expiration, metadata FROM moat_kv
WHERE ns = $1 AND key >= $2 AND key > $3 AND substring(key FROM 1 FOR $4) = $2
AND (expiration IS NULL OR expiration > $5) ORDER BY key LIMIT $6";
const PURGE: &str = "WITH d AS (DELETE FROM moat_kv WHERE expiration <= $1 RETURNING ns, key)
SELECT pg_notify('moat_kv', ns || ' ' || encode(key, 'hex')) FROM d";

fn secs(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

fn metadata(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

impl PgKv {
    fn run<T: Send + 'static>(
        &self,
        sql: &'static str,
        then: impl Fn(Arc<Conn>, tokio_postgres::Statement) -> Query<T> + Send + Sync + 'static,
    ) -> Result<T, KvError> {
        let then = Arc::new(then);
        self.pg
            .call(move |c| {
                let then = then.clone();
                Box::pin(async move {
                    let s = c.statement(sql).await?;
                    then(c, s).await
                })
            })
            .map_err(storage)
    }
}

impl KvBackend for PgKv {
    fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Entry>, KvError> {
        let (ns, key) = (ns.to_string(), key.to_vec());
        self.run(GET, move |c, s| {
            let (ns, key) = (ns.clone(), key.clone());
            Box::pin(async move {
                let row = c.client.query_opt(&s, &[&ns, &key]).await?;
                Ok(row.map(|r| Entry { value: r.get(0), expiration: secs(r.get(1)), metadata: metadata(r.get(2)) }))
            })
        })
    }

    fn put(&self, ns: &str, key: &[u8], entry: &Entry, metadata_json: &[u8]) -> Result<(), KvError> {
        let (ns, key, value) = (ns.to_string(), key.to_vec(), entry.value.clone());
        let expiration = entry.expiration.map(|x| x.min(i64::MAX as u64) as i64);
        let meta = (!metadata_json.is_empty()).then(|| String::from_utf8_lossy(metadata_json).into_owned());
        self.run(PUT, move |c, s| {
            let (ns, key, value, meta) = (ns.clone(), key.clone(), value.clone(), meta.clone());
            Box::pin(async move { c.client.query(&s, &[&ns, &key, &value, &expiration, &meta]).await.map(drop) })
        })
    }

    fn delete(&self, ns: &str, key: &[u8]) -> Result<(), KvError> {
        let (ns, key) = (ns.to_string(), key.to_vec());
        self.run(DELETE, move |c, s| {
            let (ns, key) = (ns.clone(), key.clone());
            Box::pin(async move { c.client.query(&s, &[&ns, &key]).await.map(drop) })
        })
    }

    fn list(
        &self,
        ns: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        take: usize,
        now: u64,
    ) -> Result<Vec<Listed>, KvError> {
        let (ns, prefix, after) = (ns.to_string(), prefix.to_vec(), after.unwrap_or_default().to_vec());
        let (now, take) = (now as i64, take as i64);
        self.run(LIST, move |c, s| {
            let (ns, prefix, after) = (ns.clone(), prefix.clone(), after.clone());
            Box::pin(async move {
                let plen = prefix.len() as i32;
                let rows = c.client.query(&s, &[&ns, &prefix, &after, &plen, &now, &take]).await?;
                Ok(rows
                    .into_iter()
                    .map(|r| Listed { name: r.get(0), expiration: secs(r.get(1)), metadata: metadata(r.get(2)) })
                    .collect())
            })
        })
    }

    fn purge_expired(&self, now: u64) -> Result<usize, KvError> {
        let now = now as i64;
        self.run(PURGE, move |c, s| Box::pin(async move { c.client.query(&s, &[&now]).await.map(|r| r.len()) }))
    }

    fn shared(&self) -> Option<&Arc<Pg>> {
        Some(&self.pg)
    }
}
