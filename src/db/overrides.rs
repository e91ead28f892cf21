//! Where per-container overrides are kept (SPEC 7.2): container id → the JSON of its spec, in
//! moat's redb file or in a shared PostgreSQL database. Writes are compare-and-swap, so two
//! nodes changing one container's overrides at once cannot lose either change.

use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::pg::Pg;

/// container id → JSON of its override spec.
const TABLE: TableDefinition<'_, &str, &str> = TableDefinition::new("overrides");

/// A store of override specs as JSON text.
pub trait OverrideBackend: Send + Sync {
    /// Every container's spec.
    fn load_all(&self) -> Result<Vec<(String, String)>, String>;
    /// One container's spec.
    fn load(&self, container: &str) -> Result<Option<String>, String>;
    /// Replaces `container`'s spec by `new` (`None`: removes it) if it is still `old`;
    /// `Ok(false)` when it changed meanwhile (read it again and retry). Durable once it returns.
    fn swap(&self, container: &str, old: Option<&str>, new: Option<&str>) -> Result<bool, String>;
    /// The shared database whose notifications say which container changed, if any.
    fn shared(&self) -> Option<&Arc<Pg>> {
        None
    }
}

/// Overrides in moat's own redb file.
pub struct RedbOverrides {
    pub db: Arc<redb::Database>,
}

impl OverrideBackend for RedbOverrides {
    fn load_all(&self) -> Result<Vec<(String, String)>, String> {
        super::text_rows(&self.db, TABLE)
    }

    fn load(&self, container: &str) -> Result<Option<String>, String> {
        let read = self.db.begin_read().map_err(|e| e.to_string())?;
        match read.open_table(TABLE) {
            Ok(t) => Ok(t.get(container).map_err(|e| e.to_string())?.map(|v| v.value().to_string())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn swap(&self, container: &str, old: Option<&str>, new: Option<&str>) -> Result<bool, String> {
        let tx = self.db.begin_write().map_err(|e| super::describe(e.into()))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| e.to_string())?;
            let now = table.get(container).map_err(|e| e.to_string())?.map(|v| v.value().to_string());
            if now.as_deref() != old {
                return Ok(false);
            }
            match new {
                Some(json) => drop(table.insert(container, json).map_err(|e| e.to_string())?),
                None => drop(table.remove(container).map_err(|e| e.to_string())?),
            }
        }
        tx.commit().map_err(|e| super::describe(e.into()))?;
        Ok(true)
    }
}

/// Overrides in a shared PostgreSQL database (`[cluster] store`).
pub struct PgOverrides {
    pub pg: Arc<Pg>,
}

const LOAD_ALL: &str = "SELECT container, spec FROM moat_overrides";
const LOAD: &str = "SELECT spec FROM moat_overrides WHERE container = $1";
// Each change is one statement that notifies only when it changed a row: its row count says
// whether the swap happened.
const INSERT: &str = "WITH w AS (INSERT INTO moat_overrides (container, spec) VALUES ($1, $2)
    ON CONFLICT DO NOTHING RETURNING 1) SELECT pg_notify('moat_overrides', $1) FROM w";
const UPDATE: &str = "WITH w AS (UPDATE moat_overrides SET spec = $3 WHERE container = $1 AND spec = $2
    RETURNING 1) SELECT pg_notify('moat_overrides', $1) FROM w";
const DELETE: &str = "WITH w AS (DELETE FROM moat_overrides WHERE container = $1 AND spec = $2
    RETURNING 1) SELECT pg_notify('moat_overrides', $1) FROM w";

impl OverrideBackend for PgOverrides {
    fn load_all(&self) -> Result<Vec<(String, String)>, String> {
        self.pg.call(|c| {
            Box::pin(async move {
                let s = c.statement(LOAD_ALL).await?;
                Ok(c.client.query(&s, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
        })
    }

    fn load(&self, container: &str) -> Result<Option<String>, String> {
        let id = container.to_string();
        self.pg.call(move |c| {
            let id = id.clone();
            Box::pin(async move {
                let s = c.statement(LOAD).await?;
                Ok(c.client.query_opt(&s, &[&id]).await?.map(|r| r.get(0)))
            })
        })
    }

    fn swap(&self, container: &str, old: Option<&str>, new: Option<&str>) -> Result<bool, String> {
        let (id, old, new) = (container.to_string(), old.map(str::to_string), new.map(str::to_string));
        if old.is_none() && new.is_none() {
            return Ok(self.load(&id)?.is_none());
        }
        self.pg.call(move |c| {
            let (id, old, new) = (id.clone(), old.clone(), new.clone());
            Box::pin(async move {
                let rows = match (&old, &new) {
                    (None, Some(n)) => c.client.query(&c.statement(INSERT).await?, &[&id, n]).await?,
                    (Some(o), Some(n)) => c.client.query(&c.statement(UPDATE).await?, &[&id, o, n]).await?,
                    (Some(o), None) => c.client.query(&c.statement(DELETE).await?, &[&id, o]).await?,
                    (None, None) => unreachable!("handled above"),
                };
                Ok(rows.len() == 1)
            })
        })
    }

    fn shared(&self) -> Option<&Arc<Pg>> {
        Some(&self.pg)
    }
}
