//! Per-worker pool of upstream connections: kept-alive HTTP/1.1 connections (one request at
//! a time, checked out and put back) and HTTP/2 connections (shared by concurrent requests).
//!
//! Entries are keyed by (host, port, tls) and remember the address they were dialled to, so a
//! reused connection is re-checked against the current request's address rules: a pooled
//! socket never lets one container reach what another container's rules allowed.

use rustc_hash::FxHashMap as HashMap;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};

use crate::body::Body;

/// How long an idle upstream connection is kept.
const IDLE_KEEP: Duration = Duration::from_secs(90);
/// Most HTTP/1.1 connections kept per key.
const MAX_PER_KEY: usize = 128;
/// Most HTTP/2 connections kept per key (each carries many streams).
const MAX_H2_PER_KEY: usize = 4;

/// (host, port, tls).
pub type Key = (crate::policy::CanonicalHost, u16, bool);

/// A pooled HTTP/1.1 connection.
pub struct Pooled {
    pub sender: http1::SendRequest<Body>,
    pub peer: SocketAddr,
    last_used: Instant,
}

/// An idle connection older than this may be closed by its server just as a request is
/// sent on it (servers' keep-alive timeouts are seconds: Node 5 s, Apache 5 s, nginx 75 s).
/// A connection reused sooner, as under load, is not, so only these pay for a replay copy.
const MAY_BE_CLOSING_AFTER: Duration = Duration::from_secs(1);

impl Pooled {
    pub fn new(sender: http1::SendRequest<Body>, peer: SocketAddr) -> Self {
        Self { sender, peer, last_used: Instant::now() }
    }

    /// Whether the connection was idle long enough that its server may be closing it.
    pub fn may_be_closing(&self) -> bool {
        self.last_used.elapsed() >= MAY_BE_CLOSING_AFTER
    }
}

/// A shared HTTP/2 connection.
#[derive(Clone)]
pub struct Shared2 {
    pub sender: http2::SendRequest<Body>,
    pub peer: SocketAddr,
}

/// An HTTP/2 connection in the pool, with when a request last took it.
struct PooledH2 {
    conn: Shared2,
    last_used: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<Key, Vec<Pooled>>>,
    h2: RefCell<HashMap<Key, Vec<PooledH2>>>,
}

impl Pool {
    /// Takes a ready HTTP/1.1 connection to `key` whose peer passes `ok`.
    pub fn checkout(&self, key: &Key, ok: impl Fn(SocketAddr) -> bool) -> Option<Pooled> {
        let mut map = self.idle.borrow_mut();
        let list = map.get_mut(key)?;
        let now = Instant::now();
        list.retain(|p| !p.sender.is_closed() && now.duration_since(p.last_used) < IDLE_KEEP);
        // Most recently used first: the warmest socket, least likely closed by the server.
        let pos = list.iter().rposition(|p| p.sender.is_ready() && ok(p.peer))?;
        Some(list.swap_remove(pos))
    }

    /// Returns an HTTP/1.1 connection; it becomes usable again once its response body is
    /// finished.
    pub fn put_back(&self, key: Key, mut conn: Pooled) {
        if conn.sender.is_closed() {
            return;
        }
        conn.last_used = Instant::now();
        let mut map = self.idle.borrow_mut();
        let list = map.entry(key).or_default();
        if list.len() < MAX_PER_KEY {
            list.push(conn);
        }
    }

    /// An open HTTP/2 connection to `key` whose peer passes `ok` (it stays in the pool).
    pub fn h2(&self, key: &Key, ok: impl Fn(SocketAddr) -> bool) -> Option<Shared2> {
        let mut map = self.h2.borrow_mut();
        let list = map.get_mut(key)?;
        list.retain(|c| !c.conn.sender.is_closed());
        let entry = list.iter_mut().find(|c| ok(c.conn.peer))?;
        entry.last_used = Instant::now();
        Some(entry.conn.clone())
    }

    /// Keeps a new HTTP/2 connection for later requests.
    pub fn add_h2(&self, key: Key, conn: Shared2) {
        let mut map = self.h2.borrow_mut();
        let list = map.entry(key).or_default();
        list.retain(|c| !c.conn.sender.is_closed());
        if list.len() < MAX_H2_PER_KEY {
            list.push(PooledH2 { conn, last_used: Instant::now() });
        }
    }

    /// Closes connections that sat unused for [`IDLE_KEEP`] at `now` and forgets closed ones.
    /// Checkouts do this only for the key they look up; this reaches hosts no request names
    /// any more, whose sockets would otherwise stay open until the server closes them. An
    /// HTTP/2 connection with requests in flight stays open until they end (they hold it).
    pub fn sweep(&self, now: Instant) {
        let fresh = |last_used: Instant| now.saturating_duration_since(last_used) < IDLE_KEEP;
        let mut idle = self.idle.borrow_mut();
        idle.retain(|_, list| {
            list.retain(|p| !p.sender.is_closed() && fresh(p.last_used));
            !list.is_empty()
        });
        let mut h2 = self.h2.borrow_mut();
        h2.retain(|_, list| {
            list.retain(|c| !c.conn.sender.is_closed() && fresh(c.last_used));
            !list.is_empty()
        });
    }

    /// Connections held: (HTTP/1.1 idle, HTTP/2).
    #[cfg(test)]
    pub fn held(&self) -> (usize, usize) {
        (self.idle.borrow().values().map(Vec::len).sum(), self.h2.borrow().values().map(Vec::len).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::CanonicalHost;

    /// A real kept-alive HTTP/1.1 client connection to a loopback listener that never answers.
    async fn connection() -> (Pooled, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(peer).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, conn) = http1::Builder::new().handshake::<_, Body>(io).await.unwrap();
        tokio::task::spawn_local(conn);
        (Pooled::new(sender, peer), listener)
    }

    #[test]
    fn sweep_closes_only_connections_idle_past_the_keep_time() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let pool = Pool::default();
            let (a, la) = connection().await;
            let (b, _lb) = connection().await;
            let key = |port| (CanonicalHost::parse("127.0.0.1").unwrap(), port, false);
            pool.put_back(key(1), a);
            pool.put_back(key(2), b);
            assert_eq!(pool.held(), (2, 0));

            pool.sweep(Instant::now() + IDLE_KEEP / 2);
            assert_eq!(pool.held(), (2, 0), "connections used within the keep time stay");

            pool.sweep(Instant::now() + IDLE_KEEP + Duration::from_secs(1));
            assert_eq!(pool.held(), (0, 0), "idle connections of every key are closed");
            assert!(pool.idle.borrow().is_empty(), "keys without connections are forgotten");
            // The socket itself is closed: the server end reads end-of-stream.
            use tokio::io::AsyncReadExt;
            let (mut server_end, _) = la.accept().await.unwrap();
            let read = tokio::time::timeout(Duration::from_secs(5), server_end.read(&mut [0u8; 16])).await;
            assert_eq!(read.expect("socket not closed").unwrap(), 0);
        });
    }
}
