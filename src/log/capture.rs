//! Access records kept on the thread that made them instead of logged (`moat test` reads what
//! each request's decision was from them, exactly as the access log would show it).

use std::cell::RefCell;

use super::{AccessRecord, Logged};

/// One request's access record, as captured.
#[derive(Clone, Debug)]
pub struct Captured {
    pub method: String,
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub decision: Logged,
    /// Redacted, as the log line would carry it.
    pub detail: String,
    pub status: u16,
}

thread_local! {
    static CAPTURED: RefCell<Option<Vec<Captured>>> = const { RefCell::new(None) };
}

/// From now on, access records made on this thread are kept (and not logged) until [`stop`].
pub fn start() {
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
}

/// Stops capturing on this thread.
pub fn stop() {
    CAPTURED.with(|c| *c.borrow_mut() = None);
}

/// The records captured on this thread since the last call.
pub fn drain() -> Vec<Captured> {
    CAPTURED.with(|c| c.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default())
}

/// Whether this thread captures.
pub(super) fn active() -> bool {
    CAPTURED.with(|c| c.borrow().is_some())
}

/// Keeps `r` when this thread captures; `false` when it does not (the record is logged).
pub(super) fn take(r: &AccessRecord<'_>) -> bool {
    CAPTURED.with(|c| match c.borrow_mut().as_mut() {
        None => false,
        Some(list) => {
            list.push(Captured {
                method: r.method.to_string(),
                scheme: r.scheme.to_string(),
                host: r.host.to_string(),
                port: r.port,
                decision: r.decision,
                detail: super::redact(r.detail),
                status: r.status,
            });
            true
        }
    })
}
