//! Faults (SPEC 8, 9): upstreams that break mid-exchange, a full disk under the stores,
//! SIGKILL in the middle of writes, and a class whose policy fails on every request. What must
//! hold is in each test's name.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A loopback upstream that answers every request on a connection with `each(n, stream)`,
/// where n counts the requests of that connection from 0; `each` returns false to stop.
fn scripted_upstream(each: fn(usize, &mut TcpStream) -> bool) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                for n in 0.. {
                    // One read per request: the test's requests are small and bodiless.
                    match c.read(&mut buf) {
                        Ok(k) if k > 0 => {}
                        _ => return,
                    }
                    if !each(n, &mut c) {
                        return;
                    }
                }
            });
        }
    });
    port
}

const POLICY: &str = r#"
allowedHosts = { "127.0.0.1", "via.test", "ok.test" }
outboundByHost = {
  ["via.test"] = function(request)
    local url = URL.new(request.url)
    local ok, res = pcall(function()
      local r = fetch("http://127.0.0.1:" .. url.port .. url.pathname)
      return r.status .. " " .. r:text()
    end)
    return Response.new(ok and res or ("fetch failed: " .. tostring(res)), { status = ok and 200 or 502 })
  end,
  ["ok.test"] = function() return Response.new("fine") end,
}
"#;

#[test]
fn an_upstream_that_resets_mid_body_stalls_mid_head_or_sends_a_broken_head_is_a_clear_failure_and_moat_serves_on() {
    let reset = scripted_upstream(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nfirst hundred bytes");
        std::thread::sleep(Duration::from_millis(100));
        // Closing with SO_LINGER 0 sends a reset instead of a FIN.
        let _ = rustix::net::sockopt::set_socket_linger(&*c, Some(Duration::ZERO));
        false
    });
    let stall = scripted_upstream(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-le");
        std::thread::sleep(Duration::from_secs(30));
        false
    });
    let broken = scripted_upstream(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nno colon in this line\r\n\r\n");
        false
    });
    let toml = "[limits]\nresponse_head_timeout = \"1s\"\n";
    let moat = Moat::start_with(POLICY, Some(toml), &[], &[]);

    // Egress: the head went out before the reset, so the client sees its connection cut
    // (never a complete answer); a stalled head is a 504, a broken one a 502.
    let r = curl(&moat, &format!("http://127.0.0.1:{reset}/reset"), &[]);
    assert!(r.status == 200 && r.body.len() < 1000, "a cut body is never complete: {} {}", r.status, r.body);
    let r = curl(&moat, &format!("http://127.0.0.1:{stall}/stall"), &[]);
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.body.contains("response_head_timeout"), "{}", r.body);
    let r = curl(&moat, &format!("http://127.0.0.1:{broken}/broken"), &[]);
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.body.lines().count(), 1, "one line: {}", r.body);

    // Through a handler's fetch: each is an error the handler can catch.
    for (port, path) in [(reset, "/reset"), (stall, "/stall"), (broken, "/broken")] {
        let r = curl(&moat, &format!("http://via.test:{port}{path}"), &[]);
        assert_eq!(r.status, 502, "{path}: {}", r.body);
        assert!(r.body.starts_with("fetch failed: "), "{path}: {}", r.body);
    }
    let log = moat.logs();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(curl(&moat, "http://ok.test/", &[]).body, "fine");
}

#[test]
fn a_pooled_connection_the_upstream_closes_as_it_is_reused_is_retried_for_a_get_and_a_clear_502_for_a_post() {
    // Answers the first request of each connection and keeps it alive; reads the second and
    // closes without a byte, as a server does whose keep-alive timer fired as the request came.
    let port =
        scripted_upstream(|n, c| n == 0 && c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst").is_ok());
    let moat = Moat::start_with(POLICY, None, &[], &[("MOAT_WORKERS", "1")]);
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(curl(&moat, &url, &[]).body, "first");
    // Idle long enough for a server's keep-alive timer to matter.
    std::thread::sleep(Duration::from_millis(1200));
    let again = curl(&moat, &url, &[]);
    assert_eq!((again.status, again.body.as_str()), (200, "first"), "a GET is sent again on a new connection");
    std::thread::sleep(Duration::from_millis(1200));
    let post = curl(&moat, &url, &["--data", "once only"]);
    assert_eq!(post.status, 502, "a POST is never sent twice: {}", post.body);
    assert_eq!(post.body.lines().count(), 1, "{}", post.body);
    assert!(post.body.contains("closed"), "{}", post.body);
    let next = curl(&moat, &url, &[]);
    assert_eq!((next.status, next.body.as_str()), (200, "first"), "a new connection is dialled");
}
