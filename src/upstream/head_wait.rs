//! The bound on waiting for an upstream's response head (`limits.response_head_timeout`).
//!
//! The clock starts when the request has gone out, not when it was sent: an upload of a large
//! body keeps moving the start, so only an upstream that stays silent after the last request
//! bytes is cut off. Without this bound an upstream that never answers would hold the request
//! task, its upstream connection and (HTTP/1.1) the client connection for ever.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{Body, BoxError};
use crate::rt::{HEARTBEAT, Ticks};

/// When a request body last yielded a frame (or ended), as time since `start`.
pub struct UploadClock {
    start: Instant,
    /// Set only for a request with a body; the body may be polled on the connection's task.
    moved_us: Option<Arc<AtomicU64>>,
}

impl UploadClock {
    pub fn new() -> Self {
        Self { start: Instant::now(), moved_us: None }
    }

    /// Wraps `body` so that each of its frames moves the clock. A body that is already at its
    /// end is returned as is (most requests): the clock then never moves and the wait counts
    /// from the start of the request.
    pub fn track(&mut self, body: Body) -> Body {
        if http_body::Body::is_end_stream(&body) {
            return body;
        }
        let moved = Arc::new(AtomicU64::new(0));
        self.moved_us = Some(moved.clone());
        Body::new(Tracked { inner: body, start: self.start, moved_us: moved })
    }

    /// When the request last moved: its start, or its body's last frame.
    fn last(&self) -> Instant {
        let us = self.moved_us.as_ref().map_or(0, |m| m.load(Ordering::Relaxed));
        self.start + Duration::from_micros(us)
    }
}

struct Tracked {
    inner: Body,
    start: Instant,
    moved_us: Arc<AtomicU64>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Ok(_)))) {
            let us = self.start.elapsed().as_micros().min(u64::MAX as u128) as u64;
            self.moved_us.store(us, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Runs `send` (which resolves with the response head) until it finishes or nothing has
/// moved for `limit`: no response head and no request body frame. Checked on the worker's
/// heartbeats (a timer per request would be armed and cancelled for every request, for a
/// bound of minutes). `None` when cut off.
pub async fn within<F: Future>(send: F, upload: &UploadClock, limit: Duration, ticks: &Ticks) -> Option<F::Output> {
    let mut send = pin!(send);
    loop {
        let left = (upload.last() + limit).saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        tokio::select! {
            biased;
            out = &mut send => return Some(out),
            () = ticks.after(Ticks::beats_covering(left, HEARTBEAT)) => {}
        }
    }
}
