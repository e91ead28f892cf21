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
