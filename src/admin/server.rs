//! Serving the admin API on a Unix socket (mode 0600): reachable only by local users with
//! access to the data folder, never through a proxy listener.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use crate::proxy::state::Shared;

/// Binds the admin socket (replacing a stale one), mode 0600.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // Another moat still answering on it? Then do not steal its socket.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::other(format!("{} is in use by another moat", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!("admin API on unix:{}", path.display());
    Ok(listener)
}

/// Serves the admin API on a socket from [`bind`].
/// Whether the peer of `stream` shares moat's network namespace. A sandboxed command may be
/// the socket's owner (the same user, or root without capabilities), so the file's mode does
/// not keep it out; its network namespace does. A peer whose namespace cannot be read is
/// refused too.
fn in_our_network_namespace(stream: &tokio::net::UnixStream) -> bool {
    let Ok(peer) = rustix::net::sockopt::socket_peercred(stream) else { return false };
    let theirs = std::fs::read_link(format!("/proc/{}/ns/net", peer.pid.as_raw_nonzero()));
    matches!((theirs, std::fs::read_link("/proc/self/ns/net")), (Ok(a), Ok(b)) if a == b)
}

pub async fn serve(
    shared: Arc<Shared>,
    listener: UnixListener,
    path: PathBuf,
    lifecycle: Option<Arc<dyn crate::lifecycle::Lifecycle>>,
) {
    let name = format!("unix:{}", path.display());
    let mut errors = crate::rt::AcceptErrors::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                errors.accepted(&name);
                if !in_our_network_namespace(&stream) {
                    // SPEC 7.3: never reachable from a container, whoever owns it.
                    tracing::warn!(
                        "admin API on {name}: refused a connection from another network namespace (a sandbox)"
                    );
                    continue;
                }
                tokio::spawn(serve_connection(TokioIo::new(stream), shared.clone(), None, lifecycle.clone()));
            }
            Err(e) => errors.failed(&name, &e).await,
        }
    }
}

/// Serves the admin API on TCP; every request must carry `Authorization: Bearer TOKEN`.
pub async fn serve_tcp(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    token: Arc<str>,
    lifecycle: Option<Arc<dyn crate::lifecycle::Lifecycle>>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let name = format!("tcp:{}", listener.local_addr()?);
    tracing::info!("admin API on {name} (bearer token required)");
    let mut errors = crate::rt::AcceptErrors::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                errors.accepted(&name);
                let (shared, token, lifecycle) = (shared.clone(), Some(token.clone()), lifecycle.clone());
                tokio::spawn(serve_connection(TokioIo::new(stream), shared, token, lifecycle));
            }
            Err(e) => errors.failed(&name, &e).await,
        }
    }
}

async fn serve_connection<I>(
    io: I,
    shared: Arc<Shared>,
    token: Option<Arc<str>>,
    lifecycle: Option<Arc<dyn crate::lifecycle::Lifecycle>>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let head_timeout = shared.config.limits.request_head_timeout;
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        let token = token.clone();
        let lifecycle = lifecycle.clone();
        async move {
            let authorized = token.as_deref().is_none_or(|t| {
                let given = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
                crate::identity::constant_time_eq(given.as_bytes(), format!("Bearer {t}").as_bytes())
            });
            if authorized && super::lifecycle::wants_tcp(&req) {
                return Ok(super::lifecycle::tcp_into_container(lifecycle.as_ref(), req).await);
            }
            let (parts, body) = req.into_parts();
            let a = if authorized {
                let body = match Limited::new(body, super::api::MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => Bytes::new(),
                };
                match super::lifecycle::route(&shared, lifecycle.as_ref(), &parts, &body).await {
                    Some(answer) => answer,
                    None => super::api::route(&shared, &parts.method, parts.uri.path(), parts.uri.query(), &body).await,
                }
            } else {
                super::api::unauthorized()
            };
            let resp = hyper::Response::builder()
                .status(a.status)
                .header("content-type", a.content_type.as_ref())
                .body(Full::new(Bytes::from(a.body)))
                .expect("valid response");
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    // A client that never finishes a request head (or keeps an idle connection) is dropped
    // after the proxy's own head timeout: the TCP listener admits anyone who can connect.
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(io, svc)
        .with_upgrades()
        .await;
}
