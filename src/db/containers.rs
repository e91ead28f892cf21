//! The container registry (SPEC 5.3: `moat ps`, what `moat start` made and how it ended): each
//! node's records, in moat's redb file or in a shared PostgreSQL database. Shared, it also
//! keeps a container id to one node at a time: overrides are per container id across the
//! cluster, so two containers of one id on two nodes would share them.

use std::sync::Arc;

use redb::TableDefinition;

use super::pg::Pg;

/// container id → JSON of its status.
const TABLE: TableDefinition<'_, &str, &str> = TableDefinition::new("containers");

/// Where this node's container records are kept.
pub trait RegistryBackend: Send + Sync {
    /// This node's records (JSON).
    fn mine(&self) -> Result<Vec<String>, String>;
    /// Takes `id` for this node before its container starts; `Ok(Err(node))` when it runs
    /// on another node.
    fn claim(&self, id: &str) -> Result<Result<(), String>, String>;
    /// Stores this node's record of `id`; `running` false lets another node take the id.
    fn save(&self, id: &str, json: &str, running: bool) -> Result<(), String>;
    /// Gives `id` up after a start that failed (its record, if any, stays).
    fn release(&self, id: &str) -> Result<(), String>;
    /// The records of every other node: (node, JSON).
    fn others(&self) -> Result<Vec<(String, String)>, String>;
    /// Whether other nodes share this registry.
    fn shared(&self) -> bool {
        false
    }
}

/// The registry in moat's own redb file: one node.
pub struct RedbRegistry {
    pub db: Arc<redb::Database>,
}

impl RegistryBackend for RedbRegistry {
    fn mine(&self) -> Result<Vec<String>, String> {
        Ok(super::text_rows(&self.db, TABLE)?.into_iter().map(|(_, status)| status).collect())
    }

    fn claim(&self, _id: &str) -> Result<Result<(), String>, String> {
        Ok(Ok(()))
    }

    fn save(&self, id: &str, json: &str, _running: bool) -> Result<(), String> {
        let tx = self.db.begin_write().map_err(|e| super::describe(e.into()))?;
        tx.open_table(TABLE).map_err(|e| e.to_string())?.insert(id, json).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| super::describe(e.into()))
    }

    fn release(&self, _id: &str) -> Result<(), String> {
        Ok(())
    }

    fn others(&self) -> Result<Vec<(String, String)>, String> {
        Ok(Vec::new())
    }
}

/// The registry in a shared PostgreSQL database (`[cluster] store`).
pub struct PgRegistry {
    pub pg: Arc<Pg>,
    /// This node's name.
    pub node: String,
}

const MINE: &str = "SELECT status FROM moat_containers WHERE node = $1";
const OTHERS: &str = "SELECT node, status FROM moat_containers WHERE node <> $1";
// A new id, or one that this node has, or one whose container no longer runs (its old
// record, another node's, is dropped).
const CLAIM: &str = "INSERT INTO moat_containers (id, node, running, status) VALUES ($1, $2, true, '')
    ON CONFLICT (id) DO UPDATE SET node = EXCLUDED.node, running = true,
        status = CASE WHEN moat_containers.node = EXCLUDED.node THEN moat_containers.status ELSE '' END
    WHERE moat_containers.node = EXCLUDED.node OR NOT moat_containers.running
    RETURNING node";
const HOLDER: &str = "SELECT node FROM moat_containers WHERE id = $1";
const RELEASE: &str = "UPDATE moat_containers SET running = false WHERE id = $1 AND node = $2";
const SAVE: &str = "INSERT INTO moat_containers (id, node, running, status) VALUES ($1, $2, $3, $4)
    ON CONFLICT (id) DO UPDATE SET running = EXCLUDED.running, status = EXCLUDED.status
    WHERE moat_containers.node = EXCLUDED.node";

impl RegistryBackend for PgRegistry {
    fn mine(&self) -> Result<Vec<String>, String> {
        let node = self.node.clone();
        self.pg.call(move |c| {
            let node = node.clone();
            Box::pin(async move {
                let rows = c.client.query(&c.statement(MINE).await?, &[&node]).await?;
                Ok(rows.iter().map(|r| r.get::<_, String>(0)).filter(|s| !s.is_empty()).collect())
            })
        })
    }

    fn claim(&self, id: &str) -> Result<Result<(), String>, String> {
        let (id, node) = (id.to_string(), self.node.clone());
        self.pg.call(move |c| {
            let (id, node) = (id.clone(), node.clone());
            Box::pin(async move {
                if c.client.query_opt(&c.statement(CLAIM).await?, &[&id, &node]).await?.is_some() {
                    return Ok(Ok(()));
                }
                let holder = c.client.query_opt(&c.statement(HOLDER).await?, &[&id]).await?;
                Ok(Err(holder.map(|r| r.get(0)).unwrap_or_default()))
            })
        })
    }

    fn save(&self, id: &str, json: &str, running: bool) -> Result<(), String> {
        let (id, node, json) = (id.to_string(), self.node.clone(), json.to_string());
        self.pg.call(move |c| {
            let (id, node, json) = (id.clone(), node.clone(), json.clone());
            Box::pin(async move {
                c.client.execute(&c.statement(SAVE).await?, &[&id, &node, &running, &json]).await.map(drop)
            })
        })
    }

    fn release(&self, id: &str) -> Result<(), String> {
        let (id, node) = (id.to_string(), self.node.clone());
        self.pg.call(move |c| {
            let (id, node) = (id.clone(), node.clone());
            Box::pin(async move { c.client.execute(&c.statement(RELEASE).await?, &[&id, &node]).await.map(drop) })
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn others(&self) -> Result<Vec<(String, String)>, String> {
        let node = self.node.clone();
        self.pg.call(move |c| {
            let node = node.clone();
            Box::pin(async move {
                let rows = c.client.query(&c.statement(OTHERS).await?, &[&node]).await?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .filter(|(_, s): &(String, String)| !s.is_empty())
                    .collect())
            })
        })
    }
}
