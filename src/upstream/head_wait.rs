//! The bound on waiting for an upstream's response head (`limits.response_head_timeout`).
//!
//! The clock starts when the request has gone out, not when it was sent: an upload of a large
//! body keeps moving the start, so only an upstream that stays silent after the last request
//! bytes is cut off. Without this bound an upstream that never answers would hold the request
//! task, its upstream connection and (HTTP/1.1) the client connection for ever.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use crate::body::{Body, BoxError};

/// When a request body last yielded a frame (or ended), as time since `start`.
#[derive(Clone)]
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

/// The response heads a worker is waiting for, checked by the worker's heartbeat (once a
/// second) instead of a timer per request: a tokio timer armed and cancelled for every
/// request cost 2–5 % of moat's CPU per request, for a bound of minutes.
#[derive(Default)]
pub struct HeadWatch {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
}

#[derive(Default)]
struct Slot {
    /// The start of the request and its body's progress; `None` when the slot is free.
    clock: Option<UploadClock>,
    waker: Option<Waker>,
    expired: bool,
}

impl HeadWatch {
    /// Runs `send` (which resolves with the response head) until it finishes or nothing has
    /// moved for `limit` (no response head, no request body frame), checked at each
    /// [`HeadWatch::expire`]. `None` when cut off.
    pub async fn within<F: Future>(&self, send: F, upload: &UploadClock) -> Option<F::Output> {
        let mut send = pin!(send);
        let mut registered: Option<Registered<'_>> = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = send.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            let reg = registered.get_or_insert_with(|| self.register(upload.clone()));
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[reg.index];
            if slot.expired {
                return Poll::Ready(None);
            }
            match &slot.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => slot.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// Marks every wait that has seen nothing for `limit` as expired and wakes it.
    pub fn expire(&self, limit: Duration) {
        let now = Instant::now();
        for slot in self.slots.borrow_mut().iter_mut() {
            if let Some(clock) = &slot.clock
                && !slot.expired
                && clock.last() + limit <= now
            {
                slot.expired = true;
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }

    fn register(&self, clock: UploadClock) -> Registered<'_> {
        let slot = Slot { clock: Some(clock), waker: None, expired: false };
        let mut slots = self.slots.borrow_mut();
        let index = match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i] = slot;
                i
            }
            None => {
                slots.push(slot);
                slots.len() - 1
            }
        };
        Registered { watch: self, index }
    }
}

/// A wait's slot, freed when the wait ends or is dropped.
struct Registered<'a> {
    watch: &'a HeadWatch,
    index: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.watch.slots.borrow_mut()[self.index] = Slot::default();
        self.watch.free.borrow_mut().push(self.index);
    }
}
