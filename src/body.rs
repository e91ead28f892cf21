//! The one body type that flows through moat: a boxed, streaming HTTP body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::mpsc;

/// Errors inside a body stream (client went away, upstream reset, limit hit).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body. Worker-local (not `Send`), as everything that touches a Lua state is.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of known bytes.
pub fn full(data: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(data.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body fed through a channel by the task that reads the client connection.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    /// Bytes still expected when the length is known (Content-Length framing).
    remaining: Option<u64>,
}

impl ChannelBody {
    /// A body and the sender that feeds it; `length` is the Content-Length if known.
    pub fn new(length: Option<u64>) -> (mpsc::Sender<Result<Bytes, BoxError>>, Self) {
        let (tx, rx) = mpsc::channel(4);
        (tx, Self { rx, remaining: length })
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => match self.remaining {
                // The feeder stopped short of the Content-Length: never a clean end.
                Some(left) if left > 0 => {
                    self.remaining = Some(0);
                    Poll::Ready(Some(Err(format!("request body ended {left} bytes before its Content-Length").into())))
                }
                _ => Poll::Ready(None),
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == Some(0)
    }
}

/// Reads a whole body into memory, refusing more than `limit` bytes.
pub async fn collect_limited(mut body: Body, limit: usize) -> Result<Bytes, CollectError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Stream(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(CollectError::TooLarge(limit));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Why a body could not be read into memory.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("body is larger than the body_buffer limit ({0} bytes); stream it with .body instead")]
    TooLarge(usize),
    #[error("body stream failed: {0}")]
    Stream(String),
}

/// Fails a body that keeps its reader waiting for `limit` (`limits.body_idle_timeout`). Only time
/// spent waiting on the body counts, not time the reader took before asking again.
pub struct StallLimit<B> {
    inner: B,
    limit: Duration,
    /// Set when the limit fired, for a caller that answers differently then (HTTP/2: 408).
    fired: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Armed when a poll finds no data, disarmed by the next frame; made on first need, so
    /// a body that is always ready (most small responses) never touches the timer wheel.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    /// Who went quiet, for the error ("the client", "the response body").
    who: &'static str,
}

impl<B> StallLimit<B> {
    pub fn new(inner: B, limit: Duration, who: &'static str) -> Self {
        Self { inner, limit, fired: None, timer: None, waiting: false, who }
    }

    /// Also sets `flag` when the limit fires.
    pub fn flag_on_stall(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.fired = Some(flag);
        self
    }
}

impl<B> http_body::Body for StallLimit<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.limit;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.waiting {
                    this.waiting = true;
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        if let Some(flag) = &this.fired {
                            flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        let (who, limit) = (this.who, this.limit);
                        Poll::Ready(Some(Err(
                            format!("{who} sent nothing for {limit:?} (limits.body_idle_timeout)").into()
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Most bytes of an unread request body [`DrainOnDrop`] reads and discards.
const DRAIN_LIMIT: usize = 256 * 1024;
/// Longest [`DrainOnDrop`] waits for them.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// An HTTP/2 request body that, dropped before its end (a handler answered without reading
/// it), reads and discards what the client is still sending, up to [`DRAIN_LIMIT`] bytes and
/// [`DRAIN_TIME`], on the current `LocalSet`. HTTP/2 then ends the stream with the client's
/// own END_STREAM instead of an RST_STREAM in the middle of its upload, which clients such as
/// curl report as an error even after a complete response. A larger upload is still reset
/// (with NO_ERROR, after the response) once the limit is reached.
pub struct DrainOnDrop<B: http_body::Body + Unpin + 'static>(Option<B>);

impl<B: http_body::Body + Unpin + 'static> DrainOnDrop<B> {
    pub fn new(inner: B) -> Self {
        Self(Some(inner))
    }
}

impl<B: http_body::Body + Unpin + 'static> http_body::Body for DrainOnDrop<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.0.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0.as_ref().map(http_body::Body::size_hint).unwrap_or_default()
    }
}

impl<B: http_body::Body + Unpin + 'static> Drop for DrainOnDrop<B> {
    fn drop(&mut self) {
        use bytes::Buf;
        let Some(mut body) = self.0.take().filter(|b| !b.is_end_stream()) else { return };
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                let mut read = 0;
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, |d| d.remaining());
                    if read > DRAIN_LIMIT {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stalled_body_fails_but_a_slow_reader_does_not() {
        let limit = Duration::from_millis(100);
        // Nothing ever arrives: the read fails after the limit, naming who went quiet.
        let (_quiet, body) = ChannelBody::new(None);
        let mut stalled = StallLimit::new(body, limit, "the client");
        let err = stalled.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().starts_with("the client sent nothing for 100ms"), "{err}");
        // Data is always there when asked for, however long the reader pauses between reads.
        let (tx, body) = ChannelBody::new(None);
        tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
        tx.send(Ok(Bytes::from_static(b"b"))).await.unwrap();
        drop(tx);
        let mut slow = StallLimit::new(body, limit, "the client");
        assert!(slow.frame().await.unwrap().is_ok());
        tokio::time::sleep(limit * 3).await;
        assert!(slow.frame().await.unwrap().is_ok());
        assert!(slow.frame().await.is_none());
    }
}
