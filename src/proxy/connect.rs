//! `CONNECT host:port` on the explicit listener (SPEC 5.1, 4.3 last paragraph): the tunnel's
//! target runs decision steps 1, 2, 7, 8, 9 (the whole order when the policy intercepts)
//! before any upstream I/O; then the first bytes say what flows inside. TLS: its SNI must be
//! the CONNECT host; then either moat terminates it ([`super::intercept`]) or the ClientHello
//! is replayed byte for byte to the checked upstream address. Plain HTTP: each request is
//! decided on its own. Other bytes: a raw TCP tunnel, allowed only when `enableInternet` is on
//! or an `allowedHosts` entry names the port.

use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::answer;
use super::h1::{ConnReader, Framing, RequestHead, WriteOptions, write_response};
use super::names::Sandboxed;
use super::request::{LogLine, identify};
use super::sniff::{Inside, Sniffed, classify, sniff};
use super::state::ClassId;
use super::worker::Worker;
use crate::log::Logged;
use crate::policy::decide::{effective_allowed, effective_denied, effective_intercept, effective_internet};
use crate::policy::{CanonicalHost, Decision, decide_tunnel, host::split_authority};
use crate::upstream::{DialRules, Target, UpstreamError};

/// Serves a CONNECT request; the client connection ends with it.
pub async fn serve(
    worker: &Rc<Worker>,
    class: ClassId,
    head: RequestHead,
    reader: ConnReader<OwnedReadHalf>,
    mut writer: BufWriter<OwnedWriteHalf>,
) {
    let shared = &worker.shared;
    let started = Instant::now();
    let mut log = LogLine {
        request_id: shared.next_request_id(),
        class: shared.class(class).config.name.clone(),
        method: http::Method::CONNECT,
        scheme: "tunnel",
        ..Default::default()
    };
    let prepared = prepare(worker, class, &head, &mut log);
    // The head's values are slices of the connection's first read buffer (8 KiB): held for
    // the tunnel's life, they would keep all of it (and the proxy credentials) in memory.
    drop(head);
    let refusal = match prepared {
        Ok(mut plan) => {
            // The address check belongs to the decision: refuse before promising a tunnel.
            // Not for an intercepted tunnel: nothing is dialled for it; each request inside
            // is decided on its own, and only those that egress are resolved and checked.
            if !plan.intercept {
                match resolve(worker, &plan).await {
                    Ok(Ok(addrs)) => plan.addrs = Some(addrs),
                    // A name with no DNS answer may still be a virtual host that handlers
                    // answer inside a plain-HTTP tunnel; TLS or raw bytes to it are closed below.
                    Ok(Err(msg)) => plan.unresolved = Some(msg),
                    Err(e) => {
                        log.detail = e.to_string();
                        let resp = answer::upstream_failure(&e);
                        if resp.status().as_u16() == 520 {
                            log.decision = Logged::Deny;
                        }
                        return refuse(shared, writer, resp, log, started).await;
                    }
                }
            }
            // The tunnel is allowed: 200, then look at what the client sends.
            if writer.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err()
                || writer.flush().await.is_err()
            {
                return;
            }
            log.status = 200;
            run_tunnel(worker, plan, reader, writer, &mut log).await;
            log.duration = started.elapsed();
            log.emit();
            log.record(&shared.metrics);
            return;
        }
        Err(resp) => *resp,
    };
    refuse(shared, writer, refusal, log, started).await;
}

/// A connection on a sandbox's port 443 (SPEC 5.2): TLS whose ClientHello names the host
/// (without a name, the address dialled is the host). It is decided as a CONNECT to that
/// host's port 443 would be, then intercepted or relayed the same way. A refusal ends the
/// connection (the log says why: TLS has no place for an HTTP answer).
pub async fn serve_transparent_tls(
    worker: &Rc<Worker>,
    class: ClassId,
    sandbox: &Sandboxed,
    stream: tokio::net::TcpStream,
) {
    let shared = &worker.shared;
    let started = Instant::now();
    let Ok(dialled) = stream.local_addr() else { return };
    let container = sandbox.container.clone();
    let mut log = tunnel_log(shared, class, "TLS", &container);
    let (mut rd, wr) = stream.into_split();
    let mut first = BytesMut::with_capacity(4096);
    let limit = shared.config.limits.tls_handshake_timeout;
    let host = match sniff(&mut rd, &mut first, None, limit).await {
        Ok(Inside::Tls(Some(sni))) => CanonicalHost::parse(&sni).ok(),
        Ok(Inside::Tls(None)) => Some(sandbox.names.host_for(dialled.ip())),
        Ok(_) => None,
        Err(_) => return,
    };
    let Some(host) = host else {
        log.decision = Logged::Error;
        log.host = Some(CanonicalHost::Ip(dialled.ip()));
        log.port = dialled.port();
        log.detail = "port 443 carries TLS with a valid server name only".into();
        log.emit();
        log.record(&shared.metrics);
        return;
    };
    if let Ok(plan) = plan_for(worker, class, container, host, dialled.port(), &mut log) {
        log.status = 200;
        let reader = ConnReader::from_parts(rd, first);
        run_tunnel(worker, plan, reader, BufWriter::new(wr), &mut log).await;
    } else {
        log.status = 520;
    }
    log.duration = started.elapsed();
    log.emit();
    log.record(&shared.metrics);
}

/// With internet on, a connection to any other TCP port of a sandbox (SPEC 5.2), redirected
/// to the relay by the sandbox's firewall: decided as a CONNECT to the original destination
/// would be (on the name behind a sandbox address), then relayed as such a tunnel is: TLS
/// and HTTP inside are still seen for what they are. A refusal ends the connection.
pub async fn serve_relay(worker: &Rc<Worker>, class: ClassId, sandbox: &Sandboxed, stream: tokio::net::TcpStream) {
    let shared = &worker.shared;
    let started = Instant::now();
    let container = sandbox.container.clone();
    let mut log = tunnel_log(shared, class, "TCP", &container);
    // Only a connection the firewall redirected has an original destination.
    let Ok(dialled) = rustix::net::sockopt::ip_original_dst(&stream) else { return };
    let host = sandbox.names.host_for(std::net::IpAddr::V4(*dialled.ip()));
    if let Ok(plan) = plan_for(worker, class, container, host, dialled.port(), &mut log) {
        log.status = 200;
        let (rd, wr) = stream.into_split();
        run_tunnel(worker, plan, ConnReader::new(rd), BufWriter::new(wr), &mut log).await;
    } else {
        log.status = 520;
    }
    log.duration = started.elapsed();
    log.emit();
    log.record(&shared.metrics);
}

/// The log line of a sandbox's connection that is a tunnel from the start (`method` says
/// which kind).
fn tunnel_log(
    shared: &super::state::Shared,
    class: ClassId,
    method: &str,
    container: &crate::identity::ContainerId,
) -> LogLine {
    LogLine {
        request_id: shared.next_request_id(),
        class: shared.class(class).config.name.clone(),
        method: http::Method::from_bytes(method.as_bytes()).expect("a token"),
        scheme: "tunnel",
        container: container.to_string(),
        ..Default::default()
    }
}

/// Resolves and checks the tunnel's host (SPEC 8.3): its addresses, or (inner `Err`) why
/// the name has no DNS answer; an outer `Err` is a refusal (a blocked address).
async fn resolve(worker: &Worker, plan: &Plan) -> Result<Result<Vec<std::net::IpAddr>, String>, UpstreamError> {
    let rules = DialRules::Egress { allowed: plan.allowed.as_ref(), denied: plan.denied.as_ref() };
    match worker.upstream.resolve_checked(&plan.target, rules).await {
        Ok(addrs) => Ok(Ok(addrs)),
        Err(UpstreamError::Dns { message }) => Ok(Err(message)),
        Err(e) => Err(e),
    }
}

/// Answers a refused CONNECT and ends the connection.
async fn refuse(
    shared: &super::state::Shared,
    mut writer: BufWriter<OwnedWriteHalf>,
    resp: http::Response<crate::body::Body>,
    mut log: LogLine,
    started: Instant,
) {
    log.status = resp.status().as_u16();
    let written = write_response(&mut writer, resp, WriteOptions::closing()).await;
    log.bytes_down = written.bytes;
    if let Err(e) = written.outcome {
        log.add_failure("response", &e);
    }
    log.duration = started.elapsed();
    log.emit();
    log.record(&shared.metrics);
    let _ = writer.shutdown().await;
}

/// A tunnel that passed the decision order.
struct Plan {
    target: Target,
    /// `interceptHttps`: TLS inside is terminated with moat's leaf and each request decided.
    intercept: bool,
    container: crate::identity::ContainerId,
    class: ClassId,
    /// The checked addresses: resolved before the 200, or (intercepted tunnels) only when
    /// bytes are relayed to the host itself.
    addrs: Option<Vec<std::net::IpAddr>>,
    /// Why the host could not be resolved, if it could not.
    unresolved: Option<String>,
    enable_internet: bool,
    /// An `allowedHosts` entry names this host with this exact port (raw TCP rule).
    port_named: bool,
    allowed: Option<crate::policy::HostList>,
    denied: Option<crate::policy::HostList>,
}

/// Identity, target, decision: everything before the 200. Errors are the answer to send.
fn prepare(
    worker: &Worker,
    class: ClassId,
    head: &RequestHead,
    log: &mut LogLine,
) -> Result<Plan, Box<http::Response<crate::body::Body>>> {
    let shared = &worker.shared;
    let container = identify(shared, &head.headers).map_err(|e| {
        log.decision = Logged::Error;
        log.detail = e.to_string();
        Box::new(answer::auth_required(&e.to_string()))
    })?;
    log.container = container.to_string();
    let bad = |log: &mut LogLine, msg: &str| {
        log.decision = Logged::Error;
        log.detail = msg.to_string();
        Box::new(answer::text(StatusCode::BAD_REQUEST, format!("moat: {msg}")))
    };
    // RFC 9110 §9.3.6: a CONNECT has no content; what follows the head is the tunnel. A
    // client that frames a body anyway is ambiguous (is it body or tunnel data?), and a proxy
    // in front of moat may read it one way while moat reads it the other (SPEC 8.6).
    if !matches!(head.framing, Framing::None | Framing::Length(0)) {
        return Err(bad(log, "CONNECT with a body (Content-Length or Transfer-Encoding) is ambiguous framing"));
    }
    let (host, port) = split_authority(&head.target).map_err(|e| bad(log, &e.to_string()))?;
    let port = port.ok_or_else(|| bad(log, "CONNECT needs host:port"))?;
    let host = CanonicalHost::parse(host).map_err(|e| bad(log, &e.to_string()))?;
    plan_for(worker, class, container, host, port, log)
}

/// The decision for a tunnel to `host:port` on behalf of `container` (steps 1, 2, 7, 8, 9,
/// or the whole order when the policy intercepts). Errors are the answer to send.
fn plan_for(
    worker: &Worker,
    class: ClassId,
    container: crate::identity::ContainerId,
    host: CanonicalHost,
    port: u16,
    log: &mut LogLine,
) -> Result<Plan, Box<http::Response<crate::body::Body>>> {
    let shared = &worker.shared;
    log.host = Some(host.clone());
    log.port = port;
    let runtime = worker.runtime(class).ok_or_else(|| {
        log.decision = Logged::Error;
        log.detail = "policy not loaded".into();
        Box::new(answer::not_loaded())
    })?;
    let g = &runtime.generation;
    log.generation = g.number;
    let overrides = shared.overrides.get(container.as_str(), g);
    // Intercepted TLS runs each request through the whole order, so a host that a handler
    // answers opens a tunnel; otherwise only steps 1, 2, 7, 8, 9 can apply (SPEC 4.3).
    let intercept = effective_intercept(&g.policy, overrides.as_deref(), &host, port);
    let verdict = if intercept {
        crate::policy::decide_request(&host, port, true, &g.policy, overrides.as_deref())
    } else {
        decide_tunnel(&host, port, &g.policy, overrides.as_deref())
    };
    if let Decision::Deny(reason) = verdict.decision {
        log.decision = Logged::Deny;
        log.detail = reason.to_string();
        return Err(Box::new(answer::denied(reason)));
    }
    let allowed = effective_allowed(&g.policy, overrides.as_deref()).cloned();
    let denied = effective_denied(&g.policy, overrides.as_deref()).cloned();
    log.decision = match verdict.decision {
        Decision::Handler(_) => Logged::Handler,
        _ => Logged::Egress,
    };
    Ok(Plan {
        port_named: allowed.as_ref().is_some_and(|a| a.names_port(&host, port)),
        target: Target { https: false, host, port },
        intercept,
        container,
        class,
        addrs: None,
        unresolved: None,
        enable_internet: effective_internet(&g.policy, overrides.as_deref()),
        allowed,
        denied,
    })
}

async fn run_tunnel(
    worker: &Rc<Worker>,
    plan: Plan,
    reader: ConnReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    log: &mut LogLine,
) {
    let limits = &worker.shared.config.limits;
    let (mut rd, mut first) = reader.into_parts();
    let raw_allowed = plan.enable_internet || plan.port_named;
    // Only where raw TCP may flow can a silent client be waiting for the server to speak.
    let server_first = raw_allowed.then_some(SERVER_FIRST_WAIT);
    let inside = match sniff(&mut rd, &mut first, server_first, limits.tls_handshake_timeout).await {
        Ok(i) => i,
        Err(e) => {
            log.detail = format!("tunnel closed before it said anything useful: {e}");
            return;
        }
    };
    match &inside {
        Inside::Tls(sni) => {
            // One authority (SPEC 8.2): the name the client will verify is the name we checked.
            let matches = match (&plan.target.host, sni) {
                (CanonicalHost::Name(n), Some(s)) => CanonicalHost::parse(s).is_ok_and(|c| c.to_string() == *n),
                (CanonicalHost::Ip(_), None) => true,
                (CanonicalHost::Ip(ip), Some(s)) => CanonicalHost::parse(s).is_ok_and(|c| c.ip() == Some(*ip)),
                (CanonicalHost::Name(_), None) => false,
            };
            if !matches {
                log.decision = Logged::Deny;
                log.detail = format!("TLS server name {sni:?} is not the CONNECT host {}", plan.target.host);
                return;
            }
            if plan.intercept {
                let tunnel = super::target::Pinned::tunnel(
                    plan.container.clone(),
                    Target { https: true, ..plan.target.clone() },
                );
                let Ok(tcp) = rd.reunite(writer.into_inner()) else { return };
                super::intercept::serve(worker, plan.class, tunnel, tcp, first, log).await;
                return;
            }
            log.detail = "tls tunnel (not intercepted)".into();
        }
        Inside::Http => {
            // Every request inside runs the full decision order, as on the listener.
            log.detail = "plain http tunnel: each request is decided and logged on its own".into();
            let tunnel = super::target::Pinned::tunnel(plan.container.clone(), plan.target.clone());
            let reader = ConnReader::from_parts(rd, first);
            // Inside a tunnel a CONNECT is answered as a request, so nothing comes back here.
            let _ = super::conn::serve_requests(worker, plan.class, reader, writer, Some(tunnel)).await;
            return;
        }
        Inside::Raw | Inside::ServerFirst => {
            if !raw_allowed {
                log.decision = Logged::Deny;
                log.detail = "raw TCP tunnel: needs enableInternet or an allowedHosts entry with this port".into();
                return;
            }
            log.detail = match inside {
                Inside::Raw => "raw tcp tunnel".into(),
                _ => "raw tcp tunnel (the server speaks first)".into(),
            };
        }
    }
    if let Some(why) = &plan.unresolved {
        log.detail = format!("{}: {why}", log.detail);
        return;
    }
    let addrs = match &plan.addrs {
        Some(addrs) => addrs.clone(),
        // An intercepted tunnel was opened without resolving: check the host now.
        None => match resolve(worker, &plan).await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(why)) => {
                log.detail = format!("{}: {why}", log.detail);
                return;
            }
            Err(e) => {
                log.decision = Logged::Deny;
                log.detail = format!("{}: {e}", log.detail);
                return;
            }
        },
    };
    let mut upstream = match worker.upstream.connect_checked(&addrs, &plan.target).await {
        Ok(s) => s,
        Err(e) => {
            log.detail = format!("{}: {e}", log.detail);
            return;
        }
    };
    let mut client_wr = writer.into_inner();
    let mut greeting = 0u64;
    if matches!(inside, Inside::ServerFirst) {
        match relay_greeting(&mut rd, &mut first, &mut client_wr, &mut upstream).await {
            Ok(n) => greeting = n,
            Err(e) => {
                log.detail = format!("{} (ended: {e})", log.detail);
                return;
            }
        }
    }
    // Replay exactly what the client sent first.
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    let Ok(mut client) = rd.reunite(client_wr) else { return };
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            log.bytes_up = up + first.len() as u64;
            log.bytes_down = down + greeting;
        }
        Err(e) => log.detail = format!("{} (ended: {e})", log.detail),
    }
}

/// How long a client that sent nothing after the 200 is waited for before the tunnel is
/// taken for a protocol whose server speaks first (SMTP, FTP, some SSH servers), where raw
/// TCP is allowed. A TLS or HTTP client sends at once.
const SERVER_FIRST_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A server-speaks-first tunnel: relays what the server says until the client's first bytes
/// arrive (left in `first`); returns the bytes relayed down. Those first bytes must not be
/// TLS or HTTP: a client that stays silent only to slip a TLS handshake or an HTTP request
/// past interception and per-request decisions is refused.
async fn relay_greeting(
    rd: &mut OwnedReadHalf,
    first: &mut BytesMut,
    client: &mut OwnedWriteHalf,
    upstream: &mut tokio::net::TcpStream,
) -> std::io::Result<u64> {
    let mut down = 0u64;
    let mut greeting = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = rd.read_buf(first) => {
                if n? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                // A raw first byte decides at once; a possible request line is read on until
                // it is clear (bounded: classify answers Raw past a short prefix).
                match classify(first) {
                    Sniffed::NeedMore => continue,
                    Sniffed::Raw => return Ok(down),
                    Sniffed::Tls | Sniffed::Http => {
                        return Err(std::io::Error::other("TLS or HTTP after a silent start is not relayed raw"));
                    }
                }
            }
            n = upstream.read(&mut greeting) => {
                let n = n?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                client.write_all(&greeting[..n]).await?;
                down += n as u64;
            }
        }
    }
}
