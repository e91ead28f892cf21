//! Per-container overrides (SPEC 7.2): in memory for the request path, in a store so that a
//! restart keeps them: moat's redb file, or a database every node shares. With a shared
//! store, a change made on any node holds here from the next request: its notification
//! reloads that container at once, and a reconcile every [`RECONCILE_EVERY`] heals any
//! notification missed while the connection was down.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::db::overrides::{OverrideBackend, RedbOverrides};
use crate::policy::intercepts::{InterceptKind, InterceptSpec};
use crate::policy::overrides::{HandlerSpec, OverrideSpec, Setter, SetterError};
use crate::policy::{ContainerSettings, Overrides};
use crate::script::Generation;

/// How often every container's overrides are read again from a shared store.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// How often a setter retries when another node changed the same container meanwhile.
const SWAP_ATTEMPTS: usize = 8;

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("override store {path}: {msg}")]
pub struct StoreError {
    pub path: String,
    pub msg: String,
}

/// A container's overrides compiled for one generation (handler names checked against it).
type Compiled = (Arc<Generation>, Arc<Overrides>);

/// A container's spec and the exact text it is stored as (what a swap compares).
type Stored = (OverrideSpec, String);

/// Overrides of every container.
pub struct OverrideStore {
    backend: Arc<dyn OverrideBackend>,
    path: String,
    specs: RwLock<HashMap<String, Stored>>,
    /// Compiled per container for the generation it was compiled against.
    compiled: RwLock<HashMap<String, Compiled>>,
    /// What a container has for its life only (its start settings, its intercepts): in
    /// memory, dropped together by [`Self::container_ended`].
    lives: RwLock<HashMap<String, Life>>,
}

impl OverrideStore {
    /// Loads every stored override from `db` (`data_dir/moat.redb`).
    pub fn open(db: Arc<redb::Database>, data_dir: &Path) -> Result<Self, StoreError> {
        let shown = data_dir.join("moat.redb").display().to_string();
        Self::on(Arc::new(RedbOverrides { db }), shown)
    }

    /// Loads every stored override from `backend` (named `shown` in errors).
    pub fn on(backend: Arc<dyn OverrideBackend>, shown: String) -> Result<Self, StoreError> {
        let rows = backend.load_all().map_err(|msg| StoreError { path: shown.clone(), msg })?;
        let specs = rows.into_iter().filter_map(|(id, raw)| Some((id.clone(), (parse(&id, &raw)?, raw)))).collect();
        Ok(Self {
            backend,
            path: shown,
            specs: RwLock::new(specs),
            compiled: RwLock::new(HashMap::new()),
            lives: RwLock::new(HashMap::new()),
        })
    }

    /// With a shared store: follows its change notifications and reconciles every
    /// [`RECONCILE_EVERY`], on a thread of its own (store calls block).
    pub fn watch(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(pg) = self.backend.shared() else { return Ok(()) };
        let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
        pg.subscribe(crate::db::schema::OVERRIDES_CHANNEL, move |event| {
            let _ = tx.send(match event {
                crate::db::pg::Event::Notified(container) => Some(container.to_string()),
                // Reconnected: whatever changed meanwhile was not announced.
                crate::db::pg::Event::Listening | crate::db::pg::Event::Lost => None,
            });
        });
        let store = Arc::downgrade(self);
        std::thread::Builder::new().name("moat-overrides".into()).spawn(move || {
            let mut reconciled = std::time::Instant::now();
            loop {
                // A steady stream of notifications must not put the reconcile off.
                let next = rx.recv_timeout(RECONCILE_EVERY.saturating_sub(reconciled.elapsed()));
                let Some(store) = store.upgrade() else { return };
                let reconnected = matches!(next, Ok(None));
                let result = match next {
                    Ok(Some(container)) => store.backend.load(&container).map(|raw| store.adopt(&container, raw)),
                    Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(()),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                };
                let due = reconciled.elapsed() >= RECONCILE_EVERY || reconnected;
                let result = result.and_then(|()| if due { store.reconcile() } else { Ok(()) });
                if due {
                    reconciled = std::time::Instant::now();
                }
                if let Err(e) = result {
                    tracing::debug!("overrides: {}: {e}", store.path);
                }
            }
        })?;
        Ok(())
    }

    /// Reads every container's overrides again and adopts what changed.
    fn reconcile(&self) -> Result<(), String> {
        let mut rows: HashMap<String, String> = self.backend.load_all()?.into_iter().collect();
        let known: Vec<String> = self.specs.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        for id in known {
            let raw = rows.remove(&id);
            self.adopt(&id, raw);
        }
        for (id, raw) in rows {
            self.adopt(&id, Some(raw));
        }
        Ok(())
    }

    /// Takes `raw` as `container`'s stored overrides (`None`: it has none).
    fn adopt(&self, container: &str, raw: Option<String>) {
        let mut specs = self.specs.write().unwrap_or_else(|e| e.into_inner());
        if specs.get(container).map(|(_, r)| r) == raw.as_ref() {
            return;
        }
        self.keep(&mut specs, container, raw.and_then(|r| Some((parse(container, &r)?, r))));
    }

    /// Sets `container`'s entry in `specs` (`None`: removes it); its compiled overrides are
    /// made again on the next request.
    fn keep(&self, specs: &mut HashMap<String, Stored>, container: &str, stored: Option<Stored>) {
        match stored {
            Some(stored) => specs.insert(container.to_string(), stored),
            None => specs.remove(container),
        };
        self.compiled.write().unwrap_or_else(|e| e.into_inner()).remove(container);
    }

    /// The compiled overrides of `container` for `generation`, if it has any.
    pub fn get(&self, container: &str, generation: &Arc<Generation>) -> Option<Arc<Overrides>> {
        let cached = self.compiled.read().unwrap_or_else(|e| e.into_inner()).get(container).cloned();
        if let Some((_, o)) = cached.filter(|(g, _)| Arc::ptr_eq(g, generation)) {
            return Some(o);
        }
        let spec = self.specs.read().unwrap_or_else(|e| e.into_inner()).get(container).map(|(s, _)| s.clone());
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
        self.specs.read().unwrap_or_else(|e| e.into_inner()).get(container).map(|(s, _)| s.clone()).unwrap_or_default()
    }

    /// Every container with overrides.
    pub fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.specs.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Applies a setter, validated against `generation`'s class; durable once it returns.
    /// Compare-and-swap against the store: when another node changed this container
    /// meanwhile, its change is read and the setter applied on top of it.
    pub fn apply(&self, container: &str, setter: Setter, generation: &Generation) -> Result<OverrideSpec, ApplyError> {
        let mut specs = self.specs.write().unwrap_or_else(|e| e.into_inner());
        let store_err = |msg: String| ApplyError::Store(StoreError { path: self.path.clone(), msg });
        for _ in 0..SWAP_ATTEMPTS {
            let (mut spec, old) = match specs.get(container) {
                Some((spec, raw)) => (spec.clone(), Some(raw.clone())),
                None => (OverrideSpec::default(), None),
            };
            spec.apply(setter.clone(), &generation.class, &generation.policy).map_err(ApplyError::Setter)?;
            let new = if spec.is_empty() {
                None
            } else {
                Some(serde_json::to_string(&spec).map_err(|e| store_err(e.to_string()))?)
            };
            if self.backend.swap(container, old.as_deref(), new.as_deref()).map_err(store_err)? {
                self.keep(&mut specs, container, new.map(|raw| (spec.clone(), raw)));
                return Ok(spec);
            }
            // Changed elsewhere: take what the store has now and apply the setter to it.
            let stored = match self.backend.load(container).map_err(store_err)? {
                Some(raw) => match parse(container, &raw) {
                    Some(spec) => Some((spec, raw)),
                    None => return Err(store_err(format!("container {container}'s stored overrides are unreadable"))),
                },
                None => None,
            };
            self.keep(&mut specs, container, stored);
        }
        Err(store_err(format!("container {container}'s overrides kept changing on other nodes; try again")))
    }
}

/// A stored spec, or `None` (logged) when it does not parse.
fn parse(container: &str, raw: &str) -> Option<OverrideSpec> {
    serde_json::from_str(raw)
        .map_err(|e| tracing::warn!("dropping unreadable overrides of container {container}: {e}"))
        .ok()
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
