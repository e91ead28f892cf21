//! An attached command's container (`moat run`): its sandbox's sockets served as its own,
//! its settings for its life, signals passed on, its end the end of the run.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::Signals;
use crate::proxy::listen;
use crate::proxy::state::Shared;

/// What `moat run` adds to a serve: one container, whose command starts once moat serves
/// and whose end (not SIGINT/SIGTERM, which go to the command) stops moat.
pub(crate) struct Attached {
    pub container: crate::identity::ContainerId,
    /// The class its requests run on (the only one when `None`).
    pub class: Option<String>,
    /// What it was started with (`--internet`, `--intercept-https`), for its life.
    pub settings: crate::policy::ContainerSettings,
    /// A sandbox's sockets, served for the container only; `None` (`--weak`): the command
    /// uses the explicit listeners, bound as `moat serve` binds them.
    pub sandbox: Option<crate::sandbox::Sockets>,
    /// Starts the command (or lets the sandbox's start) once moat serves.
    pub start: StartCommand,
}

/// See [`Attached::start`].
pub(crate) type StartCommand = Box<dyn FnOnce(&Serving) -> Result<Running, String>>;

/// What a serving moat tells [`Attached::start`].
pub(crate) struct Serving {
    /// Every explicit listener's class and address.
    pub listeners: Vec<(String, SocketAddr)>,
    /// moat's CA certificate (PEM).
    pub ca_pem: Vec<u8>,
}

/// The attached command, running.
pub(crate) struct Running {
    /// The process SIGTERM and SIGHUP (and SIGINT not from a terminal) are passed to.
    pub signals_to: rustix::process::Pid,
    /// Told when the command has ended.
    pub ended: tokio::sync::oneshot::Receiver<()>,
    /// Its exit code, once it has ended.
    pub code: std::sync::Arc<std::sync::Mutex<Option<i32>>>,
    /// Held until moat stops (the sandbox's handover socket, `--weak`'s CA folder).
    pub keep: Box<dyn std::any::Any>,
}

/// Serves an attached command until it ends: its sandbox's listeners and DNS, its settings;
/// starts it, passes signals on, and returns its exit code.
pub(super) async fn serve_attached(
    shared: &Arc<Shared>,
    workers: &[listen::WorkerTx],
    tasks: &mut tokio::task::JoinSet<()>,
    signals: &mut Signals,
    listeners: Vec<(String, SocketAddr)>,
    a: Attached,
) -> anyhow::Result<i32> {
    let class = sandbox_class(shared, a.class.as_deref(), None)?;
    shared.overrides.set_settings(a.container.as_str(), a.settings);
    if let Some(sockets) = a.sandbox {
        serve_sandbox(shared, workers, tasks, class, a.container.clone(), sockets)?;
    }
    let ca_pem = std::fs::read(crate::tls::ca::cert_path(&shared.config))?;
    let running = (a.start)(&Serving { listeners, ca_pem }).map_err(anyhow::Error::msg)?;
    let Running { signals_to, ended, code, keep } = running;
    let ended = async move {
        let _ = ended.await;
    };
    crate::sandbox::pass_signals_until(signals_to, ended, &mut signals.term, &mut signals.int, &mut signals.hup).await;
    shared.overrides.container_ended(a.container.as_str());
    drop(keep);
    let code = *code.lock().unwrap_or_else(|e| e.into_inner());
    Ok(code.unwrap_or(1))
}

/// Serves a sandbox's sockets as `container`'s: its DNS, its ports 80 and 443, its relay.
pub(super) fn serve_sandbox(
    shared: &Arc<Shared>,
    workers: &[listen::WorkerTx],
    tasks: &mut tokio::task::JoinSet<()>,
    class: crate::proxy::state::ClassId,
    container: crate::identity::ContainerId,
    sockets: crate::sandbox::Sockets,
) -> anyhow::Result<()> {
    let names = Arc::new(crate::proxy::names::SandboxNames::default());
    let dns = Arc::new(crate::proxy::dns::Responder::new(shared.clone(), class, container.clone(), names.clone()));
    sockets.dns_udp.set_nonblocking(true)?;
    tasks.spawn(dns.clone().serve_udp(tokio::net::UdpSocket::from_std(sockets.dns_udp)?));
    sockets.dns_tcp.set_nonblocking(true)?;
    tasks.spawn(dns.serve_tcp(TcpListener::from_std(sockets.dns_tcp)?));
    let sandbox = Arc::new(listen::Sandboxed { container, names });
    let mut transparent = vec![
        (sockets.http, listen::ListenerKind::TransparentHttp(sandbox.clone())),
        (sockets.tls, listen::ListenerKind::TransparentTls(sandbox.clone())),
    ];
    transparent.extend(sockets.relay.map(|r| (r, listen::ListenerKind::Relay(sandbox))));
    for (socket, kind) in transparent {
        socket.set_nonblocking(true)?;
        let listener = listen::Listener { socket: TcpListener::from_std(socket)?, kind, class };
        tasks.spawn(listen::accept_loop(listener, workers.to_vec(), shared.admission.clone()));
    }
    Ok(())
}

/// The class a sandbox's requests run on: the one named, else the one whose policy is
/// `policy`, else the only one.
pub(super) fn sandbox_class(
    shared: &Shared,
    name: Option<&str>,
    policy: Option<&std::path::Path>,
) -> anyhow::Result<crate::proxy::state::ClassId> {
    let names = || shared.classes().map(|(_, c)| c.config.name.to_string()).collect::<Vec<_>>().join(", ");
    let same_file = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let found = match (name, policy) {
        (Some(name), _) => shared.classes().find(|(_, c)| &*c.config.name == name),
        (None, Some(p)) => shared.classes().find(|(_, c)| same_file(&c.config.policy, p)),
        (None, None) if shared.class_count() == 1 => shared.classes().next(),
        (None, None) => anyhow::bail!("the config has several classes ({}): pass --class NAME", names()),
    };
    found.map(|(id, _)| id).ok_or_else(|| match (name, policy) {
        (Some(name), _) => anyhow::anyhow!("no class {name:?} here (classes: {})", names()),
        (_, p) => anyhow::anyhow!(
            "no class here has the policy {} (classes: {}): pass --class NAME",
            p.map(|p| p.display().to_string()).unwrap_or_default(),
            names()
        ),
    })
}

/// What no sandbox may see: the data folder, a persisted CA's folder (its private key)
/// wherever it is, and an admin socket elsewhere (`[admin] listen`; the command may be its
/// owner). The data folder comes first: it shows the sandbox moat's CA instead.
pub(crate) fn hidden_from_sandboxes(config: &crate::config::Config) -> Vec<&std::path::Path> {
    let mut hidden = vec![config.data_dir.as_path()];
    hidden.extend(config.ca_dir().filter(|d| !d.starts_with(&config.data_dir)));
    hidden.extend(Some(config.admin_socket.as_path()).filter(|s| !s.starts_with(&config.data_dir) && s.exists()));
    hidden
}
