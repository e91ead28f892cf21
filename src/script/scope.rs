//! The request a Lua state is running for right now, and its CPU budget.
//!
//! A worker thread runs one Lua state and polls many handler coroutines. Lua code only ever
//! runs inside a poll, so "the request being polled" is exact: [`Scoped`] installs it around
//! each poll, and the instruction hook and `console` read it. CPU is the time spent inside
//! polls, not wall time, so a handler waiting on `fetch` uses none.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::api::body::{BodySlot, SharedBody};

/// One handler call (or one script load).
pub struct Scope {
    pub request_id: String,
    pub container_id: String,
    pub class: std::sync::Arc<str>,
    /// CPU allowed to this call.
    budget: Duration,
    /// CPU used by finished polls.
    used: Cell<Duration>,
    /// Start of the poll in progress.
    poll_start: Cell<Option<Instant>>,
    /// Set once the budget is exceeded; the call fails even if Lua caught the error.
    exceeded: Cell<bool>,
    /// Hook calls since the budget was exceeded (alternates error and yield).
    strikes: Cell<u32>,
    /// Streamed bodies (from the client, an upstream, a bucket) this call's objects hold.
    streams: RefCell<Vec<Weak<RefCell<BodySlot>>>>,
}

impl Scope {
    pub fn new(request_id: String, container_id: String, class: std::sync::Arc<str>, budget: Duration) -> Rc<Self> {
        Rc::new(Self {
            request_id,
            container_id,
            class,
            budget,
            used: Cell::new(Duration::ZERO),
            poll_start: Cell::new(None),
            exceeded: Cell::new(false),
            strikes: Cell::new(0),
            streams: RefCell::new(Vec::new()),
        })
    }

    /// Notes a body that holds a stream, for [`Scope::end`] (others need no closing, and most
    /// requests have no body: no allocation for them).
    pub fn hold_stream(&self, body: &SharedBody) {
        if body.is_stream() {
            self.streams.borrow_mut().push(Rc::downgrade(&body.0));
        }
    }

    /// The call has ended: streams that its objects still hold, neither read nor handed on,
    /// are closed now. Lua frees those objects only when its collector runs (on a quiet proxy
    /// perhaps never), and until then an unread `fetch` answer kept its upstream connection
    /// open and a bucket object its file. As in Workers, a streamed body belongs to the
    /// request that got it.
    pub fn end(&self) {
        for slot in self.streams.take() {
            if let Some(slot) = slot.upgrade() {
                SharedBody(slot).end_stream();
            }
        }
    }

    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    /// Called from the instruction hook: true once this call is over its CPU budget.
    fn over_budget(&self) -> bool {
        let running = self.poll_start.get().map_or(Duration::ZERO, |s| s.elapsed());
        if self.used.get() + running > self.budget {
            self.exceeded.set(true);
        }
        self.exceeded.get()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Scope>>> = const { RefCell::new(None) };
}

/// The scope being polled on this thread, if any.
pub fn current() -> Option<Rc<Scope>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// What the instruction hook does next.
pub enum HookAction {
    Continue,
    /// Raise "CPU budget exceeded" in the running Lua code.
    Raise,
    /// Yield the coroutine so the poll returns and [`Scoped`] ends the call. Needed because
    /// a script can catch the error with `pcall` and loop on; a yield cannot be caught.
    Yield,
}

/// For the instruction hook: should the running Lua code be stopped, and how?
pub fn hook_action() -> HookAction {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(s) if s.over_budget() => {
            let n = s.strikes.get();
            s.strikes.set(n + 1);
            if n % 2 == 0 { HookAction::Raise } else { HookAction::Yield }
        }
        _ => HookAction::Continue,
    })
}

/// Runs `f` with `scope` installed (for synchronous Lua calls such as a script load).
pub fn enter<R>(scope: &Rc<Scope>, f: impl FnOnce() -> R) -> R {
    let prev = CURRENT.with(|c| c.replace(Some(scope.clone())));
    scope.poll_start.set(Some(Instant::now()));
    let out = f();
    settle(scope);
    CURRENT.with(|c| *c.borrow_mut() = prev);
    out
}

fn settle(scope: &Scope) {
    if let Some(start) = scope.poll_start.take() {
        scope.used.set(scope.used.get() + start.elapsed());
    }
}

/// A future that installs its scope around every poll and accounts the time spent. Once the
/// budget is exceeded it completes with an error, whatever the Lua code does.
pub struct Scoped<F> {
    inner: Pin<Box<F>>,
    scope: Rc<Scope>,
}

impl<F: Future> Scoped<F> {
    pub fn new(scope: Rc<Scope>, inner: F) -> Self {
        Self { inner: Box::pin(inner), scope }
    }
}

impl<T, F: Future<Output = mlua::Result<T>>> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let scope = self.scope.clone();
        let prev = CURRENT.with(|c| c.replace(Some(scope.clone())));
        scope.poll_start.set(Some(Instant::now()));
        let out = self.inner.as_mut().poll(cx);
        settle(&scope);
        CURRENT.with(|c| *c.borrow_mut() = prev);
        match out {
            Poll::Pending if scope.exceeded() => Poll::Ready(Err(mlua::Error::runtime("CPU budget exceeded"))),
            other => other,
        }
    }
}
