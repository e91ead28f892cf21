//! The CLI's side of the admin API: one HTTP/1.1 request over the Unix socket.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Sends `method path` with an optional JSON body; returns (status, body).
pub fn call(socket: &Path, method: &str, path: &str, body: Option<String>) -> Result<(u16, String), String> {
    let (code, bytes) = call_bytes(socket, method, path, body.map(String::into_bytes))?;
    Ok((code, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Like [`call`], with raw bytes both ways.
pub fn call_bytes(socket: &Path, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
            format!(
                "no running moat answers on {} ({e}); start `moat serve` or pass --config/--data-dir",
                socket.display()
            )
        })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "moat")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, bytes.to_vec()))
    })
}
