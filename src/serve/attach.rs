//! The data folder's attach socket ([`crate::sandbox::attach`]): a `moat run` started beside
//! this moat hands its sandbox here, and this moat serves it as that container's (its
//! policies, bindings, overrides and access log) until the `moat run` goes away.

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::proxy::listen::WorkerTx;
use crate::proxy::state::Shared;
use crate::sandbox::attach::{Reply, SOCKET};

/// The containers this moat serves sandboxes for: one sandbox per id at a time.
pub(super) type Running = Arc<Mutex<BTreeSet<String>>>;

/// Binds the attach socket. This moat holds the folder's database, so a socket found there
/// is a dead moat's.
pub(super) fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = data_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves attaches for ever.
pub(super) async fn serve(shared: Arc<Shared>, workers: Vec<WorkerTx>, listener: UnixListener, running: Running) {
    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else { return };
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (shared, workers, running) = (shared.clone(), workers.clone(), running.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_one(&shared, &workers, stream, &running).await {
                tracing::warn!("a moat run could not attach: {e}");
            }
        });
    }
}

/// One `moat run`: its request, the answer, its sandbox served until it disconnects.
async fn serve_one(
    shared: &Arc<Shared>,
    workers: &[WorkerTx],
    stream: tokio::net::UnixStream,
    running: &Running,
) -> anyhow::Result<()> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let peer = rustix::net::sockopt::socket_peercred(&stream).map(|c| c.pid.as_raw_nonzero().get()).unwrap_or(0);
    let (stream, received) = tokio::task::spawn_blocking(move || {
        let got = crate::sandbox::attach::receive(&stream);
        (stream, got)
    })
    .await?;
    let (request, sockets) = received.map_err(anyhow::Error::msg)?;
    let refuse = |why: String| {
        let _ = crate::sandbox::attach::reply(&stream, &Reply::Refused(why.clone()));
        anyhow::anyhow!(why)
    };
    let container = crate::identity::ContainerId::parse(&request.container).map_err(|e| refuse(e.to_string()))?;
    let class = super::attached::sandbox_class(shared, request.class.as_deref(), request.policy.as_deref())
        .map_err(|e| refuse(e.to_string()))?;
    if !running.lock().unwrap_or_else(|e| e.into_inner()).insert(request.container.clone()) {
        return Err(refuse(format!("container {container} already runs here: pick another --id")));
    }
    let _registered = Registered(running.clone(), request.container.clone());
    let settings = crate::policy::ContainerSettings {
        enable_internet: request.internet,
        intercept_https: request.intercept_https.then_some(true),
    };
    shared.overrides.set_settings(container.as_str(), settings);
    let mut tasks = tokio::task::JoinSet::new();
    super::attached::serve_sandbox(shared, workers, &mut tasks, class, container.clone(), sockets)?;
    let ca_pem = String::from_utf8(std::fs::read(crate::tls::ca::cert_path(&shared.config))?)?;
    let class_name = shared.class(class).config.name.to_string();
    crate::sandbox::attach::reply(
        &stream,
        &Reply::Serving { ca_pem, class: class_name.clone(), pid: std::process::id() },
    )?;
    tracing::info!(container = %container, class = class_name, "moat run (pid {peer}) attached its sandbox");
    // Served until the `moat run` goes away (its command ended, or it was killed).
    stream.set_nonblocking(true)?;
    crate::sandbox::peer_closed(&tokio::net::UnixStream::from_std(stream)?).await;
    tasks.abort_all();
    shared.overrides.container_ended(container.as_str());
    tracing::info!(container = %container, "moat run (pid {peer}) detached");
    Ok(())
}

/// Takes a container off [`Running`] when its sandbox is no longer served.
struct Registered(Running, String);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}
