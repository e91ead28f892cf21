//! Exhaustion (SPEC 9): many connections, and clients that send too slowly on every phase.
//! What must hold is in each test's name; every bound is counted or timed from outside.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

const POLICY: &str = r#"
interceptHttps = true
outboundByHost = { ["ok.test"] = function() return Response.new("fine") end }
"#;

/// `moat_open_connections` from the admin API.
fn open_connections(moat: &Moat) -> u64 {
    let (_, text) = admin(&moat.dir.path().join("data/admin.sock"), "GET", "/metrics", None);
    text.lines().find_map(|l| l.strip_prefix("moat_open_connections ")?.trim().parse().ok()).unwrap()
}

fn wait_open(moat: &Moat, want: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = open_connections(moat);
        if want(n) || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Raises this process's open-files limit to its hard limit; returns it.
fn raise_own_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    let hard = l.maximum.unwrap_or(1 << 20);
    let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: l.maximum });
    getrlimit(Resource::Nofile).current.unwrap_or(hard)
}

fn get(stream: &mut TcpStream, host: &str) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET http://{host}/ HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn ten_thousand_connections_are_accepted_at_once_keep_rss_bounded_and_one_more_gets_a_clear_503() {
    // Both ends of every connection are descriptors of this machine: the test holds one per
    // connection, moat another (it raises its own limit at start).
    let n: usize = 10_000.min(raise_own_limit().saturating_sub(200) as usize);
    assert!(n >= 1_000, "this machine allows too few open files for the test ({n})");
    let toml = format!("[limits]\nmax_connections = {n}\nrequest_head_timeout = \"5m\"\nidle_timeout = \"5m\"\n");
    let moat = Moat::policy(POLICY).config(&toml).start();
    let before = memory_kib(moat.pid(), "VmRSS");

    // Half of them made a request and are kept alive, half never sent a byte.
    let mut held = Vec::with_capacity(n);
    let mut resent = 0;
    for i in 0..n {
        let began = Instant::now();
        let mut s = TcpStream::connect(moat.addr).unwrap();
        // A connect that waited a second had its SYN dropped by a full accept queue and sent
        // again (the queue was 128 long, and tokio's budget paused the accept loop after every
        // 128 accepts in a row until something else woke it: 60 s for 10,000 connections).
        if began.elapsed() >= Duration::from_millis(900) {
            resent += 1;
        }
        if i % 2 == 0 {
            s.write_all(b"GET http://ok.test/ HTTP/1.1\r\nhost: ok.test\r\n\r\n").unwrap();
        }
        held.push(s);
    }
    for s in held.iter_mut().step_by(2) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        let k = s.read(&mut buf).unwrap();
        assert!(buf[..k].ends_with(b"fine"), "{}", String::from_utf8_lossy(&buf[..k]));
    }
    assert_eq!(resent, 0, "connections that waited for their SYN to be sent again");
    assert_eq!(wait_open(&moat, |o| o == n as u64), n as u64, "every connection is open in moat");
    let held_rss = memory_kib(moat.pid(), "VmRSS");
    // Kept-alive connections give back their buffers after two idle heartbeats.
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss = memory_kib(moat.pid(), "VmRSS");
    eprintln!(
        "RSS: {} MiB at start, {} MiB with {n} connections open, {} MiB once they idled",
        before / 1024,
        held_rss / 1024,
        idle_rss / 1024
    );
    assert!(held_rss.max(idle_rss) < 256 * 1024, "{n} connections hold {} MiB", held_rss.max(idle_rss) / 1024);

    // Over the limit: a clear answer, however many try, and one warning in the log.
    for _ in 0..20 {
        let answer = get(&mut TcpStream::connect(moat.addr).unwrap(), "ok.test");
        assert!(answer.starts_with("HTTP/1.1 503 ") && answer.contains("limits.max_connections"), "{answer:?}");
    }
    let log = moat.wait_log("refusing new ones");
    assert_eq!(log.matches("refusing new ones with 503").count(), 1, "{log}");
    // The admin API does not count against the limit and still answers (it just did, above).

    // Connections that close give their places back.
    held.truncate(n - 100);
    wait_open(&moat, |o| o <= (n - 100) as u64);
    let answer = get(&mut TcpStream::connect(moat.addr).unwrap(), "ok.test");
    assert!(answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("fine"), "{answer:?}");
    drop(held);
    assert_eq!(wait_open(&moat, |o| o == 0), 0);
}

/// How a slow client ended: how long after its first byte moat closed the connection, and
/// what moat wrote.
struct Ended {
    after: Duration,
    answer: String,
}

/// Sends `start` at once, then `trickle` one byte every 200 ms (for at most 20 s), until moat
/// closes the connection.
/// An empty `trickle` sends nothing more.
fn slow_client(moat: std::net::SocketAddr, start: &[u8], trickle: &[u8]) -> Ended {
    let mut s = TcpStream::connect(moat).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let began = Instant::now();
    s.write_all(start).unwrap();
    let mut answer = Vec::new();
    let mut next = trickle.iter().cycle();
    let mut buf = [0u8; 4096];
    while began.elapsed() < Duration::from_secs(20) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => answer.extend_from_slice(&buf[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // Past a CONNECT's 200, the trickle is the tunnel's first bytes.
                if let Some(b) = next.next()
                    && s.write_all(&[*b]).is_err()
                {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Ended { after: began.elapsed(), answer: String::from_utf8_lossy(&answer).into_owned() }
}

#[test]
fn slowloris_on_the_head_the_connect_head_the_first_bytes_and_the_tls_handshake_is_closed_by_its_timeout() {
    let toml = "[limits]\nrequest_head_timeout = \"1s\"\ntls_handshake_timeout = \"1s\"\n";
    let moat = Moat::policy(POLICY).config(toml).start();
    // A TLS record header announcing a 16 KiB handshake record, then its bytes one at a time.
    const HELLO_START: &[u8] = b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc\x03\x03";
    let cases: [(&str, Vec<u8>, &'static [u8]); 4] = [
        ("request head", b"GET http://ok.test/ HTTP/1.1\r\n".to_vec(), b"x-slow: a\r\n"),
        ("CONNECT head", b"CONNECT ok.test:443 HTTP/1.1\r\n".to_vec(), b"x-slow: a\r\n"),
        ("tunnel first bytes", b"CONNECT ok.test:443 HTTP/1.1\r\nhost: ok.test:443\r\n\r\n".to_vec(), b""),
        (
            "TLS handshake",
            [b"CONNECT ok.test:443 HTTP/1.1\r\nhost: ok.test:443\r\n\r\n", HELLO_START].concat(),
            b"\x00",
        ),
    ];
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(phase, start, trickle)| {
            let proxy = moat.addr;
            std::thread::spawn(move || (phase, slow_client(proxy, &start, trickle)))
        })
        .collect();
    for t in threads {
        let (phase, ended) = t.join().unwrap();
        assert!(ended.after >= Duration::from_millis(900), "{phase}: closed before its timeout ({:?})", ended.after);
        assert!(ended.after < Duration::from_secs(8), "{phase}: still open after {:?}", ended.after);
        if phase.ends_with("head") {
            assert!(ended.answer.starts_with("HTTP/1.1 408 "), "{phase}: {:?}", ended.answer);
        }
    }
    // And moat serves on.
    let answer = get(&mut TcpStream::connect(moat.addr).unwrap(), "ok.test");
    assert!(answer.ends_with("fine"), "{answer:?}");
}

/// An HTTP/2 frame as read: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

#[test]
fn an_http2_connection_gets_at_most_100_concurrent_streams_and_the_next_is_refused() {
    use crate::intercept::{h2_frame, h2_head_block, tls_through};
    let (port, _arrived) = slow_upstream(Duration::from_secs(4));
    let policy = format!(
        r#"interceptHttps = true
outboundByHost = {{ ["slow.test"] = function() return fetch("http://127.0.0.1:{port}/") end }}"#
    );
    let moat = Moat::policy(&policy).start();
    let mut tls = tls_through(&moat, "slow.test", 443, b"h2");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    tls.write_all(&out).unwrap();
    // Read frames until `want` says it has seen enough: (type, flags, stream, payload).
    let mut frames = Vec::new();
    let mut read_until = |tls: &mut dyn Read, want: &dyn Fn(&[Frame]) -> bool| {
        while !want(&frames) {
            let mut head = [0u8; 9];
            tls.read_exact(&mut head).expect("moat keeps the connection open");
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            tls.read_exact(&mut payload).unwrap();
            frames.push((head[3], head[4], u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff, payload));
        }
        frames.clone()
    };
    let settings = read_until(&mut tls, &|f| f.iter().any(|(t, flags, _, _)| *t == 0x4 && flags & 1 == 0));
    let (_, _, _, payload) = settings.iter().find(|(t, flags, _, _)| *t == 0x4 && flags & 1 == 0).unwrap();
    let max = payload.chunks(6).find(|s| s[..2] == [0, 3]).map(|s| u32::from_be_bytes(s[2..6].try_into().unwrap()));
    assert_eq!(max, Some(100), "SETTINGS_MAX_CONCURRENT_STREAMS");
    // 101 requests at once, each held by the slow upstream: the 101st (stream 201) is refused.
    let mut out = h2_frame(0x4, 0x1, 0, &[]);
    for i in 0..101u32 {
        out.extend(h2_frame(0x1, 0x5, 2 * i + 1, &h2_head_block("GET", "slow.test")));
    }
    tls.write_all(&out).unwrap();
    let frames = read_until(&mut tls, &|f| f.iter().any(|(t, _, s, _)| *t == 0x3 && *s == 201));
    let (_, _, _, code) = frames.iter().find(|(t, _, s, _)| *t == 0x3 && *s == 201).unwrap();
    assert_eq!(code[..], 7u32.to_be_bytes(), "RST_STREAM REFUSED_STREAM");
    assert!(!frames.iter().any(|(t, _, s, _)| *t == 0x3 && *s < 201), "the first 100 streams go on");
}
