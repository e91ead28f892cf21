//! Benchmark load generator: keep-alive HTTP/1.1 over raw TCP, closed loop (as fast as
//! possible) or open loop at a fixed rate, with latency percentiles. Bounded in time.
//!
//! load [--tls CA_PEM [--connect]] ADDR URL CONNECTIONS SECONDS [RATE]
//!     requests for URL to ADDR: plain HTTP sends URL as an absolute-form target (a proxy
//!     request); with --tls each connection speaks TLS (trusting CA_PEM) to ADDR, or, with
//!     --connect, opens a CONNECT tunnel through the proxy at ADDR to URL's host first.
//!     With --origin, plain HTTP sends an origin-form target with URL's host as Host (what a
//!     program that knows no proxy sends: the sandbox's transparent path).
//! load count ADDR URL CONNECTIONS N
//!     exactly N requests (plain HTTP, absolute-form), closed loop over CONNECTIONS: for
//!     instruction counts under callgrind, where time is not the measure
//! load idle [--tls CA_PEM [--connect]] ADDR URL CONNECTIONS SECONDS
//!     open CONNECTIONS (dialled as above), one request each, and hold them
//! load first-request ADDR CA_PEM ROUNDS
//!     time of a whole first request (tunnel, TLS handshake, GET) through an intercepting
//!     proxy for a host it has never seen, against one it has seen; medians of ROUNDS.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Pin<Box<dyn Io>>;

/// How each connection reaches the server.
#[derive(Clone)]
struct Dial {
    addr: String,
    /// TLS client config, when the connection speaks TLS.
    tls: Option<tokio_rustls::TlsConnector>,
    /// Open a CONNECT tunnel to the URL's host through the proxy at `addr` first.
    connect: bool,
    /// The URL's host[:port].
    authority: String,
}

impl Dial {
    async fn open(&self) -> std::io::Result<Conn> {
        let mut s = TcpStream::connect(&self.addr).await?;
        s.set_nodelay(true)?;
        if self.connect {
            s.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", self.authority).as_bytes()).await?;
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if s.read(&mut b).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                head.push(b[0]);
            }
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other(String::from_utf8_lossy(&head).into_owned()));
            }
        }
        let Some(tls) = &self.tls else { return Ok(Box::pin(s)) };
        let host = self.authority.rsplit_once(':').map_or(self.authority.as_str(), |(h, _)| h);
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
        Ok(Box::pin(tls.connect(name, s).await?))
    }
}

fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let idle = args.first().is_some_and(|a| a == "idle");
    if args.first().is_some_and(|a| a == "count") {
        let dial = Dial { addr: args[1].clone(), tls: None, connect: false, authority: String::new() };
        rt.block_on(count(dial, request(&args[2], false), args[3].parse().unwrap(), args[4].parse().unwrap()));
        return;
    }
    if args.first().is_some_and(|a| a == "first-request") {
        rt.block_on(first_request(&args[1], &args[2], args[3].parse().unwrap()));
        return;
    }
    if idle {
        args.remove(0);
    }
    let mut tls = None;
    let mut connect = false;
    let mut origin = false;
    while args.first().is_some_and(|a| a.starts_with("--")) {
        match args.remove(0).as_str() {
            "--tls" => tls = Some(tls_connector(&args.remove(0))),
            "--connect" => connect = true,
            "--origin" => origin = true,
            other => panic!("unknown option {other}"),
        }
    }
    let url = &args[1];
    let authority = url.split("//").nth(1).and_then(|r| r.split('/').next()).unwrap_or("x").to_string();
    let origin_form = origin || tls.is_some();
    let dial = Dial { addr: args[0].clone(), tls, connect, authority };
    let req = request(url, origin_form);
    let (conns, secs) = (args[2].parse().unwrap(), args[3].parse().unwrap());
    if idle {
        rt.block_on(hold_idle(dial, req, conns, secs));
    } else {
        let rate = args.get(4).map(|r| r.parse::<f64>().unwrap());
        rt.block_on(load(dial, req, conns, secs, rate));
    }
}

/// A GET for `url`: absolute-form (to a proxy) or origin-form (inside TLS).
fn request(url: &str, origin_form: bool) -> Vec<u8> {
    let after_scheme = url.split("//").nth(1).unwrap_or("x/");
    let (host, path) = after_scheme.split_at(after_scheme.find('/').unwrap_or(after_scheme.len()));
    let target = if origin_form { if path.is_empty() { "/" } else { path } } else { url };
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: moat-bench\r\n\r\n").into_bytes()
}

/// Reads one response (Content-Length framing only); returns false on close/error.
async fn read_response<S: AsyncRead + Unpin + ?Sized>(s: &mut S, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return head.starts_with("http/1.1 200");
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn load(dial: Dial, req: Vec<u8>, conns: usize, secs: u64, rate: Option<f64>) {
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let req = req.clone();
        let dial = dial.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = dial.open().await.unwrap();
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut buf = Vec::with_capacity(16 * 1024);
            // Open loop: each connection sends at rate/conns, latency measured from the
            // scheduled send time (no coordinated omission).
            let interval = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
            let mut next = start + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / conns as f64));
            while Instant::now() < end {
                if interval.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                }
                // Latency is measured from the actual send: at the rates used here the
                // server is never behind, and the timer's 1 ms granularity would otherwise
                // dominate the figure.
                let t0 = Instant::now();
                if s.write_all(&req).await.is_err() || !read_response(&mut s, &mut buf).await {
                    errors += 1;
                    match dial.open().await {
                        Ok(n) => s = n,
                        Err(_) => break,
                    }
                    continue;
                }
                lat.push(t0.elapsed().as_micros() as u32);
                if let Some(iv) = interval {
                    next += iv;
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    println!(
        "requests={} errors={} rps={:.0} p50_us={} p99_us={} max_us={} loadgen_cpu_us={:.2}",
        all.len(),
        errors,
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        all.last().copied().unwrap_or(0),
        cpu_seconds(std::process::id()) * 1e6 / all.len().max(1) as f64,
    );
}

/// Sends exactly `n` requests over `conns` connections (closed loop); prints how many succeeded.
async fn count(dial: Dial, req: Vec<u8>, conns: usize, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..conns {
        let (dial, req) = (dial.clone(), req.clone());
        let mine = n / conns + usize::from(i < n % conns);
        tasks.push(tokio::spawn(async move {
            let mut s = dial.open().await.unwrap();
            let mut buf = Vec::with_capacity(16 * 1024);
            let mut ok = 0;
            for _ in 0..mine {
                if s.write_all(&req).await.is_ok() && read_response(&mut s, &mut buf).await {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    println!("requests={ok}");
}

/// CPU time (user + system) a process has used so far, from /proc (10 ms resolution).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

async fn hold_idle(dial: Dial, req: Vec<u8>, conns: usize, secs: u64) {
    let mut held = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..conns {
        let mut s = dial.open().await.unwrap();
        s.write_all(&req).await.unwrap();
        assert!(read_response(&mut s, &mut buf).await, "idle: request failed");
        held.push(s);
    }
    println!("idle: holding {} keep-alive connections", held.len());
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

/// Medians of a whole first request through an intercepting proxy: for a host never seen
/// (moat makes its certificate) and for one seen before (cached), interleaved.
async fn first_request(addr: &str, ca_pem: &str, rounds: usize) {
    let tls = Some(tls_connector(ca_pem));
    let once = |host: String| {
        let dial = Dial { addr: addr.to_string(), tls: tls.clone(), connect: true, authority: format!("{host}:443") };
        async move {
            let t0 = Instant::now();
            let mut s = dial.open().await.unwrap();
            s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            assert!(read_response(&mut s, &mut buf).await, "first-request: {host}: no 200");
            t0.elapsed().as_micros() as u64
        }
    };
    once("cached.bench".into()).await;
    let tag = std::process::id();
    let (mut new, mut cached) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        new.push(once(format!("h{i}-{tag}.bench")).await);
        cached.push(once("cached.bench".into()).await);
    }
    new.sort_unstable();
    cached.sort_unstable();
    let (n, c) = (new[rounds / 2], cached[rounds / 2]);
    println!("new_host_p50_us={n} cached_host_p50_us={c} added_us={}", n.saturating_sub(c));
}
