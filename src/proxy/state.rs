//! State shared by every worker: config, the current generation of each class, overrides.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::overrides::OverrideStore;
use crate::bindings::Bindings;
use crate::config::{ClassConfig, Config};
use crate::script::{Generation, LoadError, load_generation};

/// One class: its script's current generation, or the error that kept it from loading.
pub struct ClassShared {
    pub config: ClassConfig,
    /// The generation new requests use; `None` until a first load succeeds (→ 503).
    current: RwLock<Option<Arc<Generation>>>,
    /// The last load error, if the last load failed.
    pub last_error: RwLock<Option<LoadError>>,
    next_number: AtomicU64,
}

impl ClassShared {
    pub fn new(config: ClassConfig) -> Self {
        Self { config, current: RwLock::new(None), last_error: RwLock::new(None), next_number: AtomicU64::new(1) }
    }

    pub fn current(&self) -> Option<Arc<Generation>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the script from disk; on success it becomes current, on failure the previous
    /// generation stays (SPEC 8.8).
    ///
    /// With a `gate` and a class that names its `tests`, the new generation must also pass
    /// them; a failing test keeps the previous generation as a load error would.
    pub fn reload(
        &self,
        limits: &crate::config::Limits,
        gate: Option<&TestGate>,
    ) -> Result<Arc<Generation>, LoadError> {
        let number = self.next_number.load(Ordering::Relaxed);
        let loaded = load_generation(&self.config.name, &self.config.policy, number, limits).and_then(|g| {
            match (&self.config.tests, gate) {
                (Some(tests), Some(gate)) => gate(&self.config).map(|()| g).map_err(|message| LoadError {
                    file: tests.clone(),
                    line: None,
                    message: format!("the new policy fails its tests, so it is not served: {message}"),
                }),
                _ => Ok(g),
            }
        });
        match loaded {
            Ok(g) => {
                self.next_number.fetch_add(1, Ordering::Relaxed);
                let g = Arc::new(g);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(g.clone());
                *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(g)
            }
            Err(e) => {
                *self.last_error.write().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Runs a class's `tests` file against its policy as saved (`moat test`'s runner, supplied
/// by `serve`); `Err` is the first failures, one line.
pub type TestGate = dyn Fn(&ClassConfig) -> Result<(), String> + Send + Sync;

/// Which class a listener, connection or request belongs to: its place in the config's list
/// of classes, fixed for the life of the process (classes are not added or removed while
/// moat runs, only their policies reloaded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassId(usize);

/// Everything workers share.
pub struct Shared {
    pub config: Config,
    /// Indexed by [`ClassId`].
    classes: Vec<ClassShared>,
    pub bindings: Bindings,
    pub overrides: Arc<OverrideStore>,
    pub metrics: crate::metrics::Metrics,
    pub started: std::time::Instant,
    /// Every address moat listens on (loop prevention, SPEC 8.4).
    pub own_listeners: Arc<Vec<SocketAddr>>,
    pub dns_hosts: Arc<BTreeMap<String, IpAddr>>,
    /// Upstream TLS (roots + `[tls] extra_ca`), shared by every worker.
    pub upstream_tls: crate::upstream::tls::UpstreamTls,
    /// moat's CA and the leaf certificates of intercepted hosts.
    pub leaves: crate::tls::LeafCache,
    /// Resident memory against `limits.memory_ceiling` (measured on worker heartbeats).
    pub memory: super::memory::MemoryWatch,
    /// Open client connections against `limits.max_connections`.
    pub admission: Arc<super::admission::Admission>,
    /// The daemon's containers (`moat serve`; none under `moat run`), for `moat.container(id)`.
    pub lifecycle: std::sync::OnceLock<Arc<dyn crate::lifecycle::Lifecycle>>,
    /// How a reload runs a class's `tests` (unset: tests do not gate reloads).
    pub test_gate: std::sync::OnceLock<Arc<TestGate>>,
    request_prefix: u32,
    request_counter: AtomicU64,
}

impl Shared {
    pub fn new(
        config: Config,
        bindings: Bindings,
        overrides: Arc<OverrideStore>,
        upstream_tls: crate::upstream::tls::UpstreamTls,
        leaves: crate::tls::LeafCache,
        metrics: crate::metrics::Metrics,
        own_listeners: Vec<SocketAddr>,
    ) -> Self {
        let classes = config.classes.iter().cloned().map(ClassShared::new).collect();
        let prefix = crate::tls::random_bytes(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
        Self {
            dns_hosts: Arc::new(config.dns_hosts.clone()),
            upstream_tls,
            leaves,
            memory: Default::default(),
            admission: super::admission::Admission::new(config.limits.max_connections),
            lifecycle: std::sync::OnceLock::new(),
            test_gate: std::sync::OnceLock::new(),
            config,
            classes,
            bindings,
            overrides,
            metrics,
            started: std::time::Instant::now(),
            own_listeners: Arc::new(own_listeners),
            request_prefix: prefix,
            request_counter: AtomicU64::new(0),
        }
    }

    /// The class `id` names.
    pub fn class(&self, id: ClassId) -> &ClassShared {
        &self.classes[id.0]
    }

    /// Every class with its id, in the config's order.
    pub fn classes(&self) -> impl Iterator<Item = (ClassId, &ClassShared)> {
        self.classes.iter().enumerate().map(|(i, c)| (ClassId(i), c))
    }

    /// How many classes there are.
    pub fn class_count(&self) -> usize {
        self.classes.len()
    }

    /// A new request id: unique in this process, unguessable across processes.
    pub fn next_request_id(&self) -> String {
        let n = self.request_counter.fetch_add(1, Ordering::Relaxed);
        // Written directly: `format!` with padding goes through the generic formatter, which
        // showed in the per-request profile.
        hex16((u64::from(self.request_prefix) << 32) | u64::from(n as u32))
    }
}

/// `id` as sixteen lower-case hex digits.
fn hex16(id: u64) -> String {
    let digits: Vec<u8> = (0..16).rev().map(|i| b"0123456789abcdef"[((id >> (i * 4)) & 0xf) as usize]).collect();
    String::from_utf8(digits).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_sixteen_hex_digits() {
        for id in [0, 1, 0xdead_beef, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(super::hex16(id), format!("{id:016x}"));
        }
    }
}
