//! Runtime glue for hyper on moat's worker threads, and the worker's coarse clock.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Spawns hyper's background tasks (HTTP/2 streams and connections) on the worker's
/// `LocalSet`: bodies and handlers touch Lua state and are not `Send`.
#[derive(Clone, Copy)]
pub struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// How often a worker's heartbeat runs (see `proxy::worker`): the resolution of [`Ticks`].
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A coarse clock of the worker's heartbeats (one a second, see `proxy::worker`) with cheap
/// waits on it. Registering a wait takes a slot in a vector instead of a timer in tokio's
/// wheel, so every request can afford one for a bound of seconds or minutes; the price is a
/// resolution of one heartbeat.
#[derive(Default)]
pub struct Ticks {
    now: Cell<u64>,
    slots: RefCell<Vec<TickSlot>>,
    free: RefCell<Vec<usize>>,
}

#[derive(Default)]
struct TickSlot {
    due: u64,
    waker: Option<Waker>,
}

impl Ticks {
    /// One heartbeat: advances the clock and wakes the waits that are due.
    pub fn advance(&self) {
        let now = self.now.get() + 1;
        self.now.set(now);
        // Woken after the slots are released: a waker is free to poll (and so to touch the
        // slots) before it returns.
        let due: Vec<Waker> =
            self.slots.borrow_mut().iter_mut().filter(|s| s.due <= now).filter_map(|s| s.waker.take()).collect();
        for w in due {
            w.wake();
        }
    }

    /// Completes at the `beats`-th heartbeat after its first poll: between `beats - 1` and
    /// `beats` heartbeat periods later.
    pub fn after(&self, beats: u64) -> TickWait<'_> {
        TickWait { ticks: self, beats, slot: None }
    }

    /// How many heartbeats make sure that at least `d` has passed.
    pub fn beats_covering(d: Duration, period: Duration) -> u64 {
        (d.as_nanos().div_ceil(period.as_nanos().max(1)) as u64).saturating_add(1)
    }
}

/// A wait for a heartbeat; see [`Ticks::after`].
pub struct TickWait<'a> {
    ticks: &'a Ticks,
    beats: u64,
    /// The slot and the beat it is due at, once polled.
    slot: Option<(usize, u64)>,
}

impl Future for TickWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let ticks = self.ticks;
        let now = ticks.now.get();
        match self.slot {
            Some((_, due)) if due <= now => Poll::Ready(()),
            Some((index, _)) => {
                let mut slots = ticks.slots.borrow_mut();
                match &slots[index].waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slots[index].waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            None => {
                let due = now + self.beats.max(1);
                let slot = TickSlot { due, waker: Some(cx.waker().clone()) };
                let mut slots = ticks.slots.borrow_mut();
                let index = match ticks.free.borrow_mut().pop() {
                    Some(i) => {
                        slots[i] = slot;
                        i
                    }
                    None => {
                        slots.push(slot);
                        slots.len() - 1
                    }
                };
                self.slot = Some((index, due));
                Poll::Pending
            }
        }
    }
}

impl Drop for TickWait<'_> {
    fn drop(&mut self) {
        if let Some((index, _)) = self.slot {
            self.ticks.slots.borrow_mut()[index] = TickSlot { due: u64::MAX, waker: None };
            self.ticks.free.borrow_mut().push(index);
        }
    }
}

/// Keeps an accept loop alive through failed accepts. Out of file descriptors or memory,
/// every `accept` fails until something closes; a connection reset before it was accepted
/// fails just one. Neither may end the loop (a listener that stops accepting is down until
/// restart), and neither may spin it or flood the log: while the machine is short of
/// something the loop pauses between tries, and it warns at most once a minute (a container
/// that keeps the limit reached makes the loop flap between failing and accepting).
#[derive(Default)]
pub struct AcceptErrors {
    /// When the last warning was logged, failures since then, and whether the current run of
    /// failures has been warned about (then its end is logged too).
    warned_at: Option<std::time::Instant>,
    unreported: u64,
    run_warned: bool,
}

impl AcceptErrors {
    /// How long a loop waits before it tries again when a resource is exhausted.
    const PAUSE: Duration = Duration::from_millis(50);
    const WARN_EVERY: Duration = Duration::from_secs(60);

    /// After a failed accept on `listener`: logs, and pauses if the failure is the machine's
    /// rather than one connection's.
    pub async fn failed(&mut self, listener: &(dyn std::fmt::Display + Sync), e: &std::io::Error) {
        if !exhausted(e) {
            tracing::debug!("accept on {listener}: {e}");
            return;
        }
        self.unreported += 1;
        if self.warned_at.is_none_or(|t| t.elapsed() >= Self::WARN_EVERY) {
            let count = match self.unreported {
                1 => String::new(),
                n => format!(" ({n} failed accepts since the last warning)"),
            };
            tracing::warn!("accept on {listener}: {e}{count}; new connections wait until some close");
            self.warned_at = Some(std::time::Instant::now());
            self.unreported = 0;
            self.run_warned = true;
        }
        tokio::time::sleep(Self::PAUSE).await;
    }

    /// After a successful accept: ends a run of failures.
    pub fn accepted(&mut self, listener: &dyn std::fmt::Display) {
        if self.run_warned {
            self.run_warned = false;
            tracing::info!("accept on {listener}: accepting again");
        }
    }
}

/// Whether an accept failed for want of descriptors or memory (it will fail again at once).
fn exhausted(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    let short = [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM].map(|e| e.raw_os_error());
    e.raw_os_error().is_some_and(|code| short.contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_completes_at_its_heartbeat_and_frees_its_slot() {
        let ticks = Ticks::default();
        let mut first = Box::pin(ticks.after(2));
        let mut never = Box::pin(ticks.after(5));
        let poll = |f: &mut Pin<Box<TickWait<'_>>>| {
            f.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop())).is_ready()
        };
        assert!(!poll(&mut first) && !poll(&mut never));
        ticks.advance();
        assert!(!poll(&mut first));
        ticks.advance();
        assert!(poll(&mut first));
        drop(first);
        drop(never);
        assert_eq!(ticks.free.borrow().len(), 2, "both slots back for reuse");
        // A reused slot does not fire for the wait that held it before.
        let mut next = Box::pin(ticks.after(1));
        assert!(!poll(&mut next));
        ticks.advance();
        assert!(poll(&mut next));
        assert_eq!(Ticks::beats_covering(Duration::from_millis(300), Duration::from_secs(1)), 2);
        assert_eq!(Ticks::beats_covering(Duration::from_secs(2), Duration::from_secs(1)), 3);
    }
}
