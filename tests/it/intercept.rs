//! TLS interception (`interceptHttps = true`, SPEC 5.1): moat's leaf for the CONNECT host,
//! handlers that see `https://` requests, HTTP/1.1 and HTTP/2 to the client, TLS upstream
//! verified against `[tls] extra_ca`, the leaf cache, and `moat ca`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

use crate::harness::*;

/// A policy that intercepts, injects a credential for `tls.test` and lets 127.0.0.1 egress.
const POLICY: &str = r#"
interceptHttps = true
allowedHosts = { "127.0.0.1", "tls.test", "url.test", "length.test" }
outboundByHost = {
  ["url.test"] = function(request) return Response.new(request.url) end,
  -- Framing headers a handler sets are not what the client gets: the body decides.
  ["length.test"] = function(request)
    return Response.new("abc", { headers = { ["content-length"] = "10", ["transfer-encoding"] = "chunked" } })
  end,
  ["tls.test"] = function(request)
    request.headers:set("authorization", "Bearer injected")
    return fetch(request)
  end,
}
"#;

/// moat with `tls.test` on loopback and the test CA trusted upstream.
fn intercepting_moat(policy: &str, ca: &TestCa) -> Moat {
    let toml = format!("[tls]\nextra_ca = [\"{}\"]\n", ca.pem.display());
    Moat::policy(policy).config(&toml).resolve("tls.test", "127.0.0.1").start()
}

/// The CA certificate the running moat wrote for clients.
fn moat_ca(moat: &Moat) -> String {
    moat.dir.path().join("data/ca.pem").to_str().unwrap().to_string()
}

#[test]
fn an_intercepted_request_runs_the_handler_over_http1_and_http2() {
    let ca = TestCa::new();
    let up = Upstream::start_tls(&ca);
    let moat = intercepting_moat(POLICY, &ca);
    let url = format!("https://tls.test:{}/echo?q=1", up.addr.port());
    // curl trusts only moat's CA: the handshake succeeding means it verified moat's leaf.
    for (flag, logged) in [("--http1.1", "intercepted, http/1.1"), ("--http2", "intercepted, h2")] {
        let r = curl(&moat, &url, &["--cacert", &moat_ca(&moat), flag]);
        assert_eq!(r.status, 200, "{flag}: {}", r.body);
        let seen = up.last().unwrap();
        assert_eq!(seen.headers["authorization"], "Bearer injected", "{flag}");
        assert!(seen.uri.ends_with("/echo?q=1"), "{}", seen.uri);
        // moat negotiates with the upstream on its own: this one offers h2.
        assert_eq!(seen.version, "HTTP/2.0", "{flag}");
        assert!(moat.wait_log(logged).contains(logged), "{flag}");
    }
    // The handler sees the https:// URL, with the port only when it is not 443.
    for (url, seen) in
        [("https://url.test:8443/p?q=1", "https://url.test:8443/p?q=1"), ("https://url.test/x", "https://url.test/x")]
    {
        let r = curl(&moat, url, &["--cacert", &moat_ca(&moat)]);
        assert_eq!((r.status, r.body.as_str()), (200, seen));
    }
    for flag in ["--http1.1", "--http2"] {
        let r = curl(&moat, "https://length.test/", &["--cacert", &moat_ca(&moat), flag]);
        assert_eq!((r.status, r.body.as_str(), r.headers["content-length"].as_str()), (200, "abc", "3"), "{flag}");
    }
    // Each request inside is logged with its own decision, as https.
    let log = moat.logs();
    assert!(
        log.lines().any(|l| l.contains("scheme=\"https\"")
            && l.contains("decision=\"handler\"")
            && l.contains("path=\"/echo\"")),
        "{log}"
    );
    // Without moat's CA the client refuses moat's leaf: nothing is sent upstream.
    let before = up.count();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--noproxy", "", "-x", &moat.proxy_url(), &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(up.count(), before);
}

#[test]
fn an_ip_host_gets_an_ip_san_and_egress_verifies_the_upstream() {
    let ca = TestCa::new();
    let up = Upstream::start_tls(&ca);
    let moat = intercepting_moat(POLICY, &ca);
    let url = format!("https://127.0.0.1:{}/plain", up.addr.port());
    let r = curl(&moat, &url, &["--cacert", &moat_ca(&moat)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.last().unwrap().uri, url, "HTTP/2 upstream: the full URI is :scheme + :authority + :path");
    // rustls checks an IP server name against IP SANs only (never the subject's CN).
    let mut tls = tls_through(&moat, "127.0.0.1", up.addr.port(), b"http/1.1");
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("moat's leaf has an IP SAN for 127.0.0.1");
    }
    // An upstream whose certificate moat does not trust: 502 with the reason, for this
    // request only.
    let untrusting = Moat::policy(POLICY).resolve("tls.test", "127.0.0.1").start();
    let r = curl(&untrusting, &url, &["--cacert", &moat_ca(&untrusting)]);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("TLS to 127.0.0.1:") && r.body.contains("certificate"), "{}", r.body);
}

/// A TLS client through a CONNECT tunnel, trusting only moat's CA.
pub fn tls_through(
    moat: &Moat,
    host: &str,
    port: u16,
    alpn: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tls_through_named(moat, host, port, host, alpn)
}

/// The same with a TLS server name (SNI) that may differ from the CONNECT host.
fn tls_through_named(
    moat: &Moat,
    host: &str,
    port: u16,
    sni: &str,
    alpn: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut tcp = TcpStream::connect(moat.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut b).unwrap(), 1, "moat closed: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(moat_ca(moat)).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

#[test]
fn an_intercepted_tunnel_still_needs_the_sni_to_be_the_connect_host() {
    let ca = TestCa::new();
    let up = Upstream::start_tls(&ca);
    let moat = intercepting_moat(POLICY, &ca);
    let mut tls = tls_through_named(&moat, "tls.test", up.addr.port(), "other.test", b"http/1.1");
    let mut failed = false;
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "moat must not answer a TLS server name other than the CONNECT host");
    let log = moat.wait_log("is not the CONNECT host");
    assert!(log.contains("other.test") && log.contains("is not the CONNECT host tls.test"), "{log}");
    assert_eq!(up.count(), 0);
}

#[test]
fn an_idle_intercepted_http2_connection_is_sent_away() {
    let toml = "[limits]\nidle_timeout = \"1s\"\n";
    let moat = Moat::policy("interceptHttps = true\nallowedHosts = { \"idle.test\" }").config(toml).start();
    let mut tls = tls_through(&moat, "idle.test", 443, b"h2");
    // The client preface and an empty SETTINGS frame, then nothing.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").unwrap();
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    let ended = tls.read_to_end(&mut got);
    // Sent away for being idle (not at once, for a protocol error).
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());
    // Ended by moat (close_notify, or EOF), not by the test's 10 s read timeout.
    if let Err(e) = &ended {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    let frames = frame_types(&got);
    assert!(frames.contains(&0x7), "a GOAWAY frame before the close: frame types {frames:?}");
}

/// The types of the HTTP/2 frames in `bytes` (0x7: GOAWAY).
fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        frames.push(rest[3]);
        rest = &rest[(9 + len).min(rest.len())..];
    }
    frames
}

#[test]
fn concurrent_first_requests_for_a_host_make_one_certificate() {
    let ca = TestCa::new();
    let up = Upstream::start_tls(&ca);
    let moat = intercepting_moat(POLICY, &ca);
    let port = up.addr.port();
    let generated = |moat: &Moat| -> u64 {
        let (_, text) = admin(&moat.dir.path().join("data/admin.sock"), "GET", "/metrics", None);
        let line = text
            .lines()
            .find(|l| l.starts_with("moat_tls_leaf_certificates_generated_total "))
            .unwrap_or_else(|| panic!("{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(generated(&moat), 0);
    // Eight clients connect at once and all complete their handshake for the same new host.
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let mut tls = tls_through(&moat, "tls.test", port, b"http/1.1");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(generated(&moat), 1, "one certificate for eight concurrent first handshakes");
    // Another host gets its own; a known host reuses its certificate.
    let r = curl(&moat, &format!("https://127.0.0.1:{port}/"), &["--cacert", &moat_ca(&moat)]);
    assert_eq!(r.status, 200);
    let r = curl(&moat, &format!("https://tls.test:{port}/"), &["--cacert", &moat_ca(&moat)]);
    assert_eq!(r.status, 200);
    assert_eq!(generated(&moat), 2);
}

#[test]
fn websockets_are_relayed_inside_plain_and_intercepted_tunnels() {
    let echo = crate::websocket::upgrade_echo();
    let policy = format!(
        r#"
interceptHttps = true
outboundByHost = {{
  ["ws.test"] = function(request)
    return fetch(Request.new("http://{echo}/socket", request))
  end,
}}"#
    );
    let moat = Moat::start(&policy);
    // TLS inside the tunnel, terminated by moat: the handler's fetch relays the upgrade.
    let tls = tls_through(&moat, "ws.test", 443, b"http/1.1");
    let (head, echoed) = crate::websocket::upgrade_on(tls, "/chat", "ws.test");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echoed, "ping-1ping-2");
    // Plain HTTP inside a tunnel: the same, without TLS.
    let mut tcp = TcpStream::connect(moat.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "CONNECT ws.test:80 HTTP/1.1\r\nHost: ws.test:80\r\n\r\n").unwrap();
    let mut ok = [0u8; 39];
    tcp.read_exact(&mut ok).unwrap();
    assert!(ok.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&ok));
    let (head, echoed) = crate::websocket::upgrade_on(tcp, "/chat", "ws.test");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echoed, "ping-1ping-2");
}

#[test]
fn moat_ca_path_and_export_and_a_persisted_ca_survives_restarts() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    write(dir, "policy.lua", "interceptHttps = true\nallowedHosts = { \"127.0.0.1\" }\n");
    write(
        dir,
        "moat.toml",
        "data_dir = \"data\"\n[[class]]\npolicy = \"policy.lua\"\nlisten = \"127.0.0.1:0\"\n[tls]\nca_dir = \"ca\"\n",
    );
    // No CA yet, ephemeral config: a one-line error saying what to do.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = moat_cmd(&["ca", "path", "--data-dir", "elsewhere"], empty.path());
    assert_eq!(code, 1);
    assert!(err.starts_with("moat: no CA certificate at") && err.contains("start moat serve"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let start = || {
        let mut cmd = std::process::Command::new(MOAT);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--config", "moat.toml"]).current_dir(dir);
        Moat::spawn(cmd, tempfile::tempdir().unwrap())
    };
    let fingerprint = |out: &str| -> String {
        let line =
            out.lines().find(|l| l.starts_with("moat: CA certificate (persisted)")).unwrap_or_else(|| panic!("{out}"));
        line.rsplit(' ').next().unwrap().to_string()
    };
    let first = start();
    let (code, path, _) = moat_cmd(&["ca", "path"], dir);
    assert_eq!(code, 0);
    assert_eq!(path.trim(), dir.join("ca/ca.pem").to_str().unwrap());
    let (code, _, err) = moat_cmd(&["ca", "export", "--out", "exported.pem"], dir);
    assert_eq!(code, 0, "{err}");
    let exported = std::fs::read_to_string(dir.join("exported.pem")).unwrap();
    assert_eq!(exported, std::fs::read_to_string(dir.join("data/ca.pem")).unwrap(), "the running instance's CA");
    assert!(exported.starts_with("-----BEGIN CERTIFICATE-----"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca/ca-key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let stdout_first = first.stdout_text();
    drop(first);
    // A key file others can read is refused at start, with what to do.
    std::fs::set_permissions(dir.join("ca/ca-key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = moat_cmd(&["ca", "path"], dir);
    assert_eq!(code, 1);
    assert!(err.contains("can be read by other users (mode 644); run chmod 600"), "{err}");
    std::fs::set_permissions(dir.join("ca/ca-key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // A restart reuses the same CA: same fingerprint, and a client trusting the exported
    // certificate still verifies the new process's leaves.
    let second = start();
    assert_eq!(fingerprint(&stdout_first), fingerprint(&second.stdout_text()));
    let up = Upstream::start();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "", "-x", &second.proxy_url()])
        .args(["--cacert", dir.join("exported.pem").to_str().unwrap()])
        .arg(format!("https://127.0.0.1:{}/", up.addr.port()))
        .output()
        .unwrap();
    // The upstream speaks plain HTTP, so moat's TLS upstream fails: 502 proves the client
    // accepted moat's leaf and got an answer from inside the tunnel.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502", "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_http2_response_body_that_stalls_is_cut_off_after_the_body_idle_timeout() {
    // A plain-HTTP upstream that sends half of its body and then nothing.
    let port = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.", true);
    let policy = format!(
        r#"interceptHttps = true
outboundByHost = {{ ["stall.test"] = function() return fetch("http://127.0.0.1:{port}/") end }}"#
    );
    let moat = Moat::policy(&policy).limit("body_idle_timeout", "1s").start();
    let started = std::time::Instant::now();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "15", "--noproxy", "", "-x", &moat.proxy_url()])
        .args(["--cacert", &moat_ca(&moat), "https://stall.test/"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the stream must fail, not end as complete");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "half.");
    assert!(started.elapsed() < Duration::from_secs(10), "cut off by the 1 s limit, not curl's 15 s");
}

#[test]
fn an_http2_request_body_that_stalls_is_a_408_as_over_http1() {
    let policy = r#"interceptHttps = true
outboundByHost = { ["upload.test"] = function(request) return Response.new("got " .. request:text()) end }"#;
    let moat = Moat::policy(policy).limit("body_idle_timeout", "1s").start();
    let mut tls = tls_through(&moat, "upload.test", 443, b"h2");
    let frame = h2_frame;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &h2_head_block("PUT", "upload.test"))); // END_HEADERS; the stream stays open
    out.extend(frame(0x0, 0, 1, b"abc")); // three body bytes, then nothing
    tls.write_all(&out).unwrap();
    // Read frames until stream 1 ends; acknowledge the server's SETTINGS on the way.
    let mut body = Vec::new();
    let mut header_frames = 0;
    loop {
        let mut head = [0u8; 9];
        tls.read_exact(&mut head).expect("moat answers before the test's read timeout");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags, stream) = (head[3], head[4], u32::from_be_bytes([head[5], head[6], head[7], head[8]]));
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload).unwrap();
        match kind {
            0x4 if flags & 0x1 == 0 => tls.write_all(&frame(0x4, 0x1, 0, &[])).unwrap(),
            0x1 if stream == 1 => header_frames += 1,
            0x0 if stream == 1 => body.extend(payload),
            0x3 if stream == 1 => panic!("stream reset before an answer"),
            _ => {}
        }
        if stream == 1 && flags & 0x1 != 0 && (kind == 0x0 || kind == 0x1) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    assert_eq!(header_frames, 1);
    assert!(text.contains("limits.body_idle_timeout"), "{text:?}");
    let log = moat.wait_log("status=408");
    assert!(log.lines().any(|l| l.contains("host=\"upload.test\"") && l.contains("status=408")), "{log}");
}

/// One HTTP/2 frame.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// A request's header block in HPACK without Huffman coding: `:method` (literal, name index
/// 2), `:scheme https` (index 7), `:path /` (index 4), `:authority` (literal, name index 1).
pub fn h2_head_block(method: &str, authority: &str) -> Vec<u8> {
    let mut block = vec![0x02, method.len() as u8];
    block.extend(method.as_bytes());
    block.extend([0x87, 0x84, 0x01, authority.len() as u8]);
    block.extend(authority.as_bytes());
    block
}

#[test]
fn an_http2_stream_the_client_resets_cancels_its_upstream_request_and_is_logged() {
    let (port, ended) = silent_upstream();
    let policy = format!(
        r#"interceptHttps = true
outboundByHost = {{ ["slow.test"] = function() return fetch("http://127.0.0.1:{port}/") end }}"#
    );
    let moat = Moat::policy(&policy).limit("handler_timeout", "5m").start();
    let mut tls = tls_through(&moat, "slow.test", 443, b"h2");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    out.extend(h2_frame(0x1, 0x5, 1, &h2_head_block("GET", "slow.test"))); // END_STREAM | END_HEADERS
    tls.write_all(&out).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // RST_STREAM with CANCEL (0x8), and the connection stays open.
    tls.write_all(&h2_frame(0x3, 0, 1, &8u32.to_be_bytes())).unwrap();
    ended.recv_timeout(Duration::from_secs(20)).expect("the upstream connection is closed");
    let log = moat.wait_log("status=499");
    assert!(
        log.lines().any(|l| l.contains("host=\"slow.test\"")
            && l.contains("status=499")
            && l.contains("the client cancelled the stream")),
        "{log}"
    );
}

#[test]
fn on_shutdown_http2_streams_in_flight_finish_and_idle_connections_get_a_goaway() {
    let (port, arrived) = slow_upstream(Duration::from_millis(1500));
    let policy = format!(
        r#"interceptHttps = true
outboundByHost = {{ ["slow.test"] = function() return fetch("http://127.0.0.1:{port}/") end }}"#
    );
    let mut moat = Moat::start(&policy);
    // An HTTP/2 connection a client keeps open with no stream.
    let mut idle = tls_through(&moat, "slow.test", 443, b"h2");
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").unwrap();
    // It reads until moat closes the connection, acknowledging pings as a client does (the
    // graceful close waits for one).
    let idle = std::thread::spawn(move || {
        let (mut got, mut buf, mut acked) = (Vec::new(), [0u8; 4096], 0);
        loop {
            match idle.read(&mut buf) {
                Ok(0) | Err(_) => return frame_types(&got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let mut at = 0;
            while got.len() >= at + 9 {
                let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
                if got.len() < at + 9 + len {
                    break;
                }
                let (kind, flags) = (got[at + 3], got[at + 4]);
                if kind == 0x6 && flags & 0x1 == 0 && at >= acked {
                    let _ = idle.write_all(&h2_frame(0x6, 0x1, 0, &got[at + 9..at + 9 + len]));
                    acked = at + 1;
                }
                at += 9 + len;
            }
        }
    });
    let args: Vec<String> = ["-sS", "--http2", "--max-time", "20", "--noproxy", "", "-x", &moat.proxy_url()]
        .into_iter()
        .map(String::from)
        .chain(["--cacert".to_string(), moat_ca(&moat), "-w".into(), "\n%{http_version}".into()])
        .chain(["https://slow.test/".to_string()])
        .collect();
    let client = std::thread::spawn(move || std::process::Command::new("curl").args(&args).output().unwrap());
    arrived.recv_timeout(Duration::from_secs(10)).unwrap();
    moat.signal("TERM");
    let out = client.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "slow answer\n2", "{}", String::from_utf8_lossy(&out.stderr));
    let frames = idle.join().unwrap();
    assert!(frames.contains(&0x7), "the idle connection got a GOAWAY: frame types {frames:?}");
    // Both gone, moat exits long before limits.shutdown_timeout (30 s).
    assert_eq!(moat.wait_exit(Duration::from_secs(10)), Some(0), "{}", moat.logs());
    assert!(moat.logs().contains("shut down\n"), "{}", moat.logs());
}

#[test]
fn an_http2_upload_a_handler_answers_without_reading_gets_its_answer_not_a_stream_error() {
    // Before: the unread body was dropped at once and HTTP/2 reset the stream while curl was
    // still sending; curl then failed with "Stream error in the HTTP/2 framing layer" (92)
    // about half the time instead of showing the 403.
    let moat = Moat::start(
        r#"
interceptHttps = true
outboundByHost = { ["refuse.test"] = function() return Response.new("read-only\n", { status = 403 }) end }
"#,
    );
    let big = moat.dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 1 << 20]).unwrap();
    let big = format!("@{}", big.display());
    for body in ["{}", big.as_str(), "{}", "{}", big.as_str()].iter().cycle().take(20) {
        let r = curl(
            &moat,
            "https://refuse.test/pkg",
            &["--cacert", &moat_ca(&moat), "--http2", "-X", "PUT", "--data-binary", body],
        );
        assert_eq!((r.status, r.body.as_str()), (403, "read-only\n"));
    }
}

#[test]
fn a_client_that_does_not_trust_moats_ca_is_a_warning_that_says_where_the_ca_is() {
    let moat = Moat::start(
        "interceptHttps = true\noutboundByHost = { [\"ca.test\"] = function() return Response.new(\"x\") end }\n",
    );
    // curl with only the system roots: moat's leaf does not verify.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-x", &moat.proxy_url(), "https://ca.test/"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = moat.wait_log("intercepted TLS handshake failed");
    let line =
        log.lines().find(|l| l.contains("WARN") && l.contains("intercepted TLS handshake failed")).unwrap_or_default();
    assert!(line.contains("clients must trust") && line.contains("ca.pem") && line.contains("ca.test"), "{log}");
}
