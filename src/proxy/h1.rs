//! A strict HTTP/1.1 server codec for the client side of the proxy (RFC 9112).
//!
//! moat parses client requests itself rather than through hyper's server because the proxy
//! must refuse every ambiguous framing (SPEC 8.6) that a lenient parser accepts: bare LF line
//! ends, Content-Length together with Transfer-Encoding, obfuscated Transfer-Encoding, NUL or
//! control bytes, obs-fold. The upstream side uses hyper's client.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::body::{Body, BoxError};

/// Most headers a request may carry; more is treated like an oversized head (431).
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size + extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    /// The request-target exactly as sent (absolute-form, authority-form, origin-form or `*`).
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the client allows another request on this connection.
    pub keep_alive: bool,
}

/// How the request body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Why no request head could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The client closed the connection between requests: not an error.
    #[error("connection closed")]
    Closed,
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("bad request: {0}")]
    Bad(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The read side of a client connection with its buffer; owns bytes read ahead.
pub struct ConnReader<R> {
    io: R,
    buf: BytesMut,
    /// Request-body bytes read so far (for the access log's bytes up).
    body_bytes: u64,
    /// How fast the body being pumped must arrive, while one is.
    body_pace: Option<Pumping>,
}

/// The bounds on how a request body arrives: never silent for longer than `stall`
/// (`limits.body_idle_timeout`), and after `grace` at least `min_rate` bytes a second on
/// average since its start (`limits.request_body_min_rate`, `request_body_rate_grace`), so
/// that a body trickled a byte at a time cannot hold a connection and its upstream for ever.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub stall: Duration,
    /// Bytes per second; 0: no floor.
    pub min_rate: u64,
    pub grace: Duration,
}

impl Pace {
    /// From the instance's limits.
    pub fn of(limits: &crate::config::Limits) -> Self {
        Self {
            stall: limits.body_idle_timeout,
            min_rate: limits.request_body_min_rate as u64,
            grace: limits.request_body_rate_grace,
        }
    }

    /// When a body that started at `started` and has `received` bytes falls below the floor.
    fn deadline(&self, started: tokio::time::Instant, received: u64) -> Option<tokio::time::Instant> {
        if self.min_rate == 0 {
            return None;
        }
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate as f64);
        Some(started + self.grace + earned)
    }
}

/// A body being pumped: its pace and where it started.
#[derive(Clone, Copy, Debug)]
struct Pumping {
    pace: Pace,
    started: tokio::time::Instant,
    /// [`ConnReader::body_bytes`] when it started.
    bytes_before: u64,
}

/// The read buffer a connection gets with its first bytes (a request head usually fits).
const READ_BUFFER: usize = 8 * 1024;

/// Most bytes of a new request read without a buffer of the connection's own (see
/// [`ConnReader::wait_for_data`]); the rest follows into the buffer made for them.
const FIRST_READ: usize = 4 * 1024;

impl<R: AsyncRead + Unpin> ConnReader<R> {
    /// A reader without a buffer yet: one is made when the first bytes arrive, so a connection
    /// that never sends anything holds none.
    pub fn new(io: R) -> Self {
        Self { io, buf: BytesMut::new(), body_bytes: 0, body_pace: None }
    }

    /// A reader over `io` that starts with bytes already read from it.
    pub fn from_parts(io: R, buf: BytesMut) -> Self {
        Self { io, buf, body_bytes: 0, body_pace: None }
    }

    /// Request-body bytes read from this connection so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// The stream and the bytes already read from it but not consumed (a tunnel's first bytes).
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.io, self.buf)
    }

    /// Waits for the first byte of the next request (for the idle timeout). False on EOF.
    /// Cancel-safe: bytes are taken from the connection only in the poll that returns them.
    pub async fn wait_for_data(&mut self) -> std::io::Result<bool> {
        if !self.buf.is_empty() {
            return Ok(true);
        }
        if self.buf.capacity() > 0 {
            return Ok(self.io.read_buf(&mut self.buf).await? > 0);
        }
        // No buffer (a new connection, or an idle one that gave it back): read into the
        // stack, which is not part of the waiting task, and make the buffer for what came.
        std::future::poll_fn(|cx| {
            let mut first = [0u8; FIRST_READ];
            let mut read = tokio::io::ReadBuf::new(&mut first);
            std::task::ready!(std::pin::Pin::new(&mut self.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return std::task::Poll::Ready(Ok(false));
            }
            // Made with its full capacity (not grown from empty): `BytesMut` remembers it as
            // the size of every buffer it allocates later, e.g. while a body streams through.
            self.buf = BytesMut::with_capacity(READ_BUFFER.max(read.filled().len()));
            self.buf.extend_from_slice(read.filled());
            std::task::Poll::Ready(Ok(true))
        })
        .await
    }

    /// Gives back the read buffer if it holds nothing (a connection going idle); the next
    /// [`Self::wait_for_data`] makes a new one when bytes arrive.
    pub fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Completes when the client closes its side of the connection (or it fails). Bytes that
    /// arrive instead (a pipelined request) stay buffered for the next request, and then this
    /// pends for ever: whether the client is still there cannot be told without reading on.
    pub async fn closed(&mut self) {
        if self.buf.is_empty() && matches!(self.io.read_buf(&mut self.buf).await, Ok(0) | Err(_)) {
            return;
        }
        std::future::pending().await
    }

    /// Reads and parses one request head of at most `limit` bytes.
    pub async fn read_head(&mut self, limit: usize) -> Result<RequestHead, HeadError> {
        let mut scanned = 0;
        loop {
            // RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a request.
            while self.buf.starts_with(b"\r\n") {
                self.buf.advance(2);
                scanned = 0;
            }
            if let Some(end) = find_head_end(&self.buf, &mut scanned)? {
                if end > limit {
                    return Err(HeadError::TooLarge(limit));
                }
                let head = self.buf.split_to(end).freeze();
                return parse_head(&head);
            }
            if self.buf.len() > limit {
                return Err(HeadError::TooLarge(limit));
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    HeadError::Closed
                } else {
                    HeadError::Bad("incomplete request head")
                });
            }
        }
    }

    /// Feeds the request body into `tx` until it ends. Returns `Ok(true)` when the body was
    /// read to its end (the connection can carry another request), `Ok(false)` when the
    /// receiver went away first (the rest is unread, so the connection must close).
    /// A body that does not keep `pace` fails with [`BodyError::Stalled`] or
    /// [`BodyError::TooSlow`].
    pub async fn pump_body(
        &mut self,
        framing: Framing,
        tx: mpsc::Sender<Result<Bytes, BoxError>>,
        pace: Pace,
    ) -> Result<bool, BodyError> {
        self.body_pace = Some(Pumping { pace, started: tokio::time::Instant::now(), bytes_before: self.body_bytes });
        let pumped = self.pump_framed(framing, &tx).await;
        self.body_pace = None;
        if let Err(e) = &pumped {
            // The reader must see a failed stream, never a clean end: a truncated or malformed
            // body would otherwise reach a handler, or go upstream, as a complete shorter one.
            let _ = tx.send(Err(e.to_string().into())).await;
        }
        pumped
    }

    async fn pump_framed(
        &mut self,
        framing: Framing,
        tx: &mpsc::Sender<Result<Bytes, BoxError>>,
    ) -> Result<bool, BodyError> {
        match framing {
            Framing::None => Ok(true),
            Framing::Length(mut left) => {
                while left > 0 {
                    let data = self.next_bytes(left).await?;
                    left -= data.len() as u64;
                    if !self.pass_on(tx, data).await {
                        return Ok(left == 0);
                    }
                }
                Ok(true)
            }
            Framing::Chunked => self.pump_chunked(tx).await,
        }
    }

    async fn pump_chunked(&mut self, tx: &mpsc::Sender<Result<Bytes, BoxError>>) -> Result<bool, BodyError> {
        loop {
            let line = self.read_line(MAX_CHUNK_LINE).await?;
            let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = parse_chunk_size(size_text).ok_or(BodyError::Bad("invalid chunk size"))?;
            if size == 0 {
                // Trailers: read and drop up to the empty line (never forwarded).
                let mut total = 0;
                loop {
                    let t = self.read_line(MAX_CHUNK_LINE).await?;
                    total += t.len();
                    if t.is_empty() {
                        return Ok(true);
                    }
                    if total > 64 * 1024 {
                        return Err(BodyError::Bad("chunked trailers too large"));
                    }
                }
            }
            let mut left = size;
            while left > 0 {
                let data = self.next_bytes(left).await?;
                left -= data.len() as u64;
                if !self.pass_on(tx, data).await {
                    return Ok(false);
                }
            }
            if !self.read_line(0).await?.is_empty() {
                return Err(BodyError::Bad("chunk data longer than its size"));
            }
        }
    }

    /// Hands body bytes to the reader of the body; false when it went away. Time spent
    /// waiting for the reader (a slow upstream or handler) is not the client's: it does not
    /// count against the body's minimum rate.
    async fn pass_on(&mut self, tx: &mpsc::Sender<Result<Bytes, BoxError>>, data: Bytes) -> bool {
        let waited = tokio::time::Instant::now();
        let sent = tx.send(Ok(data)).await.is_ok();
        if let Some(p) = &mut self.body_pace {
            p.started += waited.elapsed();
        }
        sent
    }

    /// Up to `max` body bytes: what is buffered, else one read.
    async fn next_bytes(&mut self, max: u64) -> Result<Bytes, BodyError> {
        if self.buf.is_empty() && self.read_body_bytes().await? == 0 {
            return Err(BodyError::Truncated);
        }
        let n = self.buf.len().min(usize::try_from(max).unwrap_or(usize::MAX));
        self.body_bytes += n as u64;
        Ok(self.buf.split_to(n).freeze())
    }

    /// One read of body bytes into the buffer, bounded by the body's pace.
    async fn read_body_bytes(&mut self) -> Result<usize, BodyError> {
        let Some(p) = self.body_pace else { return Ok(self.io.read_buf(&mut self.buf).await?) };
        let stalled = tokio::time::Instant::now() + p.pace.stall;
        let too_slow = p.pace.deadline(p.started, self.body_bytes - p.bytes_before);
        let until = too_slow.map_or(stalled, |t| t.min(stalled));
        match tokio::time::timeout_at(until, self.io.read_buf(&mut self.buf)).await {
            Ok(read) => Ok(read?),
            Err(_) if too_slow.is_some_and(|t| t < stalled) => Err(BodyError::TooSlow(p.pace.min_rate)),
            Err(_) => Err(BodyError::Stalled(p.pace.stall)),
        }
    }

    /// One CRLF-terminated line (without the CRLF), at most `max` bytes long.
    async fn read_line(&mut self, max: usize) -> Result<Bytes, BodyError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                if i == 0 || self.buf[i - 1] != b'\r' {
                    return Err(BodyError::Bad("bare LF in chunked body"));
                }
                let line = self.buf.split_to(i + 1);
                return Ok(line.freeze().slice(..i - 1));
            }
            if self.buf.len() > max + 2 {
                return Err(BodyError::Bad("chunk line too long"));
            }
            if self.read_body_bytes().await? == 0 {
                return Err(BodyError::Truncated);
            }
        }
    }
}

/// Parses the request head at the start of `buf` without I/O: the head and the bytes it took,
/// `None` when `buf` holds no whole head yet. The same checks as [`ConnReader::read_head`]
/// (for the fuzzer, which drives the parser without a connection).
pub fn parse_request_head(mut buf: &[u8], limit: usize) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut skipped = 0;
    while let Some(rest) = buf.strip_prefix(b"\r\n") {
        buf = rest;
        skipped += 2;
    }
    let mut scanned = 0;
    match find_head_end(buf, &mut scanned)? {
        Some(end) if end > limit => Err(HeadError::TooLarge(limit)),
        Some(end) => Ok(Some((parse_head(&Bytes::copy_from_slice(&buf[..end]))?, skipped + end))),
        None if buf.len() > limit => Err(HeadError::TooLarge(limit)),
        None => Ok(None),
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("client closed the connection in the middle of the body")]
    Truncated,
    #[error("bad request body: {0}")]
    Bad(&'static str),
    #[error("the client sent no body bytes for {0:?} (limits.body_idle_timeout)")]
    Stalled(Duration),
    #[error("the client sent the body slower than {0} bytes/s (limits.request_body_min_rate)")]
    TooSlow(u64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Finds the end of the head (index after the blank line), refusing bare LF on the way.
fn find_head_end(buf: &[u8], scanned: &mut usize) -> Result<Option<usize>, HeadError> {
    let mut i = *scanned;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err(HeadError::Bad("bare LF in request head"));
            }
            if i >= 3 && &buf[i - 3..=i] == b"\r\n\r\n" {
                return Ok(Some(i + 1));
            }
        }
        i += 1;
    }
    *scanned = i;
    Ok(None)
}

/// Parses a complete head. Header values are slices of `head` (no copy per header).
fn parse_head(head: &Bytes) -> Result<RequestHead, HeadError> {
    for (i, &b) in head.iter().enumerate() {
        let control = (b < 0x20 && b != b'\t' && b != b'\r' && b != b'\n') || b == 0x7f;
        if control {
            return Err(HeadError::Bad("control byte in request head"));
        }
        // obs-fold (RFC 9112 §5.2): a header line that starts with white space.
        if b == b'\n' && i + 1 < head.len() && matches!(head[i + 1], b' ' | b'\t') {
            return Err(HeadError::Bad("obsolete line folding"));
        }
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Bad("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge(head.len())),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    }
    let method =
        Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| HeadError::Bad("bad method"))?;
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(HeadError::Bad("unsupported HTTP version")),
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Bad("bad header name"))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice_ref(h.value)).map_err(|_| HeadError::Bad("bad header value"))?;
        headers.append(name, value);
    }
    let framing = framing(&headers, version)?;
    normalize_content_length(&mut headers, framing);
    if headers.get_all(http::header::HOST).iter().count() > 1 {
        return Err(HeadError::Bad("more than one Host header"));
    }
    let keep_alive = wants_keep_alive(&headers, version);
    Ok(RequestHead { method, target: req.path.unwrap_or_default().to_string(), version, headers, framing, keep_alive })
}

/// RFC 9112 §6.3, strictly: Transfer-Encoding must be exactly `chunked` and never beside a
/// Content-Length; several Content-Length values must agree.
fn framing(headers: &HeaderMap, version: Version) -> Result<Framing, HeadError> {
    let te: Vec<&HeaderValue> = headers.get_all(http::header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(http::header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(HeadError::Bad("both Content-Length and Transfer-Encoding"));
        }
        if version == Version::HTTP_10 {
            return Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if te.len() != 1 || !te[0].as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(HeadError::Bad("Transfer-Encoding other than a single \"chunked\""));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for value in cl {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(trim(part)).ok_or(HeadError::Bad("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Bad("differing Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// An accepted Content-Length that is a list (`5, 5`), repeated or zero-padded goes upstream as
/// the one decimal moat framed the body with, so no server can read it another way.
fn normalize_content_length(headers: &mut HeaderMap, framing: Framing) {
    let n = match framing {
        Framing::Length(n) => n,
        Framing::None if headers.contains_key(http::header::CONTENT_LENGTH) => 0,
        _ => return,
    };
    // The value already parsed to `n`: it is canonical when it is plain digits without a
    // leading zero (checked without formatting `n` on every request with a body).
    let canonical = |v: &HeaderValue| {
        let b = v.as_bytes();
        b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b.first() != Some(&b'0'))
    };
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let single_and_canonical = values.next().is_some_and(canonical) && values.next().is_none();
    if !single_and_canonical {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

fn wants_keep_alive(headers: &HeaderMap, version: Version) -> bool {
    let tokens = crate::headers::connection_tokens(headers);
    match version {
        Version::HTTP_10 => tokens.iter().any(|t| t.eq_ignore_ascii_case("keep-alive")),
        _ => !tokens.iter().any(|t| t.eq_ignore_ascii_case("close")),
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t')).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !matches!(c, b' ' | b'\t')).map_or(start, |e| e + 1);
    &b[start..end]
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A chunk size is hex digits and nothing else (RFC 9112 §7.1): white space around it (which
/// the grammar allows only as BWS before a `;` extension) is refused, because parsers that
/// differ on it are a known request-smuggling vector.
fn parse_chunk_size(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 15 || !b.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}

/// How the response body will be framed on the wire.
enum OutFraming {
    Length,
    Chunked,
    /// HTTP/1.0 client and unknown length: the body ends when the connection closes.
    Close,
    NoBody,
}

/// What writing one response did.
pub struct Written {
    /// Body bytes sent to the client, also when the write failed part-way.
    pub bytes: u64,
    /// Whether the connection may carry another request, or why the response failed part-way
    /// (the body stream broke, the client went away); the connection must then be closed.
    pub outcome: Result<bool, BoxError>,
}

/// How one response is written.
#[derive(Clone, Copy)]
pub struct WriteOptions {
    pub version: Version,
    /// The request was HEAD, so no body is sent.
    pub head_request: bool,
    pub keep_alive: bool,
    /// Longest wait for the next body bytes (`limits.body_idle_timeout`): a body that stalls
    /// longer is cut off and the connection closed.
    pub stall: Duration,
}

impl WriteOptions {
    /// A one-off answer on a connection that closes after it.
    pub fn closing() -> Self {
        Self { version: Version::HTTP_11, head_request: false, keep_alive: false, stall: Duration::from_secs(300) }
    }
}

/// Writes one response.
pub async fn write_response<W: AsyncWrite + Unpin>(
    out: &mut W,
    response: http::Response<Body>,
    options: WriteOptions,
) -> Written {
    let mut bytes = 0;
    let outcome = write_response_counted(out, response, options, &mut bytes).await;
    Written { bytes, outcome }
}

async fn write_response_counted<W: AsyncWrite + Unpin>(
    out: &mut W,
    response: http::Response<Body>,
    options: WriteOptions,
    written: &mut u64,
) -> Result<bool, BoxError> {
    let WriteOptions { version, head_request, mut keep_alive, stall } = options;
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let no_body = head_request || status.is_informational() || status == 204 || status == 304;
    let exact = http_body::Body::size_hint(&body).exact();
    let framing = if no_body {
        OutFraming::NoBody
    } else if exact.is_some() {
        OutFraming::Length
    } else if version == Version::HTTP_11 {
        OutFraming::Chunked
    } else {
        keep_alive = false;
        OutFraming::Close
    };

    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(if version == Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(reason_phrase(status).as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        let framing_header = name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING;
        if framing_header && !(head_request && name == http::header::CONTENT_LENGTH) || name == http::header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        OutFraming::Length if !(status == 204 || status.is_informational()) => {
            head.extend_from_slice(format!("content-length: {}\r\n", exact.unwrap_or(0)).as_bytes());
        }
        OutFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    head.extend_from_slice(if keep_alive { b"connection: keep-alive\r\n\r\n" } else { b"connection: close\r\n\r\n" });
    out.write_all(&head).await?;

    if !matches!(framing, OutFraming::NoBody) {
        let mut body = crate::body::StallLimit::new(body, stall, "the response body");
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            // The announced Content-Length is a promise to the client: a body that would run
            // past it (or, below, stop short of it) would desynchronise the connection.
            if exact.is_some_and(|n| *written + data.len() as u64 > n) {
                return Err("response body is longer than its Content-Length".into());
            }
            *written += data.len() as u64;
            if let OutFraming::Chunked = framing {
                out.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
                out.write_all(&data).await?;
                out.write_all(b"\r\n").await?;
            } else {
                out.write_all(&data).await?;
            }
        }
        if let OutFraming::Chunked = framing {
            out.write_all(b"0\r\n\r\n").await?;
        }
        if let OutFraming::Length = framing
            && exact != Some(*written)
        {
            return Err("response body ended before its Content-Length".into());
        }
    }
    out.flush().await?;
    Ok(keep_alive)
}

/// The reason phrase; 520 is moat's (and Cloudflare's) "origin is disallowed" answer.
fn reason_phrase(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        520 => "Origin Disallowed",
        _ => status.canonical_reason().unwrap_or("Unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACE: Pace = Pace { stall: Duration::from_secs(5), min_rate: 0, grace: Duration::from_secs(5) };

    async fn head(raw: &[u8]) -> Result<RequestHead, HeadError> {
        ConnReader::new(raw).read_head(64 * 1024).await
    }

    #[tokio::test]
    async fn accepts_plain_requests() {
        let h = head(b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
        assert_eq!(h.target, "http://a.test/x");
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        let h =
            head(b"POST http://a.test/ HTTP/1.1\r\nContent-Length: 5, 5\r\ncontent-length: 05\r\n\r\n").await.unwrap();
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.headers.get_all("content-length").iter().collect::<Vec<_>>(), ["5"], "forwarded as one value");
        let h = head(b"POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").await.unwrap();
        assert_eq!(h.framing, Framing::Chunked);
    }

    #[tokio::test]
    async fn refuses_ambiguous_framing() {
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            assert!(matches!(head(raw).await, Err(HeadError::Bad(_))), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[tokio::test]
    async fn oversized_head() {
        let raw = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70_000));
        assert!(matches!(head(raw.as_bytes()).await, Err(HeadError::TooLarge(_))));
    }

    #[tokio::test]
    async fn chunked_body() {
        let mut r = ConnReader::new(&b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT"[..]);
        let (tx, mut rx) = mpsc::channel(8);
        assert!(r.pump_body(Framing::Chunked, tx, PACE).await.unwrap());
        let mut got = Vec::new();
        while let Some(Ok(b)) = rx.recv().await {
            got.extend_from_slice(&b);
        }
        assert_eq!(got, b"hello world");
        assert_eq!(&r.buf[..], b"NEXT");
    }

    #[tokio::test]
    async fn chunk_sizes_are_hex_digits_only() {
        for body in [
            &b"\t5\r\nhello\r\n0\r\n\r\n"[..],
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5 ;x\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
        ] {
            let mut r = ConnReader::new(body);
            let (tx, _rx) = mpsc::channel(8);
            let got = r.pump_body(Framing::Chunked, tx, PACE).await;
            assert!(matches!(got, Err(BodyError::Bad(_))), "{:?}", String::from_utf8_lossy(body));
        }
    }
}
