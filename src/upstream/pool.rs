//! Per-worker pool of kept-alive upstream HTTP/1.1 connections.
//!
//! Entries are keyed by (host, port) and remember the address they were dialled to, so a
//! reused connection is re-checked against the current request's address rules: a pooled
//! socket never lets one container reach what another container's rules allowed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;

use crate::body::Body;

/// How long an idle upstream connection is kept.
const IDLE_KEEP: Duration = Duration::from_secs(90);
/// Most connections kept per (host, port).
const MAX_PER_KEY: usize = 128;

/// A pooled connection.
pub struct Pooled {
    pub sender: SendRequest<Body>,
    pub peer: SocketAddr,
    last_used: Instant,
}

impl Pooled {
    pub fn new(sender: SendRequest<Body>, peer: SocketAddr) -> Self {
        Self { sender, peer, last_used: Instant::now() }
    }
}

#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<(String, u16, bool), Vec<Pooled>>>,
}

impl Pool {
    /// Takes a ready connection to `key` whose peer passes `ok`.
    pub fn checkout(&self, key: &(String, u16, bool), ok: impl Fn(SocketAddr) -> bool) -> Option<Pooled> {
        let mut map = self.idle.borrow_mut();
        let list = map.get_mut(key)?;
        let now = Instant::now();
        list.retain(|p| !p.sender.is_closed() && now.duration_since(p.last_used) < IDLE_KEEP);
        // Most recently used first: the warmest socket, least likely closed by the server.
        let pos = list.iter().rposition(|p| p.sender.is_ready() && ok(p.peer))?;
        Some(list.swap_remove(pos))
    }

    /// Returns a connection; it becomes usable again once its response body is finished.
    pub fn put_back(&self, key: (String, u16, bool), mut conn: Pooled) {
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
}
