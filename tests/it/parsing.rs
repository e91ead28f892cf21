//! Strict parsing (SPEC 8.6), identity and 407 (SPEC 5.1), and request forms.

use std::sync::atomic::Ordering;

use crate::harness::*;

fn open_policy() -> &'static str {
    r#"allowedHosts = { "127.0.0.1" }"#
}

#[test]
fn smuggling_forms_are_400_and_never_reach_upstream() {
    let up = Upstream::start();
    let moat = Moat::start(open_policy());
    let a = up.addr;
    let cases = [
        format!(
            "POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        format!(
            "POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
        ),
        format!("POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"),
        format!("POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        format!("POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
        format!("POST http://{a}/ HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding:\tchunked\x0b\r\n\r\n0\r\n\r\n"),
        format!("GET http://{a}/ HTTP/1.1\nHost: {a}\n\n"),
        format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A: 1\0\r\n\r\n"),
        format!("GET http://{a}/\0 HTTP/1.1\r\nHost: {a}\r\n\r\n"),
        format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nX-A: 1\r\n folded\r\n\r\n"),
    ];
    for case in &cases {
        let resp = raw(&moat, case.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 400 "), "{case:?} → {resp:?}");
        assert!(resp.contains("connection: close"), "{case:?} → {resp:?}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn a_malformed_or_cut_off_body_is_400_and_never_passed_on_as_complete() {
    let up = Upstream::start();
    let moat = Moat::start(
        r#"allowedHosts = { "127.0.0.1", "echo.test" }
           outboundByHost = { ["echo.test"] = function(request) return Response.new("got " .. request:text()) end }"#,
    );
    let a = up.addr;
    for host in [a.to_string(), "echo.test".into()] {
        // A good chunk, then a chunk size that is not hex.
        let bad = format!(
            "POST http://{host}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nmore\r\n0\r\n\r\n"
        );
        let resp = raw(&moat, bad.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 400 ") && resp.contains("invalid chunk size"), "{host}: {resp}");
        assert!(resp.contains("connection: close"), "{host}: {resp}");
        // The client stops sending in the middle of a chunked body (half-close).
        let cut = format!("POST http://{host}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
        let resp = raw_half_closed(&moat, cut.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 400 ") && resp.contains("in the middle of the body"), "{host}: {resp}");
        // The same with Content-Length framing.
        let cut = format!("POST http://{host}/ HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
        let resp = raw_half_closed(&moat, cut.as_bytes());
        assert!(resp.starts_with("HTTP/1.1 400 ") && resp.contains("in the middle of the body"), "{host}: {resp}");
    }
    // The upstream may have seen the start of a request, but never a complete one.
    let seen = up.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|s| !s.body_complete), "{seen:?}");
}

/// Like [`raw`], but shuts down the sending side after `bytes`, as a client that gave up.
fn raw_half_closed(moat: &Moat, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn oversized_head_is_431() {
    let moat = Moat::policy(open_policy()).limit("request_head_bytes", "8KiB").start();
    let req = format!("GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000));
    assert!(raw(&moat, req.as_bytes()).starts_with("HTTP/1.1 431 "));
}

#[test]
fn request_forms_and_bad_hosts() {
    let up = Upstream::start();
    let moat = Moat::start(open_policy());
    let a = up.addr;
    // Absolute-URI authority wins over a conflicting Host header.
    let resp =
        raw(&moat, format!("GET http://{a}/x HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    assert_eq!(up.last().unwrap().headers["host"], a.to_string());
    // Origin-form is not a proxy request.
    let resp = raw(&moat, b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400 ") && resp.contains("absolute-form"), "{resp}");
    // The hint names where this moat listens (here a port the kernel chose), not a default.
    assert!(resp.contains(&format!("curl -x http://{} http://host/", moat.addr)), "{resp}");
    for bad in ["http://a..b/", "http://[::1/", "http://a%00b/", "http://u:p@a.test/", "http://a.test:99999/"] {
        let resp = raw(&moat, format!("GET {bad} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert!(resp.starts_with("HTTP/1.1 400 "), "{bad}: {resp}");
    }
    // CONNECT needs host:port.
    let resp = raw(&moat, b"CONNECT 127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert_eq!(up.count(), 1);
}

#[test]
fn container_identity_and_407() {
    let toml = "[containers]\nagent-1 = { token_env = \"AGENT1_TOKEN\" }\n";
    let policy =
        r#"outboundByHost = { ["who.test"] = function(r, env, ctx) return Response.new(ctx.containerId) end }"#;
    let moat = Moat::policy(policy).config(toml).env("AGENT1_TOKEN", "s3cret").start();
    let ok = curl(&moat, "http://who.test/", &["-U", "agent-1:s3cret"]);
    assert_eq!((ok.status, ok.body.as_str()), (200, "agent-1"));
    for creds in [None, Some("agent-1:wrong"), Some("agent-2:s3cret"), Some("agent-1:"), Some("bad/id:s3cret")] {
        let extra: Vec<&str> = creds.map(|c| vec!["-U", c]).unwrap_or_default();
        let r = curl(&moat, "http://who.test/", &extra);
        assert_eq!(r.status, 407, "{creds:?}");
        assert_eq!(r.headers["proxy-authenticate"], "Basic realm=\"moat\"");
    }
    // Two credentials in one request are refused, not picked from.
    let two = "GET http://who.test/ HTTP/1.1\r\nProxy-Authorization: Basic YWdlbnQtMTpzM2NyZXQ=\r\nProxy-Authorization: Basic YWdlbnQtMjo=\r\nConnection: close\r\n\r\n";
    assert!(raw(&moat, two.as_bytes()).starts_with("HTTP/1.1 407 "));
    assert!(!moat.logs().contains("s3cret"));
    // Without [containers], the user name is the id and no token is needed; none → "default".
    let open = Moat::start(policy);
    assert_eq!(curl(&open, "http://who.test/", &["-U", "ci-job.7:"]).body, "ci-job.7");
    assert_eq!(curl(&open, "http://who.test/", &[]).body, "default");
}

#[test]
fn kept_alive_connections_read_whole_heads_before_and_after_idling() {
    // A new connection, and one idle for two heartbeats, read without a buffer of their own
    // until bytes arrive: heads larger than that first read, and heads sent in pieces, must
    // arrive whole on both, and pipelined requests must all be answered.
    use std::io::{Read, Write};
    let moat = Moat::start(
        r#"outboundByHost = { ["len.test"] = function(r) return Response.new(tostring(#(r.headers:get("x-big") or ""))) end }"#,
    );
    let big = "b".repeat(9000);
    let request = |n: usize| format!("GET http://len.test/ HTTP/1.1\r\nHost: len.test\r\nX-Big: {}\r\n\r\n", &big[..n]);
    let mut s = std::net::TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    const BODIES: [&str; 4] = ["9000", "6000", "100", "7"];
    let mut answers = String::new();
    // Reads until `count` answers are in (the last one's body is its length in digits).
    let mut read_answers = |s: &mut std::net::TcpStream, count: usize| {
        let mut buf = vec![0u8; 65536];
        while answers.matches("HTTP/1.1 200").count() < count || !answers.ends_with(BODIES[count - 1]) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed after: {answers}");
            answers.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    s.write_all(request(9000).as_bytes()).unwrap();
    read_answers(&mut s, 1);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let second = request(6000);
    s.write_all(&second.as_bytes()[..50]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    s.write_all(&second.as_bytes()[50..]).unwrap();
    read_answers(&mut s, 2);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    s.write_all(format!("{}{}", request(100), request(7)).as_bytes()).unwrap();
    read_answers(&mut s, 4);
    let bodies: Vec<&str> =
        answers.split("HTTP/1.1 200").skip(1).map(|a| a.rsplit("\r\n\r\n").next().unwrap()).collect();
    assert_eq!(bodies, BODIES, "{answers}");
}
