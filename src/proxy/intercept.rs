//! TLS interception (`interceptHttps = true`, SPEC 5.1): moat terminates the client's TLS with
//! a leaf for the CONNECT host signed by its CA, then every request inside runs the full
//! decision order as `https://host[:port]/…`, over HTTP/1.1 or HTTP/2 as the client chose.

use std::cell::Cell;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio::net::TcpStream;

use super::answer;
use super::h1::{ConnReader, Framing, RequestHead};
use super::request::{LogLine, new_log, respond};
use super::state::{ClassId, Shared};
use super::target::Pinned;
use super::worker::Worker;
use crate::body::{Body, BoxError, StallLimit};
use crate::log::Logged;
use crate::policy::CanonicalHost;

/// Most concurrent HTTP/2 streams per intercepted connection.
const MAX_STREAMS: u32 = 100;

/// Terminates the client's TLS and serves the requests inside. `first` holds the bytes
/// already read from `tcp` (the ClientHello), which the handshake reads again.
pub async fn serve(
    worker: &Rc<Worker>,
    class: ClassId,
    tunnel: Pinned,
    tcp: TcpStream,
    first: BytesMut,
    log: &mut LogLine,
) {
    let shared = &worker.shared;
    let config = match shared.leaves.server_config(&tunnel.target.host) {
        Ok(c) => c,
        Err(e) => {
            log.detail = format!("no certificate for {}: {e}", tunnel.target.host);
            tracing::error!("{}", log.detail);
            return;
        }
    };
    let io = Rewind { prefix: first, inner: tcp };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(io);
    let tls = match tokio::time::timeout(shared.config.limits.tls_handshake_timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // Typically the client does not trust moat's CA yet: say where it is.
            log.detail = format!(
                "intercepted TLS handshake failed: {e} (clients must trust {})",
                crate::tls::ca::cert_path(&shared.config).display()
            );
            tracing::warn!(container = %tunnel.container, host = %tunnel.target.host, "{}", log.detail);
            return;
        }
        Err(_) => {
            log.detail = "intercepted TLS handshake took longer than limits.tls_handshake_timeout".into();
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    log.detail = format!(
        "tls tunnel (intercepted, {}): each request is decided and logged on its own",
        if h2 { "h2" } else { "http/1.1" }
    );
    if h2 {
        serve_h2(worker.clone(), class, Rc::new(tunnel), tls).await;
    } else {
        let (rd, wr) = tokio::io::split(tls);
        let reader = ConnReader::new(rd);
        let writer = BufWriter::with_capacity(super::WRITE_BUFFER, wr);
        // Inside a tunnel a CONNECT is answered as a request, so nothing comes back here.
        let _ = super::conn::serve_requests(worker, class, reader, writer, Some(tunnel)).await;
    }
}

async fn serve_h2<S>(worker: Rc<Worker>, class: ClassId, tunnel: Rc<Pinned>, tls: S)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let limits = &worker.shared.config.limits;
    let mut builder = hyper::server::conn::http2::Builder::new(crate::rt::LocalExec);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(limits.request_head_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(limits.idle_timeout / 2);
    let activity = Rc::new(Activity { open: Cell::new(0), last: Cell::new(Instant::now()) });
    let service = {
        let worker = worker.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let worker = worker.clone();
            let tunnel = tunnel.clone();
            let stream = OpenStream::new(activity.clone());
            async move { Ok::<_, Infallible>(h2_request(&worker, class, &tunnel, req, stream).await) }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    // HTTP/2 has no idle timeout of its own: a connection with no open stream for
    // limits.idle_timeout is told to go away (GOAWAY), like an idle HTTP/1.1 connection.
    let idle = limits.idle_timeout;
    loop {
        let deadline = activity.last.get() + idle;
        tokio::select! {
            _ = conn.as_mut() => return,
            () = worker.drain_started() => {
                // moat shuts down: streams open now finish, no new one starts (GOAWAY).
                conn.as_mut().graceful_shutdown();
                let _ = conn.as_mut().await;
                return;
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if activity.open.get() == 0 && activity.last.get().elapsed() >= idle {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                    return;
                }
                if activity.open.get() > 0 {
                    // Streams are open: look again after another idle period.
                    activity.last.set(Instant::now());
                }
            }
        }
    }
}

/// Streams open on an HTTP/2 connection and when one last started or ended.
struct Activity {
    open: Cell<usize>,
    last: Cell<Instant>,
}

/// One open stream, counted in [`Activity`] from its request until its response body is
/// done or dropped (a stream the client resets mid-handler drops this too).
struct OpenStream(Rc<Activity>);

impl OpenStream {
    fn new(activity: Rc<Activity>) -> Self {
        activity.open.set(activity.open.get() + 1);
        activity.last.set(Instant::now());
        Self(activity)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
        self.0.last.set(Instant::now());
    }
}

/// One HTTP/2 stream: the same `handle` as HTTP/1.1, with the pseudo-headers turned into the
/// origin-form target and a check that `:authority` is the tunnel's host.
async fn h2_request(
    worker: &Worker,
    class: ClassId,
    tunnel: &Pinned,
    req: Request<Incoming>,
    stream: OpenStream,
) -> Response<LoggedBody> {
    let started = Instant::now();
    let (parts, incoming) = req.into_parts();
    let shared = worker.shared.clone();
    if let Some(authority) = parts.uri.authority()
        && !same_authority(authority.as_str(), tunnel)
    {
        // RFC 9110 §15.5.20: this connection cannot serve that authority.
        let msg = format!("moat: request for {authority} inside a tunnel to {}", tunnel.target.authority());
        let log = LogLine {
            request_id: shared.next_request_id(),
            container: tunnel.container.to_string(),
            class: shared.class(class).config.name.clone(),
            method: parts.method.clone(),
            scheme: "https",
            host: Some(tunnel.target.host.clone()),
            port: tunnel.target.port,
            decision: Logged::Error,
            detail: msg.clone(),
            status: 421,
            ..Default::default()
        };
        let resp = answer::text(StatusCode::MISDIRECTED_REQUEST, msg);
        return logged(resp, log, Arc::new(AtomicU64::new(0)), started, shared, stream);
    }
    let mut headers = parts.headers;
    join_cookies(&mut headers);
    let head = RequestHead {
        method: parts.method,
        target: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        version: http::Version::HTTP_2,
        headers,
        framing: Framing::None,
        keep_alive: true,
    };
    let is_head = head.method == http::Method::HEAD;
    let up = Arc::new(AtomicU64::new(0));
    let idle = worker.shared.config.limits.body_idle_timeout;
    let stalled = Arc::new(AtomicBool::new(false));
    let incoming =
        crate::body::DrainOnDrop::new(StallLimit::new(incoming, idle, "the client").flag_on_stall(stalled.clone()));
    let body = crate::body::boxed(Counted { inner: incoming, count: up.clone() });
    // hyper drops this future when the client resets the stream: the guard still logs it.
    let mut unanswered = Unanswered {
        log: Some(new_log(worker, class, &head.method, Some(tunnel))),
        started,
        shared: &worker.shared,
        up: up.clone(),
    };
    let in_progress = unanswered.log.as_mut().expect("set above");
    let mut response = respond(worker, class, head, body, Some(tunnel), in_progress).await;
    let mut log = unanswered.log.take().expect("still set");
    if stalled.load(Ordering::Relaxed) {
        // As over HTTP/1.1: a client that stopped sending its body gets 408, whatever the
        // handler or the upstream made of the failed stream.
        let msg = format!("the client sent no body bytes for {idle:?} (limits.body_idle_timeout)");
        response = answer::text(StatusCode::REQUEST_TIMEOUT, format!("moat: {msg}"));
        log.status = 408;
        log.detail = msg;
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // HTTP/2 has no Upgrade; a WebSocket client uses HTTP/1.1 for it.
        log.decision = Logged::Error;
        log.detail = "upstream switched protocols on an HTTP/2 request".into();
        response = answer::text(StatusCode::BAD_GATEWAY, "moat: upstream switched protocols on an HTTP/2 request");
        log.status = 502;
    }
    // Connection-specific headers have no place in HTTP/2 (RFC 9113 §8.2.2).
    crate::headers::strip_hop_by_hop(response.headers_mut());
    if !is_head {
        // The length comes from the body: a handler's own `content-length` that disagrees
        // with its body would make the stream a protocol error. (A HEAD answer keeps the
        // length of the representation it describes.)
        match http_body::Body::size_hint(response.body()).exact() {
            Some(n) => response.headers_mut().insert(http::header::CONTENT_LENGTH, n.into()),
            None => response.headers_mut().remove(http::header::CONTENT_LENGTH),
        };
    }
    logged(response, log, up, started, shared, stream)
}

/// The log line of an HTTP/2 request while it is handled; logged as 499 if the request is
/// dropped before its answer (the client reset the stream or closed the connection).
struct Unanswered<'a> {
    log: Option<LogLine>,
    started: Instant,
    shared: &'a Shared,
    up: Arc<AtomicU64>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            log.status = super::conn::CLIENT_CLOSED;
            log.add_failure("request", &"the client cancelled the stream before the answer");
            log.duration = self.started.elapsed();
            log.bytes_up = self.up.load(Ordering::Relaxed);
            log.emit();
            log.record(&self.shared.metrics);
        }
    }
}

fn logged(
    resp: Response<Body>,
    log: LogLine,
    up: Arc<AtomicU64>,
    started: Instant,
    shared: Arc<Shared>,
    stream: OpenStream,
) -> Response<LoggedBody> {
    let count = Arc::new(AtomicU64::new(0));
    let idle = shared.config.limits.body_idle_timeout;
    resp.map(|inner| LoggedBody {
        inner: Counted { inner: crate::body::boxed(StallLimit::new(inner, idle, "the response body")), count },
        up,
        log: Some(log),
        started,
        shared,
        _stream: stream,
    })
}

/// Does an `:authority` name the tunnel's host and port?
fn same_authority(authority: &str, tunnel: &Pinned) -> bool {
    let Ok((host, port)) = crate::policy::host::split_authority(authority) else { return false };
    CanonicalHost::parse(host).is_ok_and(|h| h == tunnel.target.host) && port.unwrap_or(443) == tunnel.target.port
}

/// HTTP/2 may carry cookies as several fields; HTTP/1.1 upstreams and handlers expect one
/// (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut http::HeaderMap) {
    if headers.get_all(http::header::COOKIE).iter().count() < 2 {
        return;
    }
    let joined: Vec<u8> =
        headers.get_all(http::header::COOKIE).iter().map(HeaderValue::as_bytes).collect::<Vec<_>>().join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(http::header::COOKIE, v);
    }
}

/// A body that counts the bytes passing through it.
struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.remaining() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes the request's access-log line once it is finished or dropped
/// (an HTTP/2 stream has no other moment that knows the bytes sent).
struct LoggedBody {
    inner: Counted<Body>,
    up: Arc<AtomicU64>,
    log: Option<LogLine>,
    started: Instant,
    shared: Arc<Shared>,
    /// The stream is open until this body is dropped.
    _stream: OpenStream,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            log.bytes_down = self.inner.count.load(Ordering::Relaxed);
            log.bytes_up = self.up.load(Ordering::Relaxed);
            log.duration = self.started.elapsed();
            log.emit();
            log.record(&self.shared.metrics);
        }
    }
}

/// A stream that first yields bytes already read from it (the ClientHello that was sniffed),
/// then reads on; writes go straight through.
struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            if self.prefix.is_empty() {
                // The prefix is the tunnel's first read buffer (8 KiB): an empty remainder
                // would keep all of it for as long as the connection lives.
                self.prefix = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
