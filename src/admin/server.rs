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

/// Most bytes an admin request body may have.
const MAX_BODY: usize = 1 << 20;

/// The default socket path: `data_dir/admin.sock`.
pub fn default_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Binds the socket (replacing a stale one) and serves until the runtime stops.
pub async fn serve(shared: Arc<Shared>, path: PathBuf) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // Another moat still answering on it? Then do not steal its socket.
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::other(format!("{} is in use by another moat", path.display())));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!("admin API on unix:{}", path.display());
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = match Limited::new(body, MAX_BODY).collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(_) => Bytes::new(),
                    };
                    let a = super::api::route(&shared, &parts.method, parts.uri.path(), parts.uri.query(), &body);
                    let resp = hyper::Response::builder()
                        .status(a.status)
                        .header("content-type", a.content_type)
                        .body(Full::new(Bytes::from(a.body)))
                        .expect("valid response");
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
