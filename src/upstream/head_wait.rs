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

/// When a request body last yielded a frame (or ended), as time since the body was tracked.
/// Only a request with a body has one: the common bodiless request reads no clock at all.
#[derive(Default)]
pub struct UploadClock {
    /// The start of the body's clock and its last movement; the body may be polled on the
    /// connection's task, hence the atomic.
    moved: Option<(Instant, Arc<AtomicU64>)>,
}

impl UploadClock {
    /// Wraps `body` so that each of its frames moves the clock. A body that is already at its
    /// end is returned as is (most requests).
    pub fn track(&mut self, body: Body) -> Body {
        if http_body::Body::is_end_stream(&body) {
            return body;
        }
        let (start, moved_us) = (Instant::now(), Arc::new(AtomicU64::new(0)));
        self.moved = Some((start, moved_us.clone()));
        Body::new(Tracked { inner: body, start, moved_us })
    }

    /// When the request body last moved, if there is one.
    fn last(&self) -> Option<Instant> {
        self.moved.as_ref().map(|(start, us)| *start + Duration::from_micros(us.load(Ordering::Relaxed)))
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
    let mut wait = limit;
    loop {
        tokio::select! {
            biased;
            out = &mut send => return Some(out),
            () = ticks.after(Ticks::beats_covering(wait, HEARTBEAT)) => {}
        }
        // At least `wait` has passed: cut off, unless a body moved since.
        wait = (upload.last()? + limit).saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return None;
        }
    }
}
