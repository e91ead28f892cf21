//! Per-worker pool of upstream connections: kept-alive HTTP/1.1 connections (one request at
//! a time, checked out and put back) and HTTP/2 connections (shared by concurrent requests).
//!
//! Entries are keyed by (host, port, tls) and remember the address they were dialled to, so a
//! reused connection is re-checked against the current request's address rules: a pooled
//! socket never lets one container reach what another container's rules allowed.

use std::cell::RefCell;
use std::collections::HashMap;
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

impl Pooled {
    pub fn new(sender: http1::SendRequest<Body>, peer: SocketAddr) -> Self {
        Self { sender, peer, last_used: Instant::now() }
    }
}

/// A shared HTTP/2 connection.
#[derive(Clone)]
pub struct Shared2 {
    pub sender: http2::SendRequest<Body>,
    pub peer: SocketAddr,
}

#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<Key, Vec<Pooled>>>,
    h2: RefCell<HashMap<Key, Vec<Shared2>>>,
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
        list.retain(|c| !c.sender.is_closed());
        list.iter().find(|c| ok(c.peer)).cloned()
    }

    /// Keeps a new HTTP/2 connection for later requests.
    pub fn add_h2(&self, key: Key, conn: Shared2) {
        let mut map = self.h2.borrow_mut();
        let list = map.entry(key).or_default();
        list.retain(|c| !c.sender.is_closed());
        if list.len() < MAX_H2_PER_KEY {
            list.push(conn);
        }
    }
}
