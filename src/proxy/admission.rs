//! `limits.max_connections`: how many client connections moat serves at once. A connection
//! over the limit is refused at accept, with a one-line 503 rather than a silent close, so
//! that whoever runs the client sees why; the connections already open keep being served.
//!
//! The count is taken at accept (not when a worker adopts the socket), so a burst of accepts
//! cannot overshoot the limit while the workers catch up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The answer to a connection over the limit. HTTP/1.1 because the explicit listener's first
/// bytes are always HTTP (a request or a CONNECT).
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\n\
content-length: 76\r\n\r\nmoat: too many open connections (limits.max_connections); try again shortly\n";

/// Refused connections answered at once; past this they are closed without an answer, so
/// that a flood of refusals costs a bounded number of tasks.
const MAX_REFUSING: usize = 256;

/// How long a refused connection is read from after its answer: closing a socket with unread
/// bytes sends a reset, which can destroy the answer before the client reads it.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The open client connections against the limit.
pub struct Admission {
    limit: usize,
    open: AtomicUsize,
    refusing: AtomicUsize,
    /// When the last "refusing" warning was logged, and refusals since (logged at most once a
    /// minute, like accept failures).
    warned: std::sync::Mutex<(Option<Instant>, u64)>,
}

/// A client connection's place under the limit, given back when dropped.
pub struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, open: AtomicUsize::new(0), refusing: AtomicUsize::new(0), warned: Default::default() })
    }

    /// A slot for a newly accepted connection, or `None` when `limit` are open.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < self.limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// Answers a connection over the limit with a 503 and closes it, on a task of its own.
    pub fn refuse(self: &Arc<Self>, stream: tokio::net::TcpStream, listener: &dyn std::fmt::Display) {
        self.warn(listener);
        if self.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _ = answer(stream).await;
            me.refusing.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn warn(&self, listener: &dyn std::fmt::Display) {
        let mut w = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        w.1 += 1;
        if w.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!(
                "accept on {listener}: {} client connections open, refusing new ones with 503 (limits.max_connections; {} refused since the last warning)",
                self.limit,
                w.1
            );
            *w = (Some(Instant::now()), 0);
        }
    }
}

async fn answer(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream.write_all(REFUSAL).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024;
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_are_given_back_and_the_refusal_is_framed() {
        let a = super::Admission::new(2);
        let one = a.admit().unwrap();
        let _two = a.admit().unwrap();
        assert!(a.admit().is_none());
        drop(one);
        assert!(a.admit().is_some());
        let text = std::str::from_utf8(super::REFUSAL).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())), "{text}");
    }
}
