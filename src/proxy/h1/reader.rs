//! The read side of a client connection: request heads as they arrive (bounded in size and
//! time by the caller) and request bodies, pumped to their reader at a checked pace.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::head::{Framing, HeadError, RequestHead, find_head_end, parse_chunk_size, parse_head};

use crate::body::BoxError;

/// Longest chunk-size line (size + extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;

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
