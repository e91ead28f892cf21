//! Talking to upstream servers: resolve, check every address (SPEC 8.3), dial the checked
//! address, and send over pooled HTTP/1.1 or HTTP/2 connections.

pub mod addr;
pub mod fixture;
mod head_wait;
mod pool;
pub mod resolve;
pub mod tls;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::Body;
use crate::policy::{CanonicalHost, HostList};
use crate::rt::Ticks;
use addr::{AddressRules, Refusal};
use pool::{Pool, Pooled, Shared2};

/// Where a request goes: the canonical host and the port that was evaluated (SPEC 8.2).
#[derive(Clone, Debug)]
pub struct Target {
    /// TLS to the upstream (an `https://` URL or an intercepted tunnel).
    pub https: bool,
    /// Canonical host (SPEC 4.1): the one name every check uses.
    pub host: CanonicalHost,
    /// Port as dialled.
    pub port: u16,
}

impl Target {
    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// `host[:port]` as it belongs in a Host header (default port omitted).
    pub fn authority(&self) -> String {
        let mut out = String::with_capacity(48);
        self.host.push_url_host(&mut out);
        if self.port != if self.https { 443 } else { 80 } {
            out.push(':');
            crate::policy::host::push_decimal(&mut out, u32::from(self.port));
        }
        out
    }
}

/// Which addresses a request may dial.
pub enum DialRules<'a> {
    /// Container egress: the full check of SPEC 8.3.
    Egress {
        /// `allowedHosts` in force (the class's or the container's override): IP/CIDR entries
        /// let special addresses be dialled.
        allowed: Option<&'a HostList>,
        /// `deniedHosts` in force: an address they name is refused.
        denied: Option<&'a HostList>,
    },
    /// A handler's `fetch` (trusted code): only moat's own listeners are refused (SPEC 8.4).
    Trusted,
}

/// Why an upstream request failed; each maps to one answer (SPEC 9): the refusals to 520,
/// the timeouts to 504, the rest to 502. `authority` is `host[:port]` as dialled.
#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    /// moat's resolver found no address (the message says why, naming the host).
    #[error("{message}")]
    Dns { message: String },
    /// Every address the host resolved to failed the dial-time check (SPEC 8.3).
    #[error("every address of {host} is refused ({why})")]
    Blocked { host: String, why: String },
    /// The target is one of moat's own listeners (SPEC 8.4): a request to itself.
    #[error("{authority} is moat itself")]
    Loop { authority: String },
    /// TCP connect failed on every address (the last error).
    #[error("connect to {authority} failed: {error}")]
    Connect { authority: String, error: String },
    /// TCP connect took longer than `limits.connect_timeout`.
    #[error("connect to {authority} timed out")]
    ConnectTimeout { authority: String },
    /// The TLS handshake or the certificate check failed.
    #[error("TLS to {authority} failed: {error}")]
    Tls { authority: String, error: String },
    /// The TLS handshake took longer than `limits.tls_handshake_timeout`.
    #[error("TLS handshake with {authority} timed out")]
    TlsTimeout { authority: String },
    /// The upstream broke HTTP (a malformed head, a reset before the response).
    #[error("upstream {authority}: {error}")]
    Protocol { authority: String, error: String },
    /// No response head within `limits.response_head_timeout` after the request went out.
    #[error("{authority} sent no response for {waited:?} after the request (limits.response_head_timeout)")]
    ResponseTimeout { authority: String, waited: Duration },
}

/// One worker's upstream client.
pub struct Upstream {
    resolver: resolve::Resolver,
    pool: Pool,
    connect_timeout: Duration,
    tls: tls::UpstreamTls,
    tls_timeout: Duration,
    response_head_timeout: Duration,
    /// The worker's heartbeat clock, which bounds the response-head wait.
    ticks: Rc<Ticks>,
    own_listeners: Arc<Vec<SocketAddr>>,
    /// Set for `moat test`: connections go to fixtures, never to the network.
    fixtures: Option<Rc<dyn fixture::FixtureDialer>>,
}

impl Upstream {
    /// An upstream client with the connect, TLS handshake and response-head bounds of `limits`.
    pub fn new(
        resolver: resolve::Resolver,
        tls: tls::UpstreamTls,
        limits: &crate::config::Limits,
        own_listeners: Arc<Vec<SocketAddr>>,
        ticks: Rc<Ticks>,
    ) -> Self {
        Self {
            resolver,
            pool: Pool::default(),
            connect_timeout: limits.connect_timeout,
            tls,
            tls_timeout: limits.tls_handshake_timeout,
            response_head_timeout: limits.response_head_timeout,
            ticks,
            own_listeners,
            fixtures: None,
        }
    }

    /// This client with every connection answered by `fixtures` (and every name they do not
    /// know resolved to their address): what `moat test` runs a policy against.
    pub fn with_fixtures(mut self, fixtures: Rc<dyn fixture::FixtureDialer>) -> Self {
        self.resolver.answer_rest_with(fixtures.address_of_any_name());
        self.fixtures = Some(fixtures);
        self
    }

    /// moat's listeners, for loop checks before any I/O.
    pub fn own_listeners(&self) -> &[SocketAddr] {
        &self.own_listeners
    }

    /// Closes pooled connections unused for the pool's keep time (called periodically).
    pub fn sweep_idle(&self) {
        self.pool.sweep(std::time::Instant::now());
    }

    /// Sends `req` (origin-form URI, Host set) to `target`, dialling only addresses that pass
    /// `rules`. TLS upstreams get HTTP/2 when they offer it (except for upgrades), whatever
    /// the client spoke. Fails when the upstream sends no response head within
    /// `response_head_timeout` of the request's last bytes.
    pub async fn send(
        &self,
        req: Request<Body>,
        target: &Target,
        rules: DialRules<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addrs = self.resolver.resolve(&target.host).await.map_err(|message| UpstreamError::Dns { message })?;
        let checked = self.check(&addrs, target, &rules)?;
        let key = (target.host.clone(), target.port, target.https);
        let h2_ok = target.https && !crate::headers::is_upgrade(req.headers());
        let protocol = |e: hyper::Error| UpstreamError::Protocol {
            authority: target.authority(),
            error: describe_hyper_error(&e),
        };
        let mut upload = head_wait::UploadClock::default();
        let mut req = req.map(|body| upload.track(body));
        // Each wait for a response head is bounded on its own (not the whole of `send`): the
        // bound then wraps hyper's small response future rather than this one's large state.
        if h2_ok && let Some(mut conn) = self.pool.h2(&key, |peer| checked.contains(&peer.ip())) {
            match self.head(conn.sender.try_send_request(for_h2(req, target)), &upload, target).await? {
                Ok(resp) => return Ok(resp),
                Err(e) => req = unsent(e).map_err(protocol)?,
            }
        }
        if let Some(mut conn) = self.pool.checkout(&key, |peer| checked.contains(&peer.ip())) {
            let replay = conn.may_be_closing().then(|| replayable(&req)).flatten();
            match self.head(conn.sender.try_send_request(req), &upload, target).await? {
                Ok(resp) => {
                    self.pool.put_back(key, conn);
                    return Ok(resp);
                }
                Err(e) => {
                    req = match (unsent(e), replay) {
                        (Ok(req), _) => req,
                        // The server closed the connection as the request reached it (its
                        // keep-alive timer fired) and answered nothing: a request that is safe
                        // to repeat goes again on a new connection (RFC 9112 §9.3.1).
                        (Err(e), Some(again)) if e.is_incomplete_message() => again,
                        (Err(e), _) => return Err(protocol(e)),
                    }
                }
            }
        }
        // Boxed: dialling (TLS, HTTP/2 handshake) has large state that would otherwise be
        // part of every request's future, and so of every idle connection's task.
        match Box::pin(self.dial(&checked, target, h2_ok)).await? {
            Dialed::H1(mut conn) => {
                let resp = self.head(conn.sender.send_request(req), &upload, target).await?.map_err(protocol)?;
                self.pool.put_back(key, conn);
                Ok(resp)
            }
            Dialed::H2(conn) => {
                let mut sender = conn.sender.clone();
                self.pool.add_h2(key, conn);
                self.head(sender.send_request(for_h2(req, target)), &upload, target).await?.map_err(protocol)
            }
        }
    }

    /// Awaits `sending` (a response head) unless the upstream stays silent for
    /// `response_head_timeout` after the request's last bytes.
    async fn head<T>(
        &self,
        sending: impl Future<Output = T>,
        upload: &head_wait::UploadClock,
        target: &Target,
    ) -> Result<T, UpstreamError> {
        head_wait::within(sending, upload, self.response_head_timeout, &self.ticks).await.ok_or_else(|| {
            UpstreamError::ResponseTimeout { authority: target.authority(), waited: self.response_head_timeout }
        })
    }

    fn check(&self, addrs: &[IpAddr], target: &Target, rules: &DialRules<'_>) -> Result<Vec<IpAddr>, UpstreamError> {
        let mut ok = Vec::with_capacity(addrs.len());
        let mut refusals = Vec::new();
        for &ip in addrs {
            let verdict = match rules {
                DialRules::Egress { allowed, denied } => {
                    AddressRules { allowed: *allowed, denied: *denied, own: &self.own_listeners }.check(ip, target.port)
                }
                DialRules::Trusted if addr::is_own_listener(&self.own_listeners, ip, target.port) => {
                    Err(Refusal::OwnListener)
                }
                DialRules::Trusted => Ok(()),
            };
            match verdict {
                Ok(()) => ok.push(ip.to_canonical()),
                Err(r) => refusals.push((ip, r)),
            }
        }
        if !ok.is_empty() {
            return Ok(ok);
        }
        if refusals.iter().any(|(_, r)| *r == Refusal::OwnListener) {
            return Err(UpstreamError::Loop { authority: target.authority() });
        }
        let why = refusals
            .iter()
            .map(|(ip, r)| match r {
                Refusal::Special(kind) => {
                    format!("{ip} is {kind}; an allowedHosts entry \"{ip}\" or a CIDR around it would allow it")
                }
                Refusal::Denied => format!("{ip} is in deniedHosts"),
                Refusal::OwnListener => format!("{ip} is moat"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(UpstreamError::Blocked { host: target.host.to_string(), why })
    }

    /// A new connection: TLS when the target is https (HTTP/2 if `h2` and the server picks
    /// it), else HTTP/1.1 over TCP.
    async fn dial(&self, addrs: &[IpAddr], target: &Target, h2: bool) -> Result<Dialed, UpstreamError> {
        let failed = |e: hyper::Error| UpstreamError::Connect { authority: target.authority(), error: e.to_string() };
        if let Some(fixtures) = &self.fixtures {
            let stream = fixtures
                .dial(target)
                .map_err(|error| UpstreamError::Connect { authority: target.authority(), error })?;
            let peer = SocketAddr::new(addrs[0], target.port);
            return Ok(Dialed::H1(Pooled::new(handshake_h1(TokioIo::new(stream)).await.map_err(failed)?, peer)));
        }
        let (stream, peer) = self.connect(addrs, target).await?;
        if !target.https {
            return Ok(Dialed::H1(Pooled::new(handshake_h1(TokioIo::new(stream)).await.map_err(failed)?, peer)));
        }
        let tls = tokio::time::timeout(self.tls_timeout, self.tls.connect(&target.host, stream, h2))
            .await
            .map_err(|_| UpstreamError::TlsTimeout { authority: target.authority() })?
            .map_err(|error| UpstreamError::Tls { authority: target.authority(), error })?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(crate::rt::LocalExec)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(failed)?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            return Ok(Dialed::H2(Shared2 { sender, peer }));
        }
        Ok(Dialed::H1(Pooled::new(handshake_h1(TokioIo::new(tls)).await.map_err(failed)?, peer)))
    }

    /// TCP to the first checked address that answers, within the connect timeout.
    async fn connect(&self, addrs: &[IpAddr], target: &Target) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let deadline = Instant::now() + self.connect_timeout;
        let mut last_err = String::new();
        for &ip in addrs {
            let peer = SocketAddr::new(ip, target.port);
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, TcpStream::connect(peer)).await {
                Err(_) => return Err(UpstreamError::ConnectTimeout { authority: target.authority() }),
                Ok(Err(e)) => last_err = format!("{peer}: {e}"),
                Ok(Ok(stream)) => {
                    if stream
                        .local_addr()
                        .is_ok_and(|local| addr::reached_own_listener(&self.own_listeners, local, peer))
                    {
                        return Err(UpstreamError::Loop { authority: target.authority() });
                    }
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, peer));
                }
            }
        }
        Err(UpstreamError::Connect { authority: target.authority(), error: last_err })
    }

    /// The addresses a tunnel may dial: resolved and checked exactly as egress (SPEC 8.3),
    /// before the tunnel is promised to the client.
    pub async fn resolve_checked(&self, target: &Target, rules: DialRules<'_>) -> Result<Vec<IpAddr>, UpstreamError> {
        let addrs = self.resolver.resolve(&target.host).await.map_err(|message| UpstreamError::Dns { message })?;
        self.check(&addrs, target, &rules)
    }

    /// A raw TCP connection to one of the checked addresses.
    pub async fn connect_checked(&self, checked: &[IpAddr], target: &Target) -> Result<TcpStream, UpstreamError> {
        if self.fixtures.is_some() {
            return Err(UpstreamError::Connect {
                authority: target.authority(),
                error: "moat test: a tunnel moat does not intercept reaches no fixture".into(),
            });
        }
        Ok(self.connect(checked, target).await?.0)
    }
}

/// A pooled connection that failed a request: the request back when it never went out (the
/// connection had closed), to be retried on another connection; else the error.
/// A copy of `req` to send again if its connection turns out closed: only for a request
/// without a body whose method is idempotent (RFC 9110 §9.2.2).
fn replayable(req: &Request<Body>) -> Option<Request<Body>> {
    use http::Method;
    let idempotent = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
    if !idempotent || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut again = Request::new(crate::body::empty());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    Some(again)
}

fn unsent(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> Result<Request<Body>, hyper::Error> {
    e.take_message().ok_or_else(|| e.into_error())
}

/// A freshly dialled connection.
enum Dialed {
    H1(Pooled),
    H2(Shared2),
}

/// HTTP/1.1 over `io`, its connection driven on the worker (with upgrades, for WebSocket).
async fn handshake_h1<T>(io: T) -> Result<hyper::client::conn::http1::SendRequest<Body>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new().handshake(io).await?;
    tokio::task::spawn_local(async move {
        // Errors here surface on the request that was in flight.
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// An origin-form HTTP/1.1 request as HTTP/2 wants it: the authority in the URI (sent as
/// `:authority`), no Host header (RFC 9113 §8.3.1).
fn for_h2(mut req: Request<Body>, target: &Target) -> Request<Body> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = format!("https://{}{}", target.authority(), path).parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
    req.headers_mut().remove(http::header::HOST);
    req
}

fn describe_hyper_error(e: &hyper::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Turns a request into the form sent upstream: origin-form URI, `Host` = the evaluated
/// authority (SPEC 8.2: the URI's authority wins), no hop-by-hop headers, and framing that
/// comes from the body itself.
pub fn to_upstream_request(mut req: Request<Body>, target: &Target) -> Request<Body> {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        *req.uri_mut() = path.parse::<Uri>().unwrap_or_else(|_| Uri::from_static("/"));
    }
    *req.version_mut() = http::Version::HTTP_11;
    let exact = http_body::Body::size_hint(req.body()).exact();
    let sends_body = !matches!(*req.method(), http::Method::GET | http::Method::HEAD);
    let headers = req.headers_mut();
    crate::headers::strip_hop_by_hop_keep_upgrade(headers);
    headers.remove(http::header::EXPECT);
    // A Content-Length is never taken from the headers: a handler that swaps the body of a
    // copied request (or sets the header itself) would otherwise announce a length the body
    // does not have, and the upstream connection would hang or read the rest as a new request.
    // hyper chunks a body of unknown length.
    match exact {
        Some(n) if n > 0 || sends_body || headers.contains_key(http::header::CONTENT_LENGTH) => {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        // hyper sends a GET or HEAD body of unknown length as no body at all unless asked to
        // chunk it: the body would be dropped and the request sent as complete before its
        // framing (a client's chunked body) was known to be valid. Chunked, the upstream
        // sees the request end only with the last chunk, after moat has checked it.
        None if !sends_body => {
            headers.remove(http::header::CONTENT_LENGTH);
            headers.insert(http::header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        _ => {
            headers.remove(http::header::CONTENT_LENGTH);
        }
    }
    if let Ok(host) = HeaderValue::from_maybe_shared(bytes::Bytes::from(target.authority())) {
        headers.insert(http::header::HOST, host);
    }
    req
}
