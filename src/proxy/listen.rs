//! The listener layer: binds the proxy's ports, accepts connections and hands each to a
//! worker under `limits.max_connections`, and drains the workers at shutdown. What a
//! connection then carries (requests, CONNECT tunnels) is `conn` and `connect`'s business.
//!
//! Listener kinds: today the explicit proxy listener (HTTP requests and CONNECT), one per
//! class; transparent HTTP, transparent TLS and DNS arrive with the sandbox.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::state::Shared;
use super::worker::{self, ToWorker};

/// What a listener accepts: each kind has its own way into the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// The explicit proxy, one per class: HTTP requests in absolute form, and CONNECT.
    Explicit,
}

/// Binds a class's explicit proxy listener (non-blocking, with a deep accept queue).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    // std listens with a backlog of 128; a burst of new connections (agents starting
    // together) overflows that and each connection over it waits a second for its SYN to
    // be sent again. Listening again only resizes the queue (capped by net.core.somaxconn).
    rustix::net::listen(&l, LISTEN_BACKLOG)?;
    Ok(l)
}

/// Starts the worker threads (`MOAT_WORKERS`, default one per core); connections go to them
/// through the returned senders.
pub fn start_workers(shared: &Arc<Shared>) -> std::io::Result<Vec<tokio::sync::mpsc::UnboundedSender<ToWorker>>> {
    let threads = std::env::var("MOAT_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, 64);
    (0..threads).map(|i| worker::spawn(i, shared.clone())).collect()
}

/// Tells every worker that moat is shutting down: requests in flight finish, no connection
/// is kept alive.
pub fn start_draining(workers: &[tokio::sync::mpsc::UnboundedSender<ToWorker>]) {
    for w in workers {
        let _ = w.send(ToWorker::Drain);
    }
}

/// The accept queue of each proxy listener (nginx's default is 511, Go's somaxconn).
const LISTEN_BACKLOG: i32 = 4096;

/// Accepts in a row before the loop lets the acceptor's other tasks (admin API, signals) run.
const ACCEPTS_PER_TURN: usize = 64;

/// A bound proxy listener: its socket, what it accepts, and the class it serves.
pub struct Listener {
    pub socket: TcpListener,
    pub kind: ListenerKind,
    pub class: usize,
}

/// Accepts connections on `listener` and hands each to the next worker, as long as
/// `admission` has room (else it is refused with a 503).
pub async fn accept_loop(
    listener: Listener,
    workers: Vec<tokio::sync::mpsc::UnboundedSender<ToWorker>>,
    admission: Arc<super::admission::Admission>,
) {
    let Listener { socket: listener, kind, class } = listener;
    let Ok(local) = listener.local_addr() else { return };
    let mut next = 0usize;
    let mut errors = crate::rt::AcceptErrors::default();
    let mut in_a_row = 0;
    loop {
        // Unconstrained: under tokio's cooperative budget, the 128th accept of a burst returned
        // Pending and this loop was polled again only when the acceptor's runtime next woke
        // for something else, up to a second later; meanwhile the accept queue overflowed.
        // Fairness is kept by yielding every ACCEPTS_PER_TURN accepts instead.
        match tokio::task::coop::unconstrained(listener.accept()).await {
            Ok((stream, _peer)) => {
                in_a_row += 1;
                if in_a_row == ACCEPTS_PER_TURN {
                    in_a_row = 0;
                    tokio::task::yield_now().await;
                }
                errors.accepted(&local);
                let Some(slot) = admission.admit() else {
                    admission.refuse(stream, &local);
                    continue;
                };
                let Ok(stream) = stream.into_std() else { continue };
                let _ = workers[next % workers.len()].send(ToWorker::Connection { stream, kind, class, slot });
                next = next.wrapping_add(1);
            }
            Err(e) => errors.failed(&local, &e).await,
        }
    }
}

/// After the workers were told to drain: waits until every client connection has closed
/// (each closes after its request in flight; idle ones at once), at most
/// `limits.shutdown_timeout`, or until `cut_short` completes (a second SIGINT/SIGTERM).
pub async fn drain(shared: &Shared, cut_short: impl std::future::Future<Output = ()>) {
    let mut cut_short = std::pin::pin!(cut_short);
    let open = || shared.metrics.open_connections.get();
    let limit = shared.config.limits.shutdown_timeout;
    if open() > 0 {
        tracing::info!(
            "shutting down: waiting up to {limit:?} (limits.shutdown_timeout) for {} open connection(s) to finish their requests; signal again to exit now",
            open()
        );
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(20));
    while open() > 0 {
        tokio::select! {
            _ = poll.tick() => {}
            () = tokio::time::sleep_until(deadline) => break,
            () = &mut cut_short => break,
        }
    }
    match open() {
        0 => tracing::info!("shut down"),
        n => tracing::info!("shut down with {n} connection(s) still open"),
    }
}
