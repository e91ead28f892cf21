//! The HTTP/1.1 request loop of a client connection (on the explicit listener, or inside a
//! CONNECT tunnel or an intercepted TLS connection): read a request, decide, answer, repeat
//! while the connection is kept alive.

use std::cell::RefCell;
use std::pin::pin;
use std::time::Instant;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};

use super::answer;
use super::h1::{BodyError, ConnReader, Framing, HeadError, RequestHead, WriteOptions, write_response};
use super::request::{LogLine, new_log, respond};
use super::state::ClassId;
use super::target::Pinned;
use super::worker::Worker;
use crate::body::{self, ChannelBody};
use crate::config::Limits;

/// A CONNECT request read on the listener: the connection now belongs to the tunnel.
pub struct Connect<R, W> {
    pub head: RequestHead,
    pub reader: ConnReader<R>,
    pub writer: BufWriter<W>,
}

/// The request loop of a client connection, or of HTTP inside a CONNECT tunnel (then every
/// request is for the tunnel's host, on behalf of the tunnel's container). Returns the
/// connection when a CONNECT outside a tunnel asks to take it over.
///
/// Each turn has three phases: [`read_head`] (wait for the next request and parse its head),
/// [`exchange`] (pump its body while [`respond`] decides and answers, then write the answer),
/// and what the exchange left the connection fit for ([`After`]).
pub async fn serve_requests<R, W>(
    worker: &Worker,
    class: ClassId,
    mut reader: ConnReader<R>,
    mut writer: BufWriter<W>,
    tunnel: Option<Pinned>,
) -> Option<Connect<R, W>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let limits = worker.shared.config.limits.clone();
    let mut first = true;
    loop {
        let head;
        (head, writer) = read_head(worker, &mut reader, writer, first, &limits).await?;
        first = false;
        if head.method == http::Method::CONNECT && tunnel.is_none() {
            return Some(Connect { head, reader, writer });
        }
        match exchange(worker, class, head, &mut reader, &mut writer, tunnel.as_ref(), &limits).await {
            After::KeepAlive => {}
            After::Close => {
                let _ = writer.shutdown().await;
                return None;
            }
            After::Gone => return None,
            After::Upgrade(upgrading) => {
                let Upgrading { response, mut log, started } = *upgrading;
                // The upstream agreed to switch protocols (WebSocket): relay the 101, then
                // both directions byte for byte until either side closes.
                relay_upgrade(response, reader, writer, &mut log, started).await;
                log.emit();
                log.record(&worker.shared.metrics);
                return None;
            }
        }
    }
}

/// What an exchange left the connection fit for.
enum After {
    /// Another request may follow.
    KeepAlive,
    /// The answer is written; close our side.
    Close,
    /// Nothing more to write (the client went away, or a write failed).
    Gone,
    /// A `101` to relay: the connection becomes the upgraded stream (boxed: rare, and large).
    Upgrade(Box<Upgrading>),
}

/// A `101` and the log line of the request that asked for it.
struct Upgrading {
    response: http::Response<crate::body::Body>,
    log: LogLine,
    started: Instant,
}

/// Waits for the next request and reads its head, within the idle (or, for a new connection,
/// the head) timeout and then the head timeout. A bad or late head is answered here and ends
/// the connection (`None`).
async fn read_head<R, W>(
    worker: &Worker,
    reader: &mut ConnReader<R>,
    writer: BufWriter<W>,
    first: bool,
    limits: &Limits,
) -> Option<(RequestHead, BufWriter<W>)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A new connection must start its request within the head timeout; a kept-alive one
    // may sit idle for the idle timeout.
    let wait = if first { limits.request_head_timeout } else { limits.idle_timeout };
    let mut writer = match tokio::time::timeout(wait, next_request(worker, reader, writer)).await {
        Ok((Ok(true), w)) => w,
        _ => return None,
    };
    let refusal = match tokio::time::timeout(limits.request_head_timeout, reader.read_head(limits.request_head_bytes))
        .await
    {
        Ok(Ok(head)) => return Some((head, writer)),
        Ok(Err(HeadError::Closed | HeadError::Io(_))) => return None,
        Err(_) => {
            answer::text(StatusCode::REQUEST_TIMEOUT, "moat: request head took too long (limits.request_head_timeout)")
        }
        Ok(Err(HeadError::TooLarge(n))) => answer::text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("moat: request head larger than {n} bytes (limits.request_head_bytes)"),
        ),
        Ok(Err(HeadError::Bad(why))) => answer::text(StatusCode::BAD_REQUEST, format!("moat: bad request: {why}")),
    };
    let _ = reply_and_close(&mut writer, refusal).await;
    None
}

/// One request and its answer: the body is pumped from the client while [`respond`] decides
/// and answers (a handler may stream the request body into its response, or an upstream may
/// answer before reading it all), then the answer is written.
async fn exchange<R, W>(
    worker: &Worker,
    class: ClassId,
    head: RequestHead,
    reader: &mut ConnReader<R>,
    writer: &mut BufWriter<W>,
    tunnel: Option<&Pinned>,
    limits: &Limits,
) -> After
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let version = head.version;
    let client_upgrade = crate::headers::is_upgrade(&head.headers);
    let is_head = head.method == http::Method::HEAD;
    let framing = head.framing;
    let client_keep_alive = head.keep_alive;

    let send_continue =
        framing != Framing::None && version == http::Version::HTTP_11 && expects_continue(&head.headers);
    if send_continue
        && (writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() || writer.flush().await.is_err())
    {
        return After::Gone;
    }
    let (tx, request_body) = match framing {
        Framing::None => (None, body::empty()),
        Framing::Length(n) => {
            let (tx, b) = ChannelBody::new(Some(n));
            (Some(tx), body::boxed(b))
        }
        Framing::Chunked => {
            let (tx, b) = ChannelBody::new(None);
            (Some(tx), body::boxed(b))
        }
    };

    let body_before = reader.body_bytes();
    // The client side of the connection while the request is handled and answered: the body
    // is fed from it *also* while the response is written; then, once the request has waited
    // a heartbeat or two, it watches for the client closing the connection. Boxed per
    // request, so that it can outlive the handling phase and be dropped before the reader is
    // used again.
    let pumped = RefCell::new(Pumped { complete: tx.is_none(), error: None });
    let mut client = Box::pin(client_side(reader, tx.map(|tx| (framing, tx)), &pumped, worker, limits));
    let mut log = new_log(worker, class, &head.method, tunnel);
    // Boxed per request: the handling state (handler call, upstream send) is several KiB, and
    // inline it would be held by every idle keep-alive connection's task.
    let handling = Box::pin(respond(worker, class, head, request_body, tunnel, &mut log));
    let answered = tokio::select! {
        biased;
        response = handling => Some(response),
        () = &mut client => None,
    };
    let Some(mut response) = answered else {
        // Nobody is left to answer: dropping the handling cancels its handler and upstream
        // request (an upstream still working on it sees its connection close).
        drop(client);
        log.status = CLIENT_CLOSED;
        log.add_failure("request", &"the client closed the connection before the answer");
        log.duration = started.elapsed();
        log.bytes_up = reader.body_bytes() - body_before;
        log.emit();
        log.record(&worker.shared.metrics);
        return After::Gone;
    };
    // How the body went so far; a pump still running now leaves `complete` false.
    let Pumped { complete: body_complete, error: body_error } = pumped.replace(Pumped { complete: false, error: None });
    if let Some(e) = &body_error {
        // A malformed or cut-off body is the client's error, whatever the handler or the
        // upstream made of the failed stream (SPEC 8.6: 400 and the connection closed).
        let status = if matches!(e, BodyError::Stalled(_) | BodyError::TooSlow(_)) {
            StatusCode::REQUEST_TIMEOUT
        } else {
            StatusCode::BAD_REQUEST
        };
        response = answer::text(status, format!("moat: {e}"));
        log.status = status.as_u16();
        log.detail = e.to_string();
    }
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS && client_upgrade && body_complete {
        drop(client);
        return After::Upgrade(Box::new(Upgrading { response, log, started }));
    }
    // Whether the body will have been read to its end is not known yet when it is still being
    // pumped: such a response closes the connection.
    let keep_alive = client_keep_alive
        && body_complete
        && body_error.is_none()
        && !answer::closes_connection(&response)
        && !worker.draining();
    let options = WriteOptions { version, head_request: is_head, keep_alive, stall: limits.body_idle_timeout };
    // A client that closes its side now may still read the answer (a half-close): keep
    // writing; a write to a client that is gone fails by itself.
    let mut client_closed = false;
    let written = {
        let mut writing = pin!(write_response(writer, response, options));
        loop {
            tokio::select! {
                biased;
                written = &mut writing => break written,
                () = &mut client, if !client_closed => client_closed = true,
            }
        }
    };
    // Whatever is left of a body nobody reads is not read: the connection closes.
    drop(client);
    log.duration = started.elapsed();
    log.bytes_down = written.bytes;
    let keep = written.outcome.unwrap_or_else(|e| {
        log.add_failure("response", &e);
        false
    }) && !client_closed;
    log.bytes_up = reader.body_bytes() - body_before;
    log.emit();
    log.record(&worker.shared.metrics);
    if keep { After::KeepAlive } else { After::Close }
}

/// How many heartbeats a connection waits for its next request before it gives back its
/// buffers.
const IDLE_RELEASE_BEATS: u64 = 2;

/// Waits for the first bytes of the next request; false on EOF, or when moat shuts down
/// meanwhile. Most arrive soon after the previous answer; a connection still idle after
/// [`IDLE_RELEASE_BEATS`] heartbeats gives back its read and write buffers (16 KiB, most of
/// what an idle keep-alive connection holds) and gets new ones with the next request.
async fn next_request<R, W>(
    worker: &Worker,
    reader: &mut ConnReader<R>,
    writer: BufWriter<W>,
) -> (std::io::Result<bool>, BufWriter<W>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::select! {
        biased;
        ready = reader.wait_for_data() => return (ready, writer),
        () = worker.ticks.after(IDLE_RELEASE_BEATS) => {}
    }
    // Not watched before: connections busy a moment ago close within a heartbeat or two of
    // a shutdown anyway, and the watch would cost every request a registration.
    if worker.draining() {
        return (Ok(false), writer);
    }
    if !writer.buffer().is_empty() {
        // Not expected (every answer is flushed), but unsent bytes must not be dropped.
        return (reader.wait_for_data().await, writer);
    }
    reader.release_buffer();
    let unbuffered = writer.into_inner();
    let ready = tokio::select! {
        ready = reader.wait_for_data() => ready,
        () = worker.drain_started() => Ok(false),
    };
    (ready, BufWriter::with_capacity(super::WRITE_BUFFER, unbuffered))
}

/// The access-log status of a request whose client closed the connection before the
/// answer (nothing was sent; nginx's convention).
pub const CLIENT_CLOSED: u16 = 499;

/// How many heartbeats a request waits before its connection is watched for the client
/// closing it: a watch costs a read on the connection, which most requests, answered within
/// a second, never need.
const CLIENT_WATCH_BEATS: u64 = 2;

/// How pumping a request body went.
struct Pumped {
    /// Read to its end: the connection can carry another request.
    complete: bool,
    error: Option<BodyError>,
}

/// The client side of a request: pumps its body (if any) into `tx`, recording how that went
/// in `pumped`; then, once the request has waited [`CLIENT_WATCH_BEATS`] heartbeats,
/// completes when the client closes the connection. Pends for ever otherwise.
async fn client_side<R: AsyncRead + Unpin>(
    reader: &mut ConnReader<R>,
    body: Option<(Framing, tokio::sync::mpsc::Sender<Result<bytes::Bytes, body::BoxError>>)>,
    pumped: &RefCell<Pumped>,
    worker: &Worker,
    limits: &Limits,
) {
    if let Some((framing, tx)) = body {
        let complete = match reader.pump_body(framing, tx, super::h1::Pace::of(limits)).await {
            Ok(complete) => complete,
            Err(e) => {
                pumped.borrow_mut().error = Some(e);
                false
            }
        };
        pumped.borrow_mut().complete = complete;
        if !complete {
            // The rest of the connection is unread: it closes after this request anyway.
            return std::future::pending().await;
        }
    }
    worker.ticks.after(CLIENT_WATCH_BEATS).await;
    reader.closed().await
}

/// Writes a `101 Switching Protocols` and bridges the client with the upgraded upstream.
async fn relay_upgrade<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut response: http::Response<crate::body::Body>,
    reader: ConnReader<R>,
    mut writer: BufWriter<W>,
    log: &mut LogLine,
    started: Instant,
) {
    let on_upgrade = hyper::upgrade::on(&mut response);
    let mut head = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
    for (name, value) in response.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    if writer.write_all(&head).await.is_err() || writer.flush().await.is_err() {
        return;
    }
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            log.add_failure("upgrade", &e);
            return;
        }
    };
    let (rd, early) = reader.into_parts();
    let mut upstream = hyper_util::rt::TokioIo::new(upgraded);
    if !early.is_empty() && upstream.write_all(&early).await.is_err() {
        return;
    }
    let (up, down) = splice(rd, writer.into_inner(), upstream).await;
    log.bytes_up += up + early.len() as u64;
    log.bytes_down += down;
    log.duration = started.elapsed();
}

/// Copies both directions between a client (as read and write halves) and an upstream
/// stream until both ends have finished; each side's end is passed on as a shutdown.
/// Returns (bytes up, bytes down).
pub async fn splice<R, W, U>(mut client_rd: R, mut client_wr: W, upstream: U) -> (u64, u64)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let up = pin!(async {
        let r = tokio::io::copy(&mut client_rd, &mut up_wr).await;
        let _ = up_wr.shutdown().await;
        r
    });
    let down = pin!(async {
        let r = tokio::io::copy(&mut up_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
        r
    });
    let (mut up, mut down) = (up, down);
    let (mut sent, mut received) = (None, None);
    // Both directions run until each ends; an error on either (a reset) ends the whole splice.
    while sent.is_none() || received.is_none() {
        tokio::select! {
            r = &mut up, if sent.is_none() => match r {
                Ok(n) => sent = Some(n),
                Err(_) => break,
            },
            r = &mut down, if received.is_none() => match r {
                Ok(n) => received = Some(n),
                Err(_) => break,
            },
        }
    }
    (sent.unwrap_or(0), received.unwrap_or(0))
}

fn expects_continue(h: &http::HeaderMap) -> bool {
    h.get(http::header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

async fn reply_and_close<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    resp: http::Response<crate::body::Body>,
) -> Result<(), crate::body::BoxError> {
    write_response(w, resp, WriteOptions::closing()).await.outcome?;
    w.shutdown().await?;
    Ok(())
}
