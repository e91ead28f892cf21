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

/// What a handler call's objects hold that must end with the call: a streamed body (see
/// [`Scope::end`]). Implemented where the body lives, so that the scope needs no API type.
pub trait EndsWithCall {
    /// The call has ended: close what is still open.
    fn end(&self);
}

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
    /// The hook yielded because this poll used its time slice: the next poll lets the
    /// worker's other connections run first.
    sliced: Cell<bool>,
    /// Upstream requests (`fetch`, each redirect followed) this call may still make.
    subrequests_left: Cell<u32>,
    /// Streamed bodies (from the client, an upstream, a bucket) this call's objects hold.
    streams: RefCell<Vec<Weak<dyn EndsWithCall>>>,
}

impl Scope {
    pub fn new(
        request_id: String,
        container_id: String,
        class: std::sync::Arc<str>,
        budget: Duration,
        subrequests: u32,
    ) -> Rc<Self> {
        Rc::new(Self {
            request_id,
            container_id,
            class,
            budget,
            used: Cell::new(Duration::ZERO),
            poll_start: Cell::new(None),
            exceeded: Cell::new(false),
            strikes: Cell::new(0),
            sliced: Cell::new(false),
            subrequests_left: Cell::new(subrequests),
            streams: RefCell::new(Vec::new()),
        })
    }

    /// Notes a streamed body, for [`Scope::end`] (the caller passes streams only: others
    /// need no closing, and most requests have no body, so no allocation for them).
    pub fn hold_stream(&self, stream: Weak<dyn EndsWithCall>) {
        self.streams.borrow_mut().push(stream);
    }

    /// The call has ended: streams that its objects still hold, neither read nor handed on,
    /// are closed now. Lua frees those objects only when its collector runs (on a quiet proxy
    /// perhaps never), and until then an unread `fetch` answer kept its upstream connection
    /// open and a bucket object its file. As in Workers, a streamed body belongs to the
    /// request that got it.
    pub fn end(&self) {
        for stream in self.streams.take() {
            if let Some(stream) = stream.upgrade() {
                stream.end();
            }
        }
    }

    /// Takes one upstream request from this call's allowance (`limits.subrequests`); false
    /// when none is left.
    pub fn take_subrequest(&self) -> bool {
        let left = self.subrequests_left.get();
        self.subrequests_left.set(left.saturating_sub(1));
        left > 0
    }

    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    /// Called from the instruction hook: what the running Lua code does next.
    fn next_action(&self) -> HookAction {
        let running = self.poll_start.get().map_or(Duration::ZERO, |s| s.elapsed());
        if self.used.get() + running > self.budget {
            self.exceeded.set(true);
        }
        if self.exceeded.get() {
            let n = self.strikes.get();
            self.strikes.set(n + 1);
            return if n.is_multiple_of(2) { HookAction::Raise } else { HookAction::Yield };
        }
        if running > TIME_SLICE {
            return HookAction::Slice;
        }
        HookAction::Continue
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Scope>>> = const { RefCell::new(None) };
}

/// The scope being polled on this thread, if any.
pub fn current() -> Option<Rc<Scope>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Longest a handler runs Lua in one go before the worker's other connections get their
/// turn. A worker serves many connections on one thread: without a slice, one CPU-bound
/// handler would stall them all for its whole CPU budget (`limits.lua_cpu`).
const TIME_SLICE: Duration = Duration::from_millis(1);

/// What the instruction hook does next.
pub enum HookAction {
    Continue,
    /// Raise "CPU budget exceeded" in the running Lua code.
    Raise,
    /// Yield the coroutine so the poll returns: over budget, so that [`Scoped`] ends the
    /// call (a script can catch the error with `pcall` and loop on; a yield cannot be
    /// caught); or at the end of a time slice, to be resumed after the others had their turn.
    /// Lua 5.4 lets a count hook yield wherever the coroutine may (mlua skips it inside a C
    /// call that cannot yield, e.g. a `table.sort` comparator).
    Yield,
    /// The time slice is used up: yield (see [`slice_ends`]) unless the hook is in code that
    /// must not be cut.
    Slice,
}

/// The hook yields at the end of a time slice: the handler's next poll lets the worker's
/// other connections run first.
pub fn slice_ends() {
    CURRENT.with(|c| {
        if let Some(s) = c.borrow().as_ref() {
            s.sliced.set(true);
        }
    });
}

/// For the instruction hook: should the running Lua code go on, yield, or be stopped?
pub fn hook_action() -> HookAction {
    CURRENT.with(|c| c.borrow().as_ref().map_or(HookAction::Continue, |s| s.next_action()))
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
    /// After a time slice: the turn given to the worker's other connections.
    turn: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

impl<F: Future> Scoped<F> {
    pub fn new(scope: Rc<Scope>, inner: F) -> Self {
        Self { inner: Box::pin(inner), scope, turn: None }
    }
}

impl<T, F: Future<Output = mlua::Result<T>>> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let scope = self.scope.clone();
        if scope.sliced.take() {
            // mlua wakes a coroutine that the hook yielded at once; tokio's `yield_now` defers
            // the next poll until the worker has polled its sockets, so the connections that
            // became ready meanwhile run before this handler's next slice.
            self.turn = Some(Box::pin(tokio::task::yield_now()));
        }
        if let Some(turn) = self.turn.as_mut() {
            if turn.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.turn = None;
        }
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
