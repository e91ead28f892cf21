//! Egress (SPEC 8.1–8.4, 8.6): the address check, header hygiene, one authority, errors.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::harness::*;

#[test]
fn loopback_forms_are_refused_without_an_ip_entry() {
    let up = Upstream::start();
    let port = up.addr.port();
    let moat = Moat::policy("").resolve("sneaky.test", "127.0.0.1").start();
    for host in
        ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "sneaky.test"]
    {
        let r = curl(&moat, &format!("http://{host}:{port}/"), &[]);
        assert_eq!(r.status, 520, "{host}: {}", r.body);
        assert_eq!(r.headers["moat-denied"], "blocked-address", "{host}");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 0, "the upstream must never be dialled");
}

#[test]
fn ip_entry_opens_loopback_but_denied_cidr_and_moat_itself_stay_closed() {
    let up = Upstream::start();
    let port = up.addr.port();
    let moat =
        Moat::policy(r#"allowedHosts = { "127.0.0.0/8", "loop.test", "ddd.test" } deniedHosts = { "127.0.0.9" }"#)
            .resolve("loop.test", "127.0.0.1")
            .resolve("ddd.test", "127.0.0.9")
            .start();
    assert_eq!(curl(&moat, &format!("http://loop.test:{port}/ok"), &[]).status, 200);
    // A name whose address is inside a deniedHosts CIDR is refused at dial time.
    let r = curl(&moat, &format!("http://ddd.test:{port}/"), &[]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "blocked-address"));
    // moat's own listener is never a destination, whatever allowedHosts says.
    let r = curl(&moat, &format!("http://127.0.0.1:{}/", moat.addr.port()), &[]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "blocked-address"));
    assert_eq!(up.count(), 1);
}

#[test]
fn a_handler_fetch_to_moat_itself_is_refused_like_egress() {
    let moat = Moat::start(
        r#"outboundByHost = { ["self.test"] = function(request)
             return fetch("http://127.0.0.1:" .. URL.new(request.url).pathname:sub(2) .. "/")
           end }"#,
    );
    let r = curl(&moat, &format!("http://self.test/{}", moat.addr.port()), &[]);
    assert_eq!(
        (r.status, r.headers.get("moat-denied").map(String::as_str)),
        (520, Some("blocked-address")),
        "{}",
        r.body
    );
    let needle = format!("127.0.0.1:{} is moat itself", moat.addr.port());
    let log = moat.wait_log(&needle);
    assert!(log.contains(&needle), "{log}");
}

#[test]
fn proxy_credentials_and_hop_by_hop_headers_are_stripped_and_uri_wins() {
    let up = Upstream::start();
    let port = up.addr.port();
    let moat = Moat::start(r#"allowedHosts = { "127.0.0.1" }"#);
    let r = curl(
        &moat,
        &up.url("/h"),
        &[
            "-U",
            "agent-1:tok",
            "-H",
            "Host: evil.test",
            "-H",
            "Connection: keep-alive, X-Drop",
            "-H",
            "X-Drop: 1",
            "-H",
            "X-Keep: 2",
            "-H",
            "TE: trailers",
        ],
    );
    assert_eq!(r.status, 200);
    let seen = up.last().unwrap();
    assert_eq!(seen.headers["host"], format!("127.0.0.1:{port}"), "the URI's authority wins over Host");
    assert!(!seen.headers.contains_key("proxy-authorization"));
    assert!(!seen.headers.contains_key("x-drop"), "headers named by Connection are hop-by-hop");
    assert!(!seen.headers.contains_key("te"));
    assert_eq!(seen.headers["x-keep"], "2");
    let log = moat.wait_log("agent-1");
    assert!(!log.contains("tok"), "the token must not be logged");
}

#[test]
fn bodies_stream_both_ways_and_keep_alive_is_reused() {
    let up = Upstream::start();
    let moat = Moat::start(r#"allowedHosts = { "127.0.0.1" }"#);
    let url = up.url("/post");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "",
            "-x",
            &moat.proxy_url(),
            "-d",
            "hello body",
            "-H",
            "Transfer-Encoding: chunked",
            &url,
            "-o",
            "/dev/null",
        ])
        .args(["--next", "--noproxy", "", "-x", &moat.proxy_url(), &up.url("/bytes/100000"), "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{size_download} %{num_connects}\n"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap();
    assert_eq!(last, "200 100000 0", "second request reuses the client connection: {text}");
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].body, "hello body");
    assert_eq!(up.connections.load(Ordering::SeqCst), 1, "upstream connection pooled");
}

#[test]
fn upstream_failures_are_502_with_a_reason() {
    // A port nobody listens on: bind, learn the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let moat = Moat::start(r#"allowedHosts = { "127.0.0.1" }"#);
    let r = curl(&moat, &format!("http://127.0.0.1:{port}/"), &[]);
    assert_eq!(r.status, 502);
    assert!(r.body.starts_with("moat: connect to 127.0.0.1:"), "{}", r.body);
    assert_eq!(r.body.lines().count(), 1);
}

#[test]
fn access_log_has_one_line_per_request_without_query() {
    let up = Upstream::start();
    let moat = Moat::policy(r#"allowedHosts = { "127.0.0.1" }"#).arg("--log-format").arg("json").start();
    curl(&moat, &up.url("/path?token=SECRETQUERY"), &["-U", "c-7:", "--data", "twelve bytes"]);
    let log = moat.wait_log("\"status\":200");
    let line = log.lines().find(|l| l.contains("moat::access")).expect("an access line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["path"], "/path");
    assert_eq!(v["container"], "c-7");
    assert_eq!(v["decision"], "egress");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["bytes_up"], 12);
    assert_eq!(v["class"], "policy");
    assert_eq!(v["port"], up.addr.port());
    assert!(v["duration_ms"].as_f64().is_some());
    assert!(!log.contains("SECRETQUERY"));
}

#[test]
fn an_upstream_body_cut_short_closes_the_client_connection_and_is_logged() {
    // An upstream that promises 10 bytes, sends 2 and closes.
    let port = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", false);
    let moat = Moat::start(
        r#"allowedHosts = { "127.0.0.1" } outboundByHost = { ["next.test"] = function() return Response.new("next") end }"#,
    );
    // A second request pipelined behind: its answer must never be read as the missing 8 bytes.
    let resp = raw(
        &moat,
        format!("GET http://127.0.0.1:{port}/cut HTTP/1.1\r\n\r\nGET http://next.test/ HTTP/1.1\r\n\r\n").as_bytes(),
    );
    assert!(resp.starts_with("HTTP/1.1 200 ") && resp.ends_with("\r\n\r\nok"), "{resp:?}");
    let log = moat.wait_log("(response failed:");
    let line = log.lines().find(|l| l.contains("path=\"/cut\"")).unwrap_or_default();
    assert!(line.contains("(response failed:") && line.contains("bytes_down=2"), "{log}");
}

#[test]
fn a_body_that_stalls_for_the_body_idle_timeout_is_cut_off_in_either_direction() {
    use std::io::{Read, Write};
    let up = Upstream::start();
    // An upstream that sends half of its body and then nothing, keeping the connection open.
    let stalling = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.", true);
    let moat = Moat::policy(r#"allowedHosts = { "127.0.0.1" }"#).limit("body_idle_timeout", "1s").start();
    // A client that sends 3 of its 10 body bytes and then nothing: 408, closed.
    let mut s = std::net::TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("POST {} HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", up.url("/slow-client")).as_bytes())
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408 ") && answer.contains("limits.body_idle_timeout"), "{answer}");
    assert!(up.seen.lock().unwrap().iter().all(|r| !r.body_complete), "never a complete request upstream");
    // An upstream body that stops: the client gets what came, then the connection closes.
    let resp = raw(&moat, format!("GET http://127.0.0.1:{stalling}/slow-upstream HTTP/1.1\r\n\r\n").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 200 ") && resp.ends_with("half."), "{resp:?}");
    let log = moat.wait_log("(response failed: the response body sent nothing for 1s");
    assert!(log.contains("(response failed: the response body sent nothing for 1s"), "{log}");
}

/// Egress to 127.0.0.1, and `via.handler`, whose handler fetches 127.0.0.1 on the port named
/// by the request's `x-port` header.
const VIA_HANDLER: &str = r#"allowedHosts = { "127.0.0.1", "via.handler" }
outboundByHost = { ["via.handler"] = function(request)
  return fetch("http://127.0.0.1:" .. request.headers:get("x-port") .. "/from-handler")
end }"#;

#[test]
fn an_upstream_that_never_answers_is_a_504_after_the_response_head_timeout() {
    use std::io::{Read, Write};
    // Reads the request, then holds the connection without a byte.
    let silent = raw_upstream(b"", true);
    let moat = Moat::policy(VIA_HANDLER).limit("response_head_timeout", "2s").start();
    let url = format!("http://127.0.0.1:{silent}/");
    let r = curl(&moat, &url, &[]);
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.body.contains("limits.response_head_timeout"), "{}", r.body);
    let r = curl(&moat, "http://via.handler/", &["-H", &format!("x-port: {silent}")]);
    assert_eq!(r.status, 504, "{}", r.body);

    // The clock starts after the upload: a body sent in pieces over ~4.2 s (longer than the
    // limit plus the heartbeat's resolution, so a bound counted from the start must show)
    // is not cut off while it moves; the 504 comes only once it has gone out.
    let mut s = std::net::TcpStream::connect(moat.addr).unwrap();
    s.write_all(format!("POST {url} HTTP/1.1\r\nContent-Length: 12\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    s.set_nonblocking(true).unwrap();
    // Gaps of 0.7 s leave 1.3 s of scheduling slack under the 2 s limit.
    for piece in ["ab", "cd", "ef", "gh", "ij", "kl"] {
        std::thread::sleep(Duration::from_millis(700));
        let mut early = [0u8; 64];
        let answered = s.read(&mut early).map(|n| String::from_utf8_lossy(&early[..n]).into_owned());
        assert!(answered.is_err(), "moat answered while the body was still moving: {answered:?}");
        s.write_all(piece.as_bytes()).unwrap();
    }
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 504 ") && answer.contains("limits.response_head_timeout"), "{answer}");
}

#[test]
fn a_client_that_goes_away_cancels_its_waiting_request_upstream() {
    use std::io::Write;
    let (port, ended) = silent_upstream();
    let moat = Moat::policy(VIA_HANDLER)
        // Long bounds: what ends the upstream request here is the client leaving.
        .limit("response_head_timeout", "5m")
        .limit("handler_timeout", "5m")
        .start();
    for (request, path) in [
        (format!("GET http://127.0.0.1:{port}/egress HTTP/1.1\r\n\r\n"), "path=\"/egress\""),
        (format!("GET http://via.handler/handler HTTP/1.1\r\nx-port: {port}\r\n\r\n"), "path=\"/handler\""),
    ] {
        let mut s = std::net::TcpStream::connect(moat.addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
        // The upstream sees its connection closed (within the watch's heartbeats, long before
        // any limit), and the access log says why.
        ended.recv_timeout(Duration::from_secs(20)).expect("the upstream connection is closed");
        // (The upstream may see the close before moat has written the line: wait for this
        // request's own line, not for any 499.)
        let log = moat.wait_log(path);
        let line = log.lines().find(|l| l.contains(path) && l.contains("status=499"));
        assert!(line.is_some_and(|l| l.contains("the client closed the connection before the answer")), "{log}");
    }
}
