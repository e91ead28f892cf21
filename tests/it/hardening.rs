//! Defects found by testing moat from outside, as a user and as an attacker would; each test
//! failed before its fix (SPEC 5.1, 8, 9).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Sends `bytes` on a fresh connection, ends its sending side, and reads until moat closes
/// it (at most 10 s).
fn exchange(moat: &Moat, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn an_intercepted_host_that_a_handler_answers_opens_even_when_its_name_resolves_to_loopback() {
    let policy = r#"
interceptHttps = true
enableInternet = true
outboundByHost = { ["tls.test"] = function(request) return Response.new("from the handler " .. request.url) end }
"#;
    let moat = Moat::policy(policy).resolve("tls.test", "127.0.0.1").resolve("out.test", "127.0.0.1").start();
    let ca = moat.dir.path().join("data/ca.pem");
    let ca = ca.to_str().unwrap();
    let r = curl(&moat, "https://tls.test:8443/x", &["--cacert", ca]);
    assert_eq!((r.status, r.body.as_str()), (200, "from the handler https://tls.test:8443/x"));
    // A request inside an intercepted tunnel that egresses is still checked at dial time.
    let r = curl(&moat, "https://out.test:8443/x", &["--cacert", ca]);
    assert_eq!(r.status, 520, "{}", r.body);
    assert_eq!(r.headers["moat-denied"], "blocked-address");
}

/// A raw TCP server on loopback that greets each connection with `greeting` (if any), then
/// echoes; counts connections.
fn greeting_echo(greeting: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = s.write_all(greeting);
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

/// CONNECTs to `target` and reads the 200.
fn open_tunnel(moat: &Moat, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = [0u8; 39];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head[..], b"HTTP/1.1 200 Connection Established\r\n\r\n");
    s
}

/// Reads exactly `n` bytes, or what came before the connection ended.
fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut out[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    out.truncate(got);
    out
}

#[test]
fn raw_tcp_that_starts_with_a_capital_word_or_waits_for_the_server_is_relayed() {
    let (echo, _) = greeting_echo(b"");
    let moat = Moat::start(&format!(r#"enableInternet = false allowedHosts = {{ "127.0.0.1:{}" }}"#, echo.port()));
    for line in [&b"SSH-2.0-OpenSSH_9.6\r\n"[..], b"EHLO client.test\r\n"] {
        let mut s = open_tunnel(&moat, echo);
        s.write_all(line).unwrap();
        assert_eq!(read_n(&mut s, line.len()), line, "{:?}", String::from_utf8_lossy(line));
    }
    // A server that speaks first: the client says nothing until it has read the greeting.
    let (smtp, _) = greeting_echo(b"220 smtp.test ready\r\n");
    let moat = Moat::start(&format!(r#"enableInternet = false allowedHosts = {{ "127.0.0.1:{}" }}"#, smtp.port()));
    let mut s = open_tunnel(&moat, smtp);
    assert_eq!(read_n(&mut s, 21), b"220 smtp.test ready\r\n");
    s.write_all(b"EHLO client.test\r\n").unwrap();
    assert_eq!(read_n(&mut s, 18), b"EHLO client.test\r\n");
    // A client that waits only to slip a request line past per-request decisions: closed.
    let mut s = open_tunnel(&moat, smtp);
    assert_eq!(read_n(&mut s, 21), b"220 smtp.test ready\r\n");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(read_n(&mut s, 1).is_empty(), "relayed");
    // Where raw TCP is not allowed, a capital word is still not HTTP: closed, not answered.
    let moat = Moat::start(r#"enableInternet = false allowedHosts = { "127.0.0.1" }"#);
    let mut s = open_tunnel(&moat, echo);
    s.write_all(b"SSH-2.0-x\r\n").unwrap();
    assert!(read_n(&mut s, 1).is_empty());
    assert!(moat.wait_log("raw TCP tunnel: needs enableInternet").contains("raw TCP tunnel: needs enableInternet"));
}

/// An HTTP server that answers every request with a redirect to `/again`, keeping the
/// connection; counts requests.
fn redirect_loop() -> (u16, Arc<AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = s.write_all(b"HTTP/1.1 302 Found\r\nlocation: /again\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, n)
}

#[test]
fn fetch_raises_after_twenty_redirects_instead_of_returning_the_twenty_first() {
    let (port, requests) = redirect_loop();
    let policy = format!(
        r#"
outbound = function(request)
  local ok, err = pcall(fetch, "http://127.0.0.1:{port}/start")
  if ok then return Response.new("returned " .. err.status) end
  return Response.new("raised: " .. tostring(err))
end"#
    );
    let moat = Moat::start(&policy);
    let r = curl(&moat, "http://any.test/", &[]);
    assert!(r.body.starts_with("raised: ") && r.body.contains("more than 20 redirects"), "{}", r.body);
    assert_eq!(requests.load(Ordering::SeqCst), 21, "the request and 20 redirects followed");
}

#[test]
fn startup_is_ready_when_the_port_accepts_and_moat_ca_never_makes_a_second_ca() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        write(dir.path(), "policy.lua", "enableInternet = false");
        write(dir.path(), "moat.toml", "data_dir = \"data\"\n[tls]\nca_dir = \"ca\"\n");
        let mut serve = std::process::Command::new(MOAT);
        serve
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--policy", "policy.lua"])
            .current_dir(dir.path());
        // What a script does: wait until the port accepts, then use the CLI at once.
        let mut at_once = None;
        let serving = Moat::spawn_then(serve, tempfile::tempdir().unwrap(), || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let status = moat_cmd(&["status"], dir.path());
            let export = moat_cmd(&["ca", "export", "--out", "exported.pem"], dir.path());
            at_once = Some((status, export));
        });
        let ((code, out, err), (export_code, _, export_err)) = at_once.unwrap();
        assert_eq!(code, 0, "round {round}: moat status as the port accepts: {out}{err}");
        assert_eq!(export_code, 0, "round {round}: {export_err}");
        let exported = std::fs::read_to_string(dir.path().join("exported.pem")).unwrap();
        let persisted = std::fs::read_to_string(dir.path().join("ca/ca.pem")).unwrap();
        let served = std::fs::read_to_string(dir.path().join("data/ca.pem")).unwrap();
        assert_eq!(exported, persisted, "round {round}: moat ca exported another CA");
        assert_eq!(served, persisted, "round {round}: the server uses another CA than the one on disk");
        let (code, _, err) = moat_cmd(&["kv", "put", "KV", "k", "v"], dir.path());
        assert_eq!(code, 0, "round {round}: {err}");
        drop(serving);
    }
    // Two processes creating the CA of a new ca_dir at once make one CA between them.
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "moat.toml", "data_dir = \"data\"\n[tls]\nca_dir = \"ca\"\n");
        let both: Vec<_> = ["a.pem", "b.pem"]
            .iter()
            .map(|out| {
                std::process::Command::new(MOAT)
                    .args(["ca", "export", "--out", out])
                    .current_dir(dir.path())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut p in both {
            assert!(p.wait().unwrap().success());
        }
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("a.pem"), read("b.pem"), "round {round}");
        assert_eq!(read("a.pem"), read("ca/ca.pem"), "round {round}");
    }
}

#[test]
fn per_class_error_counters_exist_at_zero_before_the_first_failure() {
    let moat = Moat::start("enableInternet = false");
    let socket = moat.dir.path().join("data/admin.sock");
    let (status, text) = admin(&socket, "GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(text.contains("moat_handler_errors_total{class=\"policy\"} 0"), "{text}");
    assert!(text.contains("moat_policy_reload_failures_total{class=\"policy\"} 0"), "{text}");
}

#[test]
fn paths_with_characters_a_browser_encodes_are_encoded_not_a_panic_and_fragments_are_refused() {
    let up = Upstream::start();
    let policy = r#"
allowedHosts = { "127.0.0.1", "seen.test" }
outboundByHost = { ["seen.test"] = function(request) return Response.new(request.url) end }
"#;
    let moat = Moat::start(policy);
    let port = up.addr.port();
    for _ in 0..20 {
        // -g: curl would expand `{c}` itself.
        let r = curl(&moat, &format!("http://127.0.0.1:{port}/a<b>`{{c}}|d\"e"), &["-g"]);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(up.last().unwrap().uri, "/a%3Cb%3E%60%7Bc%7D%7Cd%22e");
    // The handler sees the same URL; and inside a plain-HTTP CONNECT tunnel too.
    let r = curl(&moat, "http://seen.test/x<y", &[]);
    assert_eq!(r.body, "http://seen.test/x%3Cy");
    let r = curl(&moat, &format!("http://127.0.0.1:{port}/t<u"), &["-p"]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.last().unwrap().uri, "/t%3Cu");
    assert!(!moat.logs().contains("panicked"), "{}", moat.logs());
    // RFC 9112 §3.2: a request target has no fragment; moat does not drop one silently.
    let out = exchange(&moat, format!("GET http://127.0.0.1:{port}/p#frag HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    assert!(out.starts_with("HTTP/1.1 400 ") && out.contains("fragment"), "{out}");
}

#[test]
fn a_get_with_a_broken_chunked_body_never_reaches_the_upstream_complete_and_a_valid_one_is_forwarded() {
    let up = Upstream::start();
    let moat = Moat::start(r#"allowedHosts = { "127.0.0.1" }"#);
    let port = up.addr.port();
    for (method, broken) in
        [("GET", "zz\r\nhello\r\n0\r\n\r\n"), ("HEAD", "5\r\nhel"), ("GET", "5\r\nhelloXX0\r\n\r\n")]
    {
        let out = exchange(
            &moat,
            format!("{method} http://127.0.0.1:{port}/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{broken}").as_bytes(),
        );
        assert!(out.starts_with("HTTP/1.1 400 "), "{method} {broken:?}: {out}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let complete: Vec<Seen> = up.seen.lock().unwrap().iter().filter(|s| s.body_complete).cloned().collect();
    assert!(complete.is_empty(), "the upstream took a broken request as complete: {complete:?}");
    let out = exchange(
        &moat,
        format!("GET http://127.0.0.1:{port}/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n").as_bytes(),
    );
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    let seen = up.last().unwrap();
    assert_eq!((seen.method.as_str(), seen.body.as_str(), seen.body_complete), ("GET", "hello", true));
}

#[test]
fn a_400_for_a_bad_target_closes_the_connection() {
    let up = Upstream::start();
    let moat = Moat::start(r#"allowedHosts = { "127.0.0.1" }"#);
    let port = up.addr.port();
    for bad in ["http://a.test:99999/", "://a.test/", "http://user@a.test/"] {
        let out = exchange(
            &moat,
            format!(
                "GET {bad} HTTP/1.1\r\nHost: a.test\r\n\r\nGET http://127.0.0.1:{port}/echo HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            .as_bytes(),
        );
        assert!(out.starts_with("HTTP/1.1 400 "), "{bad}: {out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{bad}: the pipelined request was served: {out}");
        assert!(out.contains("connection: close"), "{out}");
    }
    assert_eq!(up.count(), 0);
}

#[test]
fn chunk_sizes_with_white_space_are_refused() {
    let up = Upstream::start();
    let moat = Moat::start(r#"allowedHosts = { "127.0.0.1" }"#);
    let port = up.addr.port();
    for body in ["\t5\r\nhello\r\n0\r\n\r\n", "5 \r\nhello\r\n0\r\n\r\n"] {
        let out = exchange(
            &moat,
            format!(
                "POST http://127.0.0.1:{port}/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
            )
            .as_bytes(),
        );
        assert!(out.starts_with("HTTP/1.1 400 ") && out.contains("chunk size"), "{body:?}: {out}");
    }
    assert!(up.seen.lock().unwrap().iter().all(|s| !s.body_complete));
}

#[test]
fn a_request_body_trickled_below_the_minimum_rate_is_cut_off_with_408() {
    let up = Upstream::start();
    let toml = "[limits]\nrequest_body_min_rate = \"1KiB\"\nrequest_body_rate_grace = \"1s\"\n";
    let moat = Moat::policy(r#"allowedHosts = { "127.0.0.1" }"#).config(toml).start();
    for framing in ["Content-Length: 1000", "Transfer-Encoding: chunked"] {
        let mut s = TcpStream::connect(moat.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        write!(s, "POST http://127.0.0.1:{}/echo HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n", up.addr.port()).unwrap();
        if framing.contains("chunked") {
            s.write_all(b"3e8\r\n").unwrap();
        }
        let started = Instant::now();
        let mut out = Vec::new();
        // One byte every 200 ms (well within body_idle_timeout), for at most 10 s.
        while started.elapsed() < Duration::from_secs(10) {
            if s.write_all(b"x").is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => out.extend_from_slice(&buf[..k]),
                Err(_) => {}
            }
            if !out.is_empty() && s.read_to_end(&mut out).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408 ") && out.contains("request_body_min_rate"), "{framing}: {out}");
    }
}

#[test]
fn files_in_the_data_folder_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "policy.lua",
        r#"outboundByHost = { ["put.test"] = function(request, env)
  env.BUCKET:put("obj", "data")
  env.KV:put("k", "v")
  return Response.new("stored")
end }"#,
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000 && exec \"$0\" serve --listen 127.0.0.1:0 --policy policy.lua --data-dir data")
        .arg(MOAT)
        .current_dir(dir.path());
    let moat = Moat::spawn(cmd, tempfile::tempdir().unwrap());
    assert_eq!(curl(&moat, "http://put.test/", &[]).body, "stored");
    let mut files = Vec::new();
    let mut stack = vec![dir.path().join("data")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let mode = e.metadata().unwrap().permissions().mode();
            if e.file_type().unwrap().is_dir() {
                assert_eq!(mode & 0o077, 0, "{} is mode {:o}", e.path().display(), mode & 0o777);
                stack.push(e.path());
            } else {
                assert_eq!(mode & 0o077, 0, "{} is mode {:o}", e.path().display(), mode & 0o777);
                files.push(e.path());
            }
        }
    }
    assert!(files.iter().any(|f| f.ends_with("moat.redb")) && files.len() >= 3, "{files:?}");
}

#[test]
fn redact_secrets_covers_responses_the_handler_builds() {
    let secret = "tok_0123456789abcdef";
    let policy = r#"
redactSecrets = true
interceptHttps = true
outboundByHost = { ["built.test"] = function(request, env)
  return Response.new("token " .. env.TOKEN, { headers = { ["x-token"] = "Bearer " .. env.TOKEN } })
end }
"#;
    let moat = Moat::policy(policy).resolve("built.test", "127.0.0.1").secret("TOKEN", secret).start();
    let ca = moat.dir.path().join("data/ca.pem");
    for (url, flag) in
        [("http://built.test/", "--http1.1"), ("https://built.test/", "--http1.1"), ("https://built.test/", "--http2")]
    {
        let r = curl(&moat, url, &["--cacert", ca.to_str().unwrap(), flag]);
        assert_eq!(r.body, "token [secret TOKEN]", "{url} {flag}");
        assert_eq!(r.headers["x-token"], "Bearer [secret TOKEN]", "{url} {flag}");
    }
}

#[test]
fn a_cpu_bound_handler_does_not_stall_the_other_requests_on_its_worker() {
    let up = Upstream::start();
    let policy = r#"
allowedHosts = { "127.0.0.1", "loop.test" }
outboundByHost = { ["loop.test"] = function()
  console.log("looping")
  local x = 0
  while true do x = x + 1 end
end }
"#;
    // One worker, so that the loops and the request below share its thread.
    let toml = "[limits]\nlua_cpu = \"2s\"\nhandler_timeout = \"30s\"\n";
    let moat = Moat::policy(policy).config(toml).workers(1).start();
    let finished = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let (proxy, finished) = (moat.proxy_url(), finished.clone());
            std::thread::spawn(move || {
                let r = curl_via(&proxy, "http://loop.test/", &[]);
                finished.fetch_add(1, Ordering::SeqCst);
                r.status
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while moat.logs().matches("looping").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Both handlers now loop for 2 s of CPU each. An egress request on the same worker is
    // answered in between, not after them.
    let r = curl(&moat, &up.url("/echo"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(finished.load(Ordering::SeqCst), 0, "the request waited for the looping handlers");
    for l in loops {
        assert_eq!(l.join().unwrap(), 500, "the loops still end at their CPU budget");
    }
}

#[test]
fn a_handler_call_makes_at_most_limits_subrequests_upstream_requests() {
    let up = Upstream::start();
    let policy = format!(
        r#"
outbound = function(request)
  local done, err = 0, nil
  for i = 1, 60 do
    local ok, e = pcall(fetch, "http://127.0.0.1:{}/echo")
    if not ok then err = tostring(e) break end
    done = done + 1
  end
  return Response.new(done .. " " .. tostring(err))
end"#,
        up.addr.port()
    );
    let moat = Moat::start(&policy);
    let r = curl(&moat, "http://any.test/", &[]);
    assert!(r.body.starts_with("50 ") && r.body.contains("limits.subrequests"), "{}", r.body);
    assert_eq!(up.count(), 50);
    // The allowance is per call: the next request has its own.
    let r = curl(&moat, "http://any.test/", &[]);
    assert!(r.body.starts_with("50 "), "{}", r.body);
}

#[test]
fn over_the_memory_ceiling_handler_calls_get_503_and_egress_still_flows() {
    let up = Upstream::start();
    let policy = r#"
allowedHosts = { "127.0.0.1", "h.test" }
outboundByHost = { ["h.test"] = function() return Response.new("handled") end }
"#;
    // A ceiling below what any process holds: over from the first heartbeat on.
    let moat = Moat::policy(policy).limit("memory_ceiling", "1MiB").start();
    let log = moat.wait_log("over limits.memory_ceiling");
    assert!(log.contains("new handler calls get 503"), "{log}");
    let r = curl(&moat, "http://h.test/", &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("limits.memory_ceiling"), "{}", r.body);
    assert_eq!(curl(&moat, &up.url("/echo"), &[]).status, 200);
    // With the default ceiling the same handler answers.
    let moat = Moat::start(policy);
    assert_eq!(curl(&moat, "http://h.test/", &[]).body, "handled");
}
