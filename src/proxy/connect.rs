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
use super::request::{LogLine, identify};
use super::worker::Worker;
use crate::policy::decide::{effective_allowed, effective_denied};
use crate::policy::{CanonicalHost, Decision, decide, decide_tunnel, host::split_authority};
use crate::upstream::{DialRules, Target};

/// Most bytes read while waiting for a complete ClientHello.
const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a tunnel are.
enum Inside {
    /// TLS with this server name (None: the ClientHello has no SNI).
    Tls(Option<String>),
    /// An HTTP request line (plain HTTP inside CONNECT).
    Http,
    /// Anything else.
    Raw,
}

/// Serves a CONNECT request; the client connection ends with it.
pub async fn serve(
    worker: &Rc<Worker>,
    class: usize,
    head: RequestHead,
    reader: ConnReader<OwnedReadHalf>,
    mut writer: BufWriter<OwnedWriteHalf>,
) {
    let shared = &worker.shared;
    let started = Instant::now();
    let mut log = LogLine {
        request_id: shared.next_request_id(),
        class: shared.classes[class].config.name.clone(),
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
            let rules = DialRules::Egress { allowed: plan.allowed.as_ref(), denied: plan.denied.as_ref() };
            match worker.upstream.resolve_checked(&plan.target, rules).await {
                Ok(addrs) => plan.addrs = addrs,
                // A name with no DNS answer may still be a virtual host that handlers answer
                // inside a plain-HTTP tunnel; TLS or raw bytes to it are closed below.
                Err(crate::upstream::UpstreamError::Dns(msg)) => plan.unresolved = Some(msg),
                Err(e) => {
                    log.detail = e.to_string();
                    let resp = answer::upstream_failure(&e);
                    if resp.status().as_u16() == 520 {
                        log.decision = "deny";
                    }
                    return refuse(shared, writer, resp, log, started).await;
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
    class: usize,
    /// The checked addresses (filled in before the 200).
    addrs: Vec<std::net::IpAddr>,
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
    class: usize,
    head: &RequestHead,
    log: &mut LogLine,
) -> Result<Plan, Box<http::Response<crate::body::Body>>> {
    let shared = &worker.shared;
    let container = identify(shared, &head.headers).map_err(|e| {
        log.decision = "error";
        log.detail = e.to_string();
        Box::new(answer::auth_required(&e.to_string()))
    })?;
    log.container = container.to_string();
    let bad = |log: &mut LogLine, msg: &str| {
        log.decision = "error";
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
    log.host = host.to_string();
    log.port = port;
    let runtime = worker.runtime(class).ok_or_else(|| {
        log.decision = "error";
        log.detail = "policy not loaded".into();
        Box::new(answer::not_loaded())
    })?;
    let g = &runtime.generation;
    log.generation = g.number;
    let overrides = shared.overrides.get(container.as_str(), g);
    // Intercepted TLS runs each request through the whole order, so a host that a handler
    // answers opens a tunnel; otherwise only steps 1, 2, 7, 8, 9 can apply (SPEC 4.3).
    let verdict = if g.policy.intercept_https {
        decide(&host, port, &g.policy, overrides.as_deref())
    } else {
        decide_tunnel(&host, port, &g.policy, overrides.as_deref())
    };
    if let Decision::Deny(reason) = verdict.decision {
        log.decision = "deny";
        log.detail = reason.to_string();
        return Err(Box::new(answer::denied(reason)));
    }
    let allowed = effective_allowed(&g.policy, overrides.as_deref()).cloned();
    let denied = effective_denied(&g.policy, overrides.as_deref()).cloned();
    log.decision = match verdict.decision {
        Decision::Handler(_) => "handler",
        _ => "egress",
    };
    Ok(Plan {
        port_named: allowed.as_ref().is_some_and(|a| a.names_port(&host, port)),
        target: Target { https: false, host, port },
        intercept: g.policy.intercept_https,
        container,
        class,
        addrs: Vec::new(),
        unresolved: None,
        enable_internet: g.policy.enable_internet,
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
    let inside = match tokio::time::timeout(limits.tls_handshake_timeout, sniff(&mut rd, &mut first)).await {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => {
            log.detail = format!("tunnel closed before it said anything useful: {e}");
            return;
        }
        Err(_) => {
            log.detail = "tunnel: no ClientHello within limits.tls_handshake_timeout".into();
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
                log.decision = "deny";
                log.detail = format!("TLS server name {sni:?} is not the CONNECT host {}", plan.target.host);
                return;
            }
            if plan.intercept {
                let tunnel = super::request::Tunnel {
                    container: plan.container.clone(),
                    target: Target { https: true, ..plan.target.clone() },
                };
                let Ok(tcp) = rd.reunite(writer.into_inner()) else { return };
                super::intercept::serve(worker, plan.class, tunnel, tcp, first, log).await;
                return;
            }
            log.detail = "tls tunnel (not intercepted)".into();
        }
        Inside::Http => {
            // Every request inside runs the full decision order, as on the listener.
            log.detail = "plain http tunnel: each request is decided and logged on its own".into();
            let tunnel = super::request::Tunnel { container: plan.container.clone(), target: plan.target.clone() };
            let reader = ConnReader::from_parts(rd, first);
            // Inside a tunnel a CONNECT is answered as a request, so nothing comes back here.
            let _ = super::conn::serve_requests(worker, plan.class, reader, writer, Some(tunnel)).await;
            return;
        }
        Inside::Raw => {
            if !(plan.enable_internet || plan.port_named) {
                log.decision = "deny";
                log.detail = "raw TCP tunnel: needs enableInternet or an allowedHosts entry with this port".into();
                return;
            }
            log.detail = "raw tcp tunnel".into();
        }
    }
    if let Some(why) = &plan.unresolved {
        log.detail = format!("{}: {why}", log.detail);
        return;
    }
    let mut upstream = match worker.upstream.connect_checked(&plan.addrs, &plan.target).await {
        Ok(s) => s,
        Err(e) => {
            log.detail = format!("{}: {e}", log.detail);
            return;
        }
    };
    // Replay exactly what the client sent first.
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    let Ok(mut client) = rd.reunite(writer.into_inner()) else { return };
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            log.bytes_up = up + first.len() as u64;
            log.bytes_down = down;
        }
        Err(e) => log.detail = format!("{} (ended: {e})", log.detail),
    }
}

/// Reads until the first bytes tell what the tunnel carries; for TLS, until rustls has the
/// whole ClientHello (it may span several TCP segments) and its SNI.
async fn sniff(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<Inside> {
    while buf.is_empty() {
        if rd.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    if buf[0] == 0x16 {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut fed = 0;
        loop {
            let mut chunk = &buf[fed..];
            let n = acceptor.read_tls(&mut chunk)?;
            if n == 0 && fed < buf.len() {
                return Err(std::io::Error::other("ClientHello not accepted"));
            }
            fed += n;
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    return Ok(Inside::Tls(accepted.client_hello().server_name().map(str::to_string)));
                }
                Ok(None) => {}
                Err((e, _)) => return Err(std::io::Error::other(format!("not a valid ClientHello: {e}"))),
            }
            if fed == buf.len() {
                if buf.len() > MAX_HELLO {
                    return Err(std::io::Error::other("ClientHello too large"));
                }
                if rd.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
    if buf[0].is_ascii_uppercase() {
        return Ok(Inside::Http);
    }
    Ok(Inside::Raw)
}
