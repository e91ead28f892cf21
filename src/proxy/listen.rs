//! The listener layer: binds the proxy's ports, accepts connections and hands each to a
//! worker under `limits.max_connections`, starts each connection by its listener's kind, and
//! drains the workers at shutdown. What a connection then carries (requests, CONNECT
//! tunnels) is `conn` and `connect`'s business: this is the only file that knows every way in.
//!
//! Listener kinds: today the explicit proxy listener (HTTP requests and CONNECT), one per
//! class; transparent HTTP, transparent TLS and DNS arrive with the sandbox.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::io::BufWriter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::admission::{Admission, Slot};
use super::conn::{Connect, serve_requests};
use super::h1::ConnReader;
pub use super::names::Sandboxed;
use super::state::{ClassId, Shared};
use super::target::Pinned;
use super::worker::{Worker, heartbeat};

/// What a listener accepts: each kind has its own way into the worker.
#[derive(Clone, Debug)]
pub enum ListenerKind {
    /// The explicit proxy, one per class: HTTP requests in absolute form, and CONNECT.
    Explicit,
    /// A sandbox's port 80 (`moat run`): plain HTTP the kernel delivered, whatever address the
    /// program dialled; every connection is the sandbox's container.
    TransparentHttp(Arc<Sandboxed>),
    /// A sandbox's port 443: TLS the kernel delivered, decided on its server name.
    TransparentTls(Arc<Sandboxed>),
    /// With internet on, every other TCP port of a sandbox (redirected by its firewall): a
    /// tunnel to the original destination, decided as a CONNECT to it would be.
    Relay(Arc<Sandboxed>),
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

/// What the accept side tells a worker.
pub enum ToWorker {
    /// A client connection: the socket, its listener's kind, the index of its class, and its
    /// place under `limits.max_connections` (held for as long as the connection is served).
    Connection { stream: std::net::TcpStream, kind: ListenerKind, class: ClassId, slot: Slot },
    /// moat is shutting down: finish the requests in flight, keep no connection alive.
    Drain,
}

/// Where the accept side sends a worker its connections.
pub type WorkerTx = mpsc::UnboundedSender<ToWorker>;

/// Starts the worker threads (`MOAT_WORKERS`, default one per core); connections go to them
/// through the returned senders.
pub fn start_workers(shared: &Arc<Shared>) -> std::io::Result<Vec<WorkerTx>> {
    let threads = std::env::var("MOAT_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, 64);
    (0..threads).map(|i| spawn_worker(i, shared.clone())).collect()
}

/// Starts a worker thread; connections arrive on the returned sender.
fn spawn_worker(index: usize, shared: Arc<Shared>) -> std::io::Result<WorkerTx> {
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    std::thread::Builder::new().name(format!("moat-worker-{index}")).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("worker runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let worker = Worker::new(shared);
            tokio::task::spawn_local(heartbeat(worker.clone()));
            while let Some(message) = rx.recv().await {
                let (stream, kind, class, slot) = match message {
                    ToWorker::Connection { stream, kind, class, slot } => (stream, kind, class, slot),
                    ToWorker::Drain => {
                        worker.start_draining();
                        continue;
                    }
                };
                let worker = worker.clone();
                tokio::task::spawn_local(async move {
                    let _slot = slot;
                    let _ = stream.set_nonblocking(true);
                    match TcpStream::from_std(stream) {
                        Ok(stream) => serve_connection(worker, stream, kind, class).await,
                        Err(e) => tracing::warn!("could not adopt connection: {e}"),
                    }
                });
            }
        });
    })?;
    Ok(tx)
}

/// Serves one accepted connection on `worker` the way its listener's kind says.
pub async fn serve_connection(worker: Rc<Worker>, stream: TcpStream, kind: ListenerKind, class: ClassId) {
    // Every kind: small writes go out at once, and the connection is counted in
    // `moat_open_connections` while it lives.
    let _ = stream.set_nodelay(true);
    let _open = OpenConnection::new(&worker.shared.metrics.open_connections);
    match kind {
        ListenerKind::Explicit => serve_explicit(worker, stream, class).await,
        ListenerKind::TransparentHttp(sandbox) => serve_transparent_http(worker, stream, class, &sandbox).await,
        // Boxed: a tunnel's state (TLS, HTTP/2) is large.
        ListenerKind::TransparentTls(sandbox) => {
            Box::pin(super::connect::serve_transparent_tls(&worker, class, &sandbox, stream)).await
        }
        ListenerKind::Relay(sandbox) => Box::pin(super::connect::serve_relay(&worker, class, &sandbox, stream)).await,
    }
}

/// A connection on the explicit listener: HTTP requests, until a CONNECT takes it over.
async fn serve_explicit(worker: Rc<Worker>, stream: TcpStream, class: ClassId) {
    let (rd, wr) = stream.into_split();
    let reader = ConnReader::new(rd);
    let writer = BufWriter::with_capacity(super::WRITE_BUFFER, wr);
    if let Some(Connect { head, reader, writer }) = serve_requests(&worker, class, reader, writer, None).await {
        // A tunnel takes over the connection (or ends it when refused). Boxed: a tunnel's
        // state (TLS, HTTP/2) is large, and inline it would grow every connection's task.
        Box::pin(super::connect::serve(&worker, class, head, reader, writer)).await;
    }
}

/// A connection on a sandbox's transparent HTTP listener: its requests, each decided on the
/// host it names, on behalf of the sandbox.
async fn serve_transparent_http(worker: Rc<Worker>, stream: TcpStream, class: ClassId, sandbox: &Sandboxed) {
    // With every address local in the sandbox, the address accepted on is the one dialled.
    let Ok(dialled) = stream.local_addr() else { return };
    let host = sandbox.names.host_for(dialled.ip());
    let pinned = Pinned::transparent(sandbox.container.clone(), host, dialled.port(), false);
    let (rd, wr) = stream.into_split();
    let writer = BufWriter::with_capacity(super::WRITE_BUFFER, wr);
    // A CONNECT on a pinned connection is answered as a request: nothing comes back.
    let _ = serve_requests(&worker, class, ConnReader::new(rd), writer, Some(pinned)).await;
}

/// Counts a client connection in `moat_open_connections` while it lives.
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl OpenConnection {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Tells every worker that moat is shutting down: requests in flight finish, no connection
/// is kept alive.
pub fn start_draining(workers: &[WorkerTx]) {
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
    pub class: ClassId,
}

/// Accepts connections on `listener` and hands each to the next worker, as long as
/// `admission` has room (else it is refused with a 503).
pub async fn accept_loop(listener: Listener, workers: Vec<WorkerTx>, admission: Arc<Admission>) {
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
                let _ = workers[next % workers.len()].send(ToWorker::Connection {
                    stream,
                    kind: kind.clone(),
                    class,
                    slot,
                });
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
