//! `limits.memory_ceiling`: moat's resident memory, read once a heartbeat, against a
//! ceiling beyond which new handler calls are refused (503) rather than the process growing.
//!
//! The Lua collector counts only Lua's own memory (bounded per state by `limits.lua_memory`);
//! what a call's objects hold on the Rust side, the upstream pools and the allocator's own
//! retention are not in any Lua budget. The ceiling bounds their sum, as Envoy's overload
//! manager does with its heap-size trigger.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether moat is over its memory ceiling, as last measured.
#[derive(Default)]
pub struct MemoryWatch {
    over: AtomicBool,
}

impl MemoryWatch {
    /// Over the ceiling at the last measurement: refuse new handler calls.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Measures and records; logs when the state changes. Returns whether moat is over.
    pub fn measure(&self, ceiling: usize) -> bool {
        let Some(rss) = resident_bytes() else { return false };
        let over = rss > ceiling;
        if self.over.swap(over, Ordering::Relaxed) != over {
            let mib = |b: usize| b >> 20;
            if over {
                tracing::warn!(
                    "memory: {} MiB resident is over limits.memory_ceiling ({} MiB): new handler calls get 503 until it falls",
                    mib(rss),
                    mib(ceiling)
                );
            } else {
                tracing::info!(
                    "memory: {} MiB resident, under limits.memory_ceiling again: handler calls resume",
                    mib(rss)
                );
            }
        }
        over
    }
}

/// The process's resident set size, from /proc/self/statm.
pub fn resident_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ceiling_below_the_process_is_over_and_one_above_is_not() {
        let w = MemoryWatch::default();
        let rss = resident_bytes().unwrap();
        assert!(rss > 1 << 20);
        assert!(w.measure(1 << 20) && w.over());
        assert!(!w.measure(usize::MAX) && !w.over());
    }
}
