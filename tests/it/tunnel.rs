//! CONNECT tunnels (SPEC 5.1, 4.3): decided before any upstream I/O, SNI bound to the CONNECT
//! host, the upstream's own certificate end to end, raw-TCP rules.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// A TLS upstream on loopback with a certificate for `tls.test` and 127.0.0.1, signed by a
/// CA made here; answers every request with "hello over tls".
struct TlsUpstream {
    addr: SocketAddr,
    ca_pem: PathBuf,
    connections: Arc<AtomicUsize>,
    _ca: TestCa,
}

fn tls_upstream() -> TlsUpstream {
    let ca = TestCa::new();
    let config = ca.server_config(&["tls.test", "127.0.0.1"], &[]);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((s, _)) = listener.accept().await else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else { return };
                    let mut buf = vec![0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let body = "hello over tls";
                    let _ = tls
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
    });
    TlsUpstream { addr, ca_pem: ca.pem.clone(), connections, _ca: ca }
}

/// moat serving `policy`, with `tls.test` resolving to loopback.
fn tls_moat(policy: &str) -> Moat {
    Moat::policy(policy).resolve("tls.test", "127.0.0.1").start()
}

fn https(moat: &Moat, up: &TlsUpstream, host: &str) -> CurlOut {
    curl(moat, &format!("https://{host}:{}/", up.addr.port()), &["--cacert", up.ca_pem.to_str().unwrap()])
}

#[test]
fn an_allowed_tls_tunnel_shows_the_upstreams_own_certificate() {
    let up = tls_upstream();
    let moat = tls_moat(r#"allowedHosts = { "tls.test", "127.0.0.1" }"#);
    // curl verifies the upstream's certificate against the test CA: moat did not intercept.
    let r = https(&moat, &up, "tls.test");
    assert_eq!((r.status, r.body.as_str()), (200, "hello over tls"));
    let r = https(&moat, &up, "127.0.0.1");
    assert_eq!((r.status, r.body.as_str()), (200, "hello over tls"), "IP-literal CONNECT, no SNI");
    let log = moat.wait_log("tls tunnel");
    assert!(log.contains("method=\"CONNECT\"") && log.contains("host=\"tls.test\""), "{log}");
}

#[test]
fn a_denied_tunnel_is_520_before_any_upstream_connection() {
    let up = tls_upstream();
    let moat = tls_moat(r#"allowedHosts = { "other.test" } deniedHosts = { "127.0.0.1" }"#);
    for (target, reason) in [("tls.test", "not-allowed"), ("127.0.0.1", "denied-host")] {
        let resp =
            raw(&moat, format!("CONNECT {target}:{} HTTP/1.1\r\nHost: {target}\r\n\r\n", up.addr.port()).as_bytes());
        assert!(resp.starts_with("HTTP/1.1 520 "), "{resp}");
        assert!(resp.contains(&format!("moat-denied: {reason}")), "{resp}");
    }
    // Allowed by the lists, but the address check refuses loopback: 520 before the tunnel.
    let moat = tls_moat(r#"allowedHosts = { "tls.test" }"#);
    let resp = raw(&moat, format!("CONNECT tls.test:{} HTTP/1.1\r\nHost: tls.test\r\n\r\n", up.addr.port()).as_bytes());
    assert!(resp.starts_with("HTTP/1.1 520 ") && resp.contains("moat-denied: blocked-address"), "{resp}");
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

/// CONNECT to `connect_host`, then a TLS handshake that names `sni`; true if it completed.
fn handshake_through(moat: &Moat, up: &TlsUpstream, connect_host: &str, sni: &str) -> bool {
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(s, "CONNECT {connect_host}:{} HTTP/1.1\r\nHost: {connect_host}\r\n\r\n", up.addr.port()).unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let pem = std::fs::read(&up.ca_pem).unwrap();
    for cert in rustls_pemfile(&pem) {
        roots.add(cert).unwrap();
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = tokio_rustls::rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    while conn.is_handshaking() {
        if conn.complete_io(&mut s).is_err() {
            return false;
        }
    }
    true
}

/// The certificates of a PEM file.
fn rustls_pemfile(pem: &[u8]) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pem).map(|c| c.unwrap()).collect()
}

#[test]
fn sni_must_be_the_connect_host() {
    let up = tls_upstream();
    let moat = tls_moat(r#"allowedHosts = { "tls.test", "127.0.0.1" }"#);
    assert!(handshake_through(&moat, &up, "tls.test", "tls.test"));
    let before = up.connections.load(Ordering::SeqCst);
    assert!(!handshake_through(&moat, &up, "tls.test", "evil.test"), "SNI ≠ CONNECT host must be closed");
    assert_eq!(up.connections.load(Ordering::SeqCst), before, "and the upstream never contacted");
    let log = moat.wait_log("is not the CONNECT host");
    assert!(log.contains("evil.test"), "{log}");
}

/// A raw TCP echo server; counts connections.
fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 1024];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, n)
}

/// CONNECT, then send raw bytes; returns what came back.
fn raw_tunnel(moat: &Moat, target: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).unwrap();
    s.write_all(b"\x00\x01ping").unwrap();
    let mut out = vec![0u8; 6];
    match s.read_exact(&mut out) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

#[test]
fn raw_tcp_tunnels_need_internet_or_a_port_entry() {
    let (echo, count) = echo_server();
    // The lists pass (IP entry, no port) but enableInternet is off: closed.
    let moat = Moat::start(r#"enableInternet = false allowedHosts = { "127.0.0.1" }"#);
    assert!(raw_tunnel(&moat, echo).is_empty());
    assert_eq!(count.load(Ordering::SeqCst), 0);
    // An allowedHosts entry that names the port opens it.
    let moat = Moat::start(&format!(r#"enableInternet = false allowedHosts = {{ "127.0.0.1:{}" }}"#, echo.port()));
    assert_eq!(raw_tunnel(&moat, echo), b"\x00\x01ping");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn plain_http_inside_a_tunnel_runs_the_decision_order_per_request() {
    let up = Upstream::start();
    let port = up.addr.port();
    let policy = r#"
allowedHosts = { "api.test", "127.0.0.1" }
outboundByHost = {
  ["api.test"] = function(request, env, ctx)
    return Response.new("handler saw " .. request.url .. " for " .. ctx.containerId)
  end,
}"#;
    let moat = Moat::start(policy);
    // curl -p: CONNECT first, then plain HTTP inside the tunnel.
    let r = curl(&moat, &format!("http://api.test:{port}/inside?x=1"), &["-p", "-U", "agent-7:"]);
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, format!("handler saw http://api.test:{port}/inside?x=1 for agent-7").as_str())
    );
    // Egress inside a tunnel still goes through the address check (127.0.0.1 is listed).
    let r = curl(&moat, &format!("http://127.0.0.1:{port}/echo"), &["-p"]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.last().unwrap().uri, "/echo");
    // A request inside the tunnel for another host is refused.
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(s, "CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test\r\n\r\nGET http://other.test/ HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200 Connection Established") && out.contains("HTTP/1.1 400 "), "{out}");
    // A CONNECT inside the tunnel does not open another one.
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(s, "CONNECT api.test:{port} HTTP/1.1\r\n\r\nCONNECT 127.0.0.1:{port} HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let inner = out.strip_prefix("HTTP/1.1 200 Connection Established\r\n\r\n").unwrap_or_else(|| panic!("{out}"));
    assert!(inner.starts_with("HTTP/1.1 400 ") && inner.contains("CONNECT inside a tunnel"), "{out}");
}

#[test]
fn a_connect_that_frames_a_body_is_400_and_opens_nothing() {
    let (echo, count) = echo_server();
    let moat = Moat::start(&format!(r#"allowedHosts = {{ "127.0.0.1:{}" }}"#, echo.port()));
    // Body or tunnel data? A proxy in front of moat may read the bytes one way, moat the other.
    for framing in ["Content-Length: 5\r\n\r\nhello", "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"] {
        let out = raw(&moat, format!("CONNECT {echo} HTTP/1.1\r\n{framing}").as_bytes());
        assert!(out.starts_with("HTTP/1.1 400 ") && out.contains("ambiguous framing"), "{out}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 0, "nothing dialled");
    // An explicit empty body is no body.
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    write!(s, "CONNECT {echo} HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&head));
}

#[test]
fn fetch_reaches_https_upstreams_verified_against_extra_ca() {
    let up = tls_upstream();
    let policy = format!(
        r#"outboundByHost = {{ ["gh.local"] = function(request)
  return fetch("https://tls.test:{}/api")
end }}"#,
        up.addr.port()
    );
    let toml = format!("[tls]\nextra_ca = [\"{}\"]\n", up.ca_pem.display());
    let moat = Moat::policy(&policy).config(&toml).resolve("tls.test", "127.0.0.1").start();
    let r = curl(&moat, "http://gh.local/", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "hello over tls"));
    // Without the CA the upstream's certificate is not trusted: 502 with the reason.
    let untrusted = Moat::policy(&policy).resolve("tls.test", "127.0.0.1").start();
    let r = curl(&untrusted, "http://gh.local/", &[]);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("TLS to tls.test:") && r.body.contains("certificate"), "{}", r.body);
}
