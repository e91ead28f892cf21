//! The test's client: sends one request through the engine the way a container's HTTP client
//! would: absolute-form for `http://`, `CONNECT` then TLS (trusting moat's CA) for `https://`,
//! with the container named in `Proxy-Authorization`.

use std::net::SocketAddr;
use std::sync::Arc;

use super::text;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};

/// A request as a test builds it.
pub struct Outgoing {
    pub method: Method,
    pub url: url::Url,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub container: String,
}

/// What came back.
pub struct Received {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// moat allowed the tunnel but did not intercept it: nothing inside can be seen.
    pub tunnelled: bool,
}

/// Sends `req` through the proxy at `proxy`.
pub async fn send(proxy: SocketAddr, ca: &CertificateDer<'static>, req: Outgoing) -> Result<Received, String> {
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:x", req.container)));
    let host = req.url.host_str().ok_or("the URL has no host")?.to_string();
    let port = req.url.port_or_known_default().unwrap_or(80);
    let authority = match req.url.port() {
        Some(p) => format!("{}:{p}", host_in_url(&host)),
        None => host_in_url(&host),
    };
    let tcp = tokio::net::TcpStream::connect(proxy).await.map_err(|e| format!("connect to the engine: {e}"))?;
    if req.url.scheme() == "http" {
        let head = build(&req, req.url.as_str(), &authority, Some(&auth))?;
        return exchange(TokioIo::new(tcp), head).await;
    }
    // CONNECT host:port, as curl sends it.
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(text)?;
    tokio::task::spawn_local(conn.with_upgrades());
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("{}:{port}", host_in_url(&host)))
        .header(http::header::HOST, format!("{}:{port}", host_in_url(&host)))
        .header(http::header::PROXY_AUTHORIZATION, &auth)
        .body(Full::new(Bytes::new()))
        .map_err(text)?;
    let resp = sender.send_request(connect).await.map_err(text)?;
    if resp.status() != http::StatusCode::OK {
        return received(resp).await;
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(text)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(text)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(text)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(text)?;
    let stream = match tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, TokioIo::new(upgraded)).await {
        Ok(stream) => stream,
        // moat relayed the TLS to the upstream instead of terminating it.
        Err(_) => {
            return Ok(Received { status: 200, headers: http::HeaderMap::new(), body: Bytes::new(), tunnelled: true });
        }
    };
    let path = &req.url[url::Position::BeforePath..url::Position::AfterQuery];
    let head = build(&req, path, &authority, None)?;
    exchange(TokioIo::new(stream), head).await
}

fn build(req: &Outgoing, target: &str, authority: &str, auth: Option<&str>) -> Result<Request<Full<Bytes>>, String> {
    let mut b = Request::builder().method(req.method.clone()).uri(target);
    if !req.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        b = b.header(http::header::HOST, authority);
    }
    for (name, value) in &req.headers {
        b = b.header(name.as_str(), value.as_str());
    }
    if let Some(auth) = auth {
        b = b.header(http::header::PROXY_AUTHORIZATION, auth);
    }
    b.body(Full::new(req.body.clone())).map_err(text)
}

async fn exchange<T>(io: T, req: Request<Full<Bytes>>) -> Result<Received, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(text)?;
    tokio::task::spawn_local(conn);
    received(sender.send_request(req).await.map_err(text)?).await
}

async fn received(resp: Response<hyper::body::Incoming>) -> Result<Received, String> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| format!("reading the response body: {e}"))?.to_bytes();
    Ok(Received { status: parts.status.as_u16(), headers: parts.headers, body, tunnelled: false })
}

/// An IPv6 literal in brackets, as URLs and authorities write it.
fn host_in_url(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() }
}
