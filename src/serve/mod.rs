//! `moat serve`: the one place that knows every part. Opens the database and the stores,
//! starts the KV expiry sweep, the CA, metrics, the admin API, the policies and the workers,
//! binds the proxy's listeners last, and runs until SIGINT/SIGTERM (SIGHUP reloads). A new
//! store or listener is wired here; `proxy` only serves the connections it is handed.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

mod attach;
mod attached;
mod containers;
pub(crate) mod stores;

pub(crate) use attached::{Attached, Running, Serving, hidden_from_sandboxes};
pub(crate) use containers::log_path as container_log;

use crate::bindings::Bindings;
use crate::config::Config;
use crate::proxy::listen;
use crate::proxy::state::Shared;

/// Runs `moat serve` until SIGINT/SIGTERM. Errors that stop it from starting are returned.
///
/// Readiness: everything a client or the CLI can reach (database, stores, CA, admin socket,
/// loaded policies) exists before the proxy listeners are bound, so a port that accepts
/// means a moat that serves; `moat: listening on` is printed once they are.
pub fn run(config: Config) -> anyhow::Result<()> {
    run_with(config, None).map(drop)
}

/// [`run`], with an attached command when `attached` is given; returns its exit code. moat's
/// own messages then go to stderr: stdout belongs to the command.
pub(crate) fn run_with(config: Config, attached: Option<Attached>) -> anyhow::Result<Option<i32>> {
    let sandboxed = attached.as_ref().is_some_and(|a| a.sandbox.is_some());
    let quiet = attached.is_some();
    let announce = move |line: String| if quiet { eprintln!("{line}") } else { println!("{line}") };
    // Everything moat creates in its data folder (database, blobs, the admin socket) is its
    // owner's alone, whatever umask moat was started with.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    raise_open_files_limit();
    let bindings = Bindings::load(&config).map_err(anyhow::Error::msg)?;
    let db = crate::db::open(&config.data_dir).map_err(|e| match e {
        crate::db::OpenError::InUse => {
            anyhow::anyhow!("{}: another moat is running on this data folder", config.data_dir.display())
        }
        other => anyhow::anyhow!("{other}"),
    })?;
    let stores::Stores { kv, blob, overrides, registry } = stores::open(&config, &db, true)?;
    // Held with the database: a `moat run` beside this moat hands its sandbox here.
    let attach_listener = attach::bind(&config.data_dir).map_err(|e| {
        anyhow::anyhow!("cannot listen on {}: {e}", config.data_dir.join(crate::sandbox::attach::SOCKET).display())
    })?;
    let mut bindings = bindings;
    bindings.attach_kv(kv.clone());
    bindings.attach_blob(blob);
    std::thread::Builder::new().name("moat-kv-expiry".into()).spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
            match kv.purge_expired() {
                Ok(0) => {}
                Ok(n) => tracing::debug!("removed {n} expired KV entries"),
                Err(e) => tracing::warn!("KV expiry sweep: {e}"),
            }
        }
    })?;
    let extra_ca = config.file.tls.as_ref().map(|t| t.extra_ca.clone()).unwrap_or_default();
    let upstream_tls = crate::upstream::tls::UpstreamTls::new(&extra_ca).map_err(anyhow::Error::msg)?;
    let metrics = crate::metrics::Metrics::default();
    metrics.set_node(&config.stores.node);
    for class in &config.classes {
        metrics.start_class(&class.name);
    }
    let leaves = start_ca(&config, &metrics, &announce)?;

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let admin = config.admin_socket.clone();
    let admin_listener = match rt.block_on(crate::admin::server::bind(&admin)) {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::error!("admin API on unix:{} not started: {e}", admin.display());
            None
        }
    };
    let admin_tcp = bind_admin_tcp(&config)?;
    // The proxy listeners last (see above). Their addresses are part of the loop check
    // (SPEC 8.4), so the state workers share is made after them.
    let mut listeners = Vec::new();
    // A sandbox reaches moat only through its own listener: `moat run` binds no explicit one.
    for class in config.classes.iter().filter(|_| !sandboxed) {
        let l = listen::bind(class.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {} for class {}: {e}", class.listen, class.name))?;
        listeners.push(l);
    }
    let mut own: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    // Each class's address as bound (a configured port 0 becomes the real one), for the
    // hints that tell a client where the proxy is.
    let mut config = config;
    for (class, bound) in config.classes.iter_mut().zip(&own) {
        class.listen = *bound;
    }
    if let Some((l, _)) = &admin_tcp {
        own.extend(l.local_addr().ok());
    }
    let shared = Arc::new(Shared::new(config, bindings, overrides, upstream_tls, leaves, metrics, own));

    // A class that names its `tests` serves a generation only once they pass.
    let gate_config = shared.config.clone();
    let _ = shared
        .test_gate
        .set(Arc::new(move |class: &crate::config::ClassConfig| crate::policytest::gate(&gate_config, class)));
    for (id, _) in shared.classes() {
        crate::proxy::reload::reload_class(&shared, id);
    }

    let reloads = crate::proxy::reload::start(shared.clone())?;
    let workers = listen::start_workers(&shared)?;

    rt.block_on(async move {
        // Before anything is announced: a signal from whoever waits for "listening on" must
        // find its handler.
        let mut signals = Signals::new()?;
        let mut tasks = tokio::task::JoinSet::new();
        let running = attach::Running::default();
        if let Some(a) = &attached {
            running.lock().unwrap_or_else(|e| e.into_inner()).insert(a.container.to_string());
        }
        // The daemon's containers (not `moat run`'s, whose one container is its command).
        let supervisor = match &attached {
            None => Some(containers::Supervisor::open(shared.clone(), workers.clone(), registry, running.clone())?),
            Some(_) => None,
        };
        let lifecycle = supervisor.clone().map(|s| s as Arc<dyn crate::lifecycle::Lifecycle>);
        if let Some(l) = &lifecycle {
            let _ = shared.lifecycle.set(l.clone());
        }
        if let Some(listener) = admin_listener {
            tasks.spawn(crate::admin::server::serve(shared.clone(), listener, admin, lifecycle.clone()));
        }
        {
            let (shared, workers, running) = (shared.clone(), workers.clone(), running.clone());
            tasks.spawn(attach::serve(shared, workers, attach_listener, running));
        }
        // The listeners were bound in the config's order of classes.
        let mut explicit = Vec::new();
        for ((class, c), std_listener) in shared.classes().zip(listeners) {
            let listener = TcpListener::from_std(std_listener)?;
            let addr = listener.local_addr()?;
            let name = &c.config.name;
            announce(format!("moat: listening on {addr} (class {name})"));
            explicit.push((name.to_string(), addr));
            let workers = workers.clone();
            let listener = listen::Listener { socket: listener, kind: listen::ListenerKind::Explicit, class };
            tasks.spawn(listen::accept_loop(listener, workers, shared.admission.clone()));
        }
        if let Some((listener, token)) = admin_tcp {
            let s = shared.clone();
            tasks.spawn(async move {
                if let Err(e) = crate::admin::server::serve_tcp(s, listener, token, lifecycle).await {
                    tracing::error!("admin API on TCP not started: {e}");
                }
            });
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let code = match attached {
            None => {
                signals.until_shutdown(&reloads).await;
                None
            }
            Some(a) => Some(attached::serve_attached(&shared, &workers, &mut tasks, &mut signals, explicit, a).await?),
        };
        // The daemon's containers end first (SIGTERM, then its end kills what is left).
        if let Some(s) = &supervisor {
            s.stop_all(containers::GRACE).await;
        }
        // Stop accepting (the listeners close, so that a new moat can bind at once), then let
        // the requests in flight finish.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_file(shared.config.data_dir.join(crate::sandbox::attach::SOCKET));
        listen::start_draining(&workers);
        listen::drain(&shared, signals.another_shutdown()).await;
        anyhow::Ok(code)
    })
}

/// Hosts whose leaf certificates stay cached (each ~2 KB); the oldest is dropped beyond that.
const LEAF_CACHE_HOSTS: usize = 4096;

/// moat's CA (persisted under `[tls] ca_dir`, else made now), its certificate written to
/// `data_dir/ca.pem` for clients to trust, and the leaf cache on top of it.
fn start_ca(
    config: &Config,
    metrics: &crate::metrics::Metrics,
    announce: &dyn Fn(String),
) -> anyhow::Result<crate::tls::LeafCache> {
    let ca = match config.ca_dir() {
        Some(dir) => crate::tls::Ca::load_or_create(dir),
        None => crate::tls::Ca::ephemeral(),
    }
    .map_err(anyhow::Error::msg)?;
    let path = config.data_dir.join(crate::tls::ca::CERT_FILE);
    // Private like everything in the data folder; `moat ca export` hands out copies.
    ca.write_cert(&path, 0o600)
        .map_err(|e| anyhow::anyhow!("cannot write the CA certificate to {}: {e}", path.display()))?;
    let kind = if config.ca_dir().is_some() { "persisted" } else { "ephemeral" };
    announce(format!("moat: CA certificate ({kind}) {} SHA-256 {}", path.display(), ca.fingerprint()));
    crate::tls::LeafCache::new(
        ca,
        LEAF_CACHE_HOSTS,
        metrics.tls_leaf_cache_size.clone(),
        metrics.tls_leaves_generated.clone(),
    )
    .map_err(anyhow::Error::msg)
}

/// The optional TCP admin listener (`[admin] tcp`), with its bearer token from `token_env`.
fn bind_admin_tcp(config: &Config) -> anyhow::Result<Option<(std::net::TcpListener, Arc<str>)>> {
    let Some(section) = config.file.admin.as_ref() else { return Ok(None) };
    let Some(addr) = section.tcp.as_deref() else { return Ok(None) };
    let var = section
        .token_env
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("[admin] tcp needs token_env: the TCP admin API always requires a token"))?;
    let token =
        std::env::var(var).map_err(|_| anyhow::anyhow!("[admin] token_env: environment variable {var} is not set"))?;
    if token.len() < 16 {
        anyhow::bail!("[admin] token_env: the token in {var} is shorter than 16 characters");
    }
    let addr = crate::config::parse_listen(addr).map_err(|m| anyhow::anyhow!("[admin] tcp: {m}"))?;
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the admin API: {e}"))?;
    Ok(Some((l, Arc::from(token))))
}

/// Raises the soft limit on open files to the hard one. moat holds two descriptors per
/// request in flight (client and upstream) plus every kept-alive connection on both sides, and
/// a common default soft limit (1,024) refuses connections long before the machine is short
/// of anything. (Go's runtime does the same for every program.)
fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit still stops at the kernel's fs.nr_open.
    let ceiling = limit.maximum.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20)
    });
    let Some(current) = limit.current.filter(|&c| c < ceiling) else { return };
    match setrlimit(Resource::Nofile, Rlimit { current: Some(ceiling), maximum: limit.maximum }) {
        Ok(()) => tracing::debug!("open-files limit raised from {current} to {ceiling}"),
        Err(e) => tracing::warn!("open-files limit stays at {current} (could not raise it to {ceiling}: {e})"),
    }
}

/// The signals `moat serve` acts on: SIGINT and SIGTERM shut it down, SIGHUP reloads.
pub(crate) struct Signals {
    pub(crate) term: tokio::signal::unix::Signal,
    pub(crate) int: tokio::signal::unix::Signal,
    pub(crate) hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGINT or SIGTERM; SIGHUP meanwhile forces a reload of every class.
    async fn until_shutdown(&mut self, reloads: &std::sync::mpsc::Sender<crate::proxy::reload::ReloadRequest>) {
        loop {
            tokio::select! {
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => {
                    tracing::info!(target: "moat::reload", "SIGHUP: reloading every policy");
                    let _ = reloads.send(crate::proxy::reload::ReloadRequest::All);
                }
            }
        }
    }

    /// Completes at the next SIGINT or SIGTERM.
    async fn another_shutdown(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}
