//! WebSocket-style upgrades (SPEC 3 fetch, issue: upgrades): the upgrade request runs the
//! decision order; egress or a handler's `fetch(request)` relays the 101 and then both
//! directions byte for byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::harness::*;

/// An upstream that answers an upgrade with 101 and then echoes every byte.
pub fn upgrade_echo() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !(text.contains("upgrade: websocket") && text.contains("connection: upgrade")) {
                    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\nno upgrade");
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: test\r\n\r\n");
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Sends an upgrade request for `url` through moat, then "ping" frames; returns the 101 head
/// and what was echoed.
fn upgrade_through(moat: &Moat, url: &str, host: &str) -> (String, String) {
    let s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    upgrade_on(s, url, host)
}

/// The same on a stream that is already set up (a tunnel): `target` is the request-target.
pub fn upgrade_on(mut s: impl Read + Write, target: &str, host: &str) -> (String, String) {
    write!(s, "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n").unwrap();
    s.flush().unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return (head, String::new());
    }
    let mut echoed = Vec::new();
    for msg in [&b"ping-1"[..], b"ping-2"] {
        s.write_all(msg).unwrap();
        s.flush().unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).unwrap();
        echoed.extend_from_slice(&buf);
    }
    (head, String::from_utf8_lossy(&echoed).into_owned())
}

#[test]
fn upgrades_are_relayed_by_egress_and_by_a_handlers_fetch() {
    let up = upgrade_echo();
    let policy = format!(
        r#"
allowedHosts = {{ "127.0.0.1", "ws.test" }}
outboundByHost = {{
  ["ws.test"] = function(request)
    return fetch(Request.new("http://{up}/socket", request))
  end,
}}"#
    );
    let moat = Moat::start(&policy);
    // Egress.
    let (head, echoed) = upgrade_through(&moat, &format!("http://{up}/socket"), &up.to_string());
    assert!(head.starts_with("HTTP/1.1 101") && head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    assert_eq!(echoed, "ping-1ping-2");
    // A handler's fetch(request).
    let (head, echoed) = upgrade_through(&moat, "http://ws.test/chat", "ws.test");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(echoed, "ping-1ping-2");
    // The upgrade request runs the decision order like any other.
    let (head, _) = upgrade_through(&moat, "http://other.test/socket", "other.test");
    assert!(head.starts_with("HTTP/1.1 520") && head.contains("moat-denied: not-allowed"), "{head}");
}
