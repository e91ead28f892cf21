//! Where per-container overrides live: in memory for the request path, in redb so that a
//! restart keeps them (SPEC 7.2).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::policy::intercepts::{InterceptKind, InterceptSpec};
use crate::policy::overrides::{HandlerSpec, OverrideSpec, Setter, SetterError};
use crate::policy::{ContainerSettings, Overrides};
use crate::script::Generation;

/// container id → JSON of its [`OverrideSpec`].
const TABLE: TableDefinition<'_, &str, &str> = TableDefinition::new("overrides");

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("override store {path}: {msg}")]
pub struct StoreError {
    pub path: String,
    pub msg: String,
}

/// A container's overrides compiled for one generation (handler names checked against it).
type Compiled = (Arc<Generation>, Arc<Overrides>);

/// Overrides of every container.
pub struct OverrideStore {
    db: Arc<redb::Database>,
    path: String,
    specs: RwLock<HashMap<String, OverrideSpec>>,
    /// Compiled per container for the generation it was compiled against.
    compiled: RwLock<HashMap<String, Compiled>>,
    /// What running containers were started with: in memory only, for their life.
    /// What a container has for its life only (its start settings, its intercepts): in
    /// memory, dropped together by [`Self::container_ended`].
    lives: RwLock<HashMap<String, Life>>,
}

impl OverrideStore {
    /// Loads every stored override from `db` (`data_dir/moat.redb`).
    pub fn open(db: Arc<redb::Database>, data_dir: &Path) -> Result<Self, StoreError> {
        let shown = data_dir.join("moat.redb").display().to_string();
        let err = |msg: String| StoreError { path: shown.clone(), msg };
        let mut specs = HashMap::new();
        let read = db.begin_read().map_err(|e| err(e.to_string()))?;
        match read.open_table(TABLE) {
            Ok(table) => {
                for row in table.iter().map_err(|e| err(e.to_string()))? {
                    let (k, v) = row.map_err(|e| err(e.to_string()))?;
                    match serde_json::from_str::<OverrideSpec>(v.value()) {
                        Ok(spec) => {
                            specs.insert(k.value().to_string(), spec);
                        }
                        Err(e) => tracing::warn!("dropping unreadable overrides of container {}: {e}", k.value()),
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(err(e.to_string())),
        }
        drop(read);
        Ok(Self {
            db,
            path: shown,
            specs: RwLock::new(specs),
            compiled: RwLock::new(HashMap::new()),
            lives: RwLock::new(HashMap::new()),
        })
    }

    /// The compiled overrides of `container` for `generation`, if it has any.
    pub fn get(&self, container: &str, generation: &Arc<Generation>) -> Option<Arc<Overrides>> {
        let cached = self.compiled.read().unwrap_or_else(|e| e.into_inner()).get(container).cloned();
        if let Some((_, o)) = cached.filter(|(g, _)| Arc::ptr_eq(g, generation)) {
            return Some(o);
        }
        let spec = self.specs.read().unwrap_or_else(|e| e.into_inner()).get(container).cloned();
        let life = self.lives.read().unwrap_or_else(|e| e.into_inner()).get(container).cloned();
        if spec.is_none() && life.is_none() {
            return None;
        }
        let (mut compiled, dropped) = spec.unwrap_or_default().compile(&generation.policy);
        if let Some(life) = life {
            compiled.settings = life.settings;
            compiled.intercepts = life.intercepts.compile(&generation.policy);
        }
        for name in dropped {
            tracing::warn!(container, class = %generation.class, "override names handler {name:?}, which generation {} no longer has: ignored", generation.number);
        }
        let compiled = Arc::new(compiled);
        self.compiled
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(container.to_string(), (generation.clone(), compiled.clone()));
        Some(compiled)
    }

    /// Sets what `container` runs with for as long as it runs (`moat run --internet`, …).
    pub fn set_settings(&self, container: &str, settings: ContainerSettings) {
        self.change_life(container, |life| life.settings = settings);
    }

    /// Forgets what `container` had for its life (settings, intercepts): it has stopped.
    pub fn container_ended(&self, container: &str) {
        self.lives.write().unwrap_or_else(|e| e.into_inner()).remove(container);
        self.compiled.write().unwrap_or_else(|e| e.into_inner()).remove(container);
    }

    /// Changes `container`'s [`Life`] (dropped when nothing is left in it); its compiled
    /// overrides are made again on the next request.
    fn change_life<T>(&self, container: &str, change: impl FnOnce(&mut Life) -> T) -> T {
        let mut lives = self.lives.write().unwrap_or_else(|e| e.into_inner());
        let mut life = lives.get(container).cloned().unwrap_or_default();
        let out = change(&mut life);
        if life.is_empty() {
            lives.remove(container);
        } else {
            lives.insert(container.to_string(), life);
        }
        self.compiled.write().unwrap_or_else(|e| e.into_inner()).remove(container);
        out
    }

    /// Adds an intercept for `container` (validated against `generation`'s class); it holds
    /// from the next request on, on open connections too, until it ends ([`Self::container_ended`]).
    pub fn intercept(
        &self,
        container: &str,
        kind: InterceptKind,
        target: Option<&str>,
        handler: HandlerSpec,
        generation: &Generation,
    ) -> Result<(), SetterError> {
        self.change_life(container, |life| {
            life.intercepts.add(kind, target, handler, &generation.class, &generation.policy)
        })
    }

    /// Drops `container`'s intercepts (`DELETE …/intercepts`).
    pub fn clear_intercepts(&self, container: &str) {
        self.change_life(container, |life| life.intercepts = InterceptSpec::default());
    }

    /// `container`'s intercepts as JSON (empty lists when none).
    pub fn intercepts_json(&self, container: &str) -> serde_json::Value {
        let lives = self.lives.read().unwrap_or_else(|e| e.into_inner());
        lives.get(container).map(|l| l.intercepts.to_json()).unwrap_or_else(|| InterceptSpec::default().to_json())
    }

    /// The overrides of `container` as set.
    pub fn spec(&self, container: &str) -> OverrideSpec {
        self.specs.read().unwrap_or_else(|e| e.into_inner()).get(container).cloned().unwrap_or_default()
    }

    /// Every container with overrides.
    pub fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.specs.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Applies a setter, validated against `generation`'s class; durable once it returns.
    pub fn apply(&self, container: &str, setter: Setter, generation: &Generation) -> Result<OverrideSpec, ApplyError> {
        let mut specs = self.specs.write().unwrap_or_else(|e| e.into_inner());
        let mut spec = specs.get(container).cloned().unwrap_or_default();
        spec.apply(setter, &generation.class, &generation.policy).map_err(ApplyError::Setter)?;
        self.persist(container, &spec).map_err(ApplyError::Store)?;
        if spec.is_empty() {
            specs.remove(container);
        } else {
            specs.insert(container.to_string(), spec.clone());
        }
        self.compiled.write().unwrap_or_else(|e| e.into_inner()).remove(container);
        Ok(spec)
    }

    fn persist(&self, container: &str, spec: &OverrideSpec) -> Result<(), StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError { path: self.path.clone(), msg: e.to_string() };
        let tx = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| err(&e))?;
            if spec.is_empty() {
                table.remove(container).map_err(|e| err(&e))?;
            } else {
                let json = serde_json::to_string(spec).map_err(|e| err(&e))?;
                table.insert(container, json.as_str()).map_err(|e| err(&e))?;
            }
        }
        tx.commit().map_err(|e| err(&e))
    }
}

/// What a container has for its life only.
#[derive(Clone, Default)]
struct Life {
    settings: ContainerSettings,
    intercepts: InterceptSpec,
}

impl Life {
    fn is_empty(&self) -> bool {
        self.settings.is_empty() && self.intercepts.is_empty()
    }
}

/// A setter that failed: the user's mistake, or the database.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Setter(SetterError),
    #[error(transparent)]
    Store(StoreError),
}
