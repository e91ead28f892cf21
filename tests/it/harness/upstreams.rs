//! Upstreams for the tests: an echo server (plain or TLS), misbehaving ones, and a test CA.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A misbehaving upstream on loopback: to every connection it reads one request and writes
/// `answer` as it is; then it closes, or with `hold` keeps the connection open without a
/// further byte (a stalled body). Returns its port.
pub fn raw_upstream(answer: &'static [u8], hold: bool) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(answer);
            if hold {
                held.push(c);
            }
        }
    });
    port
}

/// A loopback upstream that runs `each` on a thread of its own for every connection, with a
/// sender for what it reports. Returns its port and the reports.
fn threaded_upstream(
    each: impl Fn(TcpStream, std::sync::mpsc::Sender<()>) + Send + Clone + 'static,
) -> (u16, std::sync::mpsc::Receiver<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let (tx, each) = (tx.clone(), each.clone());
            std::thread::spawn(move || each(c, tx));
        }
    });
    (port, rx)
}

/// An upstream that reads one request per connection and never answers; each connection's
/// end (the proxy closing it) is reported on the channel.
pub fn silent_upstream() -> (u16, std::sync::mpsc::Receiver<()>) {
    threaded_upstream(|mut c, ended| {
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf);
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        let _ = ended.send(());
    })
}

/// An upstream that answers "slow answer" to each request `delay` after it arrived; each
/// arrival is reported on the channel.
pub fn slow_upstream(delay: Duration) -> (u16, std::sync::mpsc::Receiver<()>) {
    threaded_upstream(move |mut c, arrived| {
        let mut buf = [0u8; 4096];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {
            let _ = arrived.send(());
            std::thread::sleep(delay);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nslow answer");
        }
    })
}

/// An upstream that answers each request with a head announcing 64 MiB and then writes the
/// body for as long as the proxy takes it; the end of each connection (the proxy closing it)
/// is reported on the channel.
pub fn endless_upstream() -> (u16, std::sync::mpsc::Receiver<()>) {
    threaded_upstream(|mut c, ended| {
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf);
        let chunk = [b'x'; 64 * 1024];
        let mut ok = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 67108864\r\n\r\n").is_ok();
        for _ in 0..1024 {
            ok = ok && c.write_all(&chunk).is_ok();
        }
        if !ok {
            let _ = ended.send(());
        }
    })
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// "HTTP/1.1" or "HTTP/2.0".
    pub version: String,
    pub uri: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// The body arrived whole (framing completed); false when the stream failed mid-way.
    pub body_complete: bool,
}

/// A real HTTP/1.1 server on loopback that echoes what it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn start() -> Upstream {
        Self::start_on("127.0.0.1:0")
    }

    pub fn start_on(bind: &str) -> Upstream {
        Self::serve(bind, None)
    }

    /// The same echo server over TLS with a certificate from `ca` for `tls.test` and
    /// 127.0.0.1; ALPN offers h2 and http/1.1 and both are served.
    pub fn start_tls(ca: &TestCa) -> Upstream {
        Self::start_tls_for(ca, &["tls.test", "127.0.0.1"])
    }

    /// The TLS echo server with a certificate for `names`.
    pub fn start_tls_for(ca: &TestCa, names: &[&str]) -> Upstream {
        let config = ca.server_config(names, &[b"h2", b"http/1.1"]);
        Self::serve("127.0.0.1:0", Some(tokio_rustls::TlsAcceptor::from(config)))
    }

    fn serve(bind: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = std::net::TcpListener::bind(bind).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (connections.clone(), seen.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    c.fetch_add(1, Ordering::SeqCst);
                    let s = s.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| echo(req, s.clone()));
                        let Some(acceptor) = tls else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                            return;
                        };
                        let Ok(tls) = acceptor.accept(stream).await else { return };
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .with_upgrades()
                                .await;
                        }
                    });
                }
            });
        });
        Upstream { addr, connections, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn echo(req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes());
    let body_complete = body.is_ok();
    let body = body.unwrap_or_default();
    let mut headers = BTreeMap::new();
    for (k, v) in &parts.headers {
        headers.insert(k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let record = Seen {
        method: parts.method.to_string(),
        version: format!("{:?}", parts.version),
        uri: parts.uri.to_string(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        body_complete,
    };
    seen.lock().unwrap().push(record.clone());
    let path = parts.uri.path();
    let mut resp = Response::builder();
    let out: Bytes = if path == "/redirect" {
        resp = resp.status(302).header("location", "/echo?redirected=1");
        Bytes::new()
    } else if path == "/goto" {
        // Redirects to whatever URL the query holds (another origin, for tests).
        resp = resp.status(302).header("location", parts.uri.query().unwrap_or("/"));
        Bytes::new()
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        Bytes::from(vec![b'x'; n.parse().unwrap_or(0)])
    } else if path == "/reflect-secret" {
        // Echoes the Authorization header into the body and a header.
        let a = record.headers.get("authorization").cloned().unwrap_or_default();
        resp = resp.header("x-reflected", a.clone());
        Bytes::from(format!("you sent {a}"))
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        Bytes::from_static(b"slow")
    } else {
        resp = resp.header("content-type", "application/json").header("x-upstream", "echo");
        Bytes::from(serde_json::json!({"method": record.method, "uri": record.uri, "headers": record.headers, "body": record.body}).to_string())
    };
    Ok(resp.body(Full::new(out)).unwrap())
}

/// A certificate authority made by a test, its certificate in a PEM file (for `[tls]
/// extra_ca` and `curl --cacert`).
pub struct TestCa {
    pub pem: PathBuf,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "moat test CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let pem = dir.path().join("test-ca.pem");
        std::fs::write(&pem, issuer.pem()).unwrap();
        TestCa { pem, issuer, _dir: dir }
    }

    /// A leaf for `names` written as PEM files in this CA's folder: (certificate, key).
    pub fn leaf_files(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer).unwrap();
        let dir = self.pem.parent().unwrap();
        let (cert, key_file) = (dir.join("leaf.pem"), dir.join("leaf-key.pem"));
        std::fs::write(&cert, leaf.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert, key_file)
    }

    /// A server configuration with a leaf for `names`, offering `alpn`.
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<tokio_rustls::rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer).unwrap();
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}
