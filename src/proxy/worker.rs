//! A worker thread: a current-thread runtime with a `LocalSet`, its own Lua state per class
//! (Envoy's model: Lua states are never shared across threads), its own upstream pool.

use rustc_hash::FxHashMap as HashMap;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use super::state::{ClassId, Shared};
use crate::rt::{HEARTBEAT, Ticks};
use crate::script::ClassRuntime;
use crate::upstream::{Upstream, resolve::Resolver};

/// One worker's state.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub upstream: Rc<Upstream>,
    /// The heartbeat clock (shared with `upstream`).
    pub ticks: Rc<Ticks>,
    runtimes: RefCell<HashMap<ClassId, Rc<ClassRuntime>>>,
    /// Set once moat shuts down; `drain` wakes the connections that wait for their next
    /// request, so that they close.
    draining: std::cell::Cell<bool>,
    drain: tokio::sync::Notify,
}

impl Worker {
    /// The worker of the calling thread: its upstream pool and heartbeat clock, and a Lua
    /// state for every class that has a loaded policy.
    pub fn new(shared: Arc<Shared>) -> Rc<Worker> {
        Self::with_upstream(shared, |upstream| upstream)
    }

    /// A worker whose upstream connections `fixtures` answer (`moat test`).
    pub fn with_fixtures(shared: Arc<Shared>, fixtures: Rc<dyn crate::upstream::fixture::FixtureDialer>) -> Rc<Worker> {
        Self::with_upstream(shared, |upstream| upstream.with_fixtures(fixtures))
    }

    fn with_upstream(shared: Arc<Shared>, adapt: impl FnOnce(Upstream) -> Upstream) -> Rc<Worker> {
        let ticks = Rc::new(Ticks::default());
        let upstream = Rc::new(adapt(Upstream::new(
            Resolver::new(shared.dns_hosts.clone()),
            shared.upstream_tls.clone(),
            &shared.config.limits,
            shared.own_listeners.clone(),
            ticks.clone(),
        )));
        let worker = Rc::new(Worker {
            shared,
            upstream,
            ticks,
            runtimes: RefCell::new(HashMap::default()),
            draining: Default::default(),
            drain: Default::default(),
        });
        for (class, _) in worker.shared.classes() {
            let _ = worker.runtime(class);
        }
        worker
    }

    /// Whether moat is shutting down: answers close their connection.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Completes once moat is shutting down.
    pub async fn drain_started(&self) {
        let notified = self.drain.notified();
        if !self.draining.get() {
            notified.await;
        }
    }

    /// moat is shutting down: requests in flight finish, no connection is kept alive.
    pub fn start_draining(&self) {
        self.draining.set(true);
        self.drain.notify_waiters();
    }

    /// Runs a full Lua collection on each state that ran handlers since its last one and none
    /// during the last heartbeat (every state when `urgent`). The generational collector runs
    /// only when Lua allocates, so without this a worker that goes quiet after a burst keeps
    /// the burst's garbage (and the Rust memory it holds) until its next request.
    fn collect_idle_states(&self, urgent: bool) {
        for rt in self.runtimes.borrow().values() {
            rt.collect_if_idle(urgent);
        }
    }

    /// The runtime for the class's current generation, rebuilt when the generation changed.
    /// `None` when the class has no loaded generation.
    pub fn runtime(&self, class: ClassId) -> Option<Rc<ClassRuntime>> {
        let current = self.shared.class(class).current()?;
        if let Some(rt) = self.runtimes.borrow().get(&class).filter(|rt| Arc::ptr_eq(&rt.generation, &current)) {
            return Some(rt.clone());
        }
        let sink = Rc::new(StoreSink { shared: self.shared.clone(), class });
        match ClassRuntime::build(
            current,
            self.upstream.clone(),
            sink,
            &self.shared.config.limits,
            &self.shared.bindings,
        ) {
            Ok(rt) => {
                let rt = Rc::new(rt);
                self.runtimes.borrow_mut().insert(class, rt.clone());
                Some(rt)
            }
            Err(e) => {
                tracing::error!(class = %self.shared.class(class).config.name, "worker could not build its Lua state: {e}");
                self.runtimes.borrow().get(&class).cloned()
            }
        }
    }
}

/// `moat.container(id)` setters from a handler of class `class`, validated against its current
/// generation and written to the store (a short, durable redb commit on the worker).
struct StoreSink {
    shared: Arc<Shared>,
    class: ClassId,
}

impl crate::script::api::container::OverrideSink for StoreSink {
    fn apply(&self, container: &str, setter: crate::policy::overrides::Setter) -> Result<(), String> {
        let class = self.shared.class(self.class);
        let generation = class.current().ok_or("policy not loaded")?;
        self.shared.overrides.apply(container, setter, &generation).map(|_| ()).map_err(|e| e.to_string())
    }

    fn intercept(
        &self,
        container: &str,
        kind: crate::policy::intercepts::InterceptKind,
        target: Option<&str>,
        handler: crate::policy::overrides::HandlerSpec,
    ) -> Result<(), String> {
        let generation = self.shared.class(self.class).current().ok_or("policy not loaded")?;
        self.shared.overrides.intercept(container, kind, target, handler, &generation).map_err(|e| e.to_string())
    }

    fn lifecycle(&self) -> Option<Arc<dyn crate::lifecycle::Lifecycle>> {
        self.shared.lifecycle.get().cloned()
    }
}

/// Every how many heartbeats idle upstream connections are swept.
const SWEEP_EVERY: u64 = 15;

/// A worker's housekeeping tick (every [`HEARTBEAT`]): advances the worker's [`Ticks`], on
/// which the coarse bounds of requests wait (response head, client gone), sweeps idle
/// upstream connections every [`SWEEP_EVERY`] beats, and keeps a timer due within a heartbeat
/// on this worker at all times.
///
/// Every request arms timers (idle, request head, handler); tokio's timer driver writes its
/// eventfd (a syscall, and an extra wake of the event loop) whenever a new timer is due before
/// the driver's next planned wake, and when no timer was pending at all that is *every* new
/// timer. Under load that was one `write` per five requests. With this heartbeat the planned
/// wake is always at most a second away, so only timers shorter than that (small configured
/// limits) still need the eventfd. Costs one wake per second per worker.
pub async fn heartbeat(worker: Rc<Worker>) {
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1u64.. {
        beat.tick().await;
        worker.ticks.advance();
        let over = worker.shared.memory.measure(worker.shared.config.limits.memory_ceiling);
        worker.collect_idle_states(over);
        if n % SWEEP_EVERY == 0 {
            worker.upstream.sweep_idle();
        }
    }
}
