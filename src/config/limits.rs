//! `[limits]` (SPEC 9): every bound moat enforces, with its default.

use std::time::Duration;

use serde::Deserialize;

use crate::units::{parse_duration, parse_size};

/// The limits in force for a running instance. Fixed at start.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request line + headers; above → 431.
    pub request_head_bytes: usize,
    /// Time to receive a request head (or CONNECT head) once its first byte arrived.
    pub request_head_timeout: Duration,
    /// ClientHello wait + TLS handshake, client side and upstream.
    pub tls_handshake_timeout: Duration,
    /// A kept-alive client connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// A request or response body that sends nothing for this long is cut off. Long, because
    /// streams legitimately pause (a model thinking before its first token).
    pub body_idle_timeout: Duration,
    /// Least average rate of a request body, bytes per second, once `request_body_rate_grace`
    /// has passed (→ 408); 0: none. Without it a body trickled a byte at a time holds its
    /// connection and upstream for ever, each byte arriving well within `body_idle_timeout`.
    pub request_body_min_rate: usize,
    /// How long a request body may take before `request_body_min_rate` applies.
    pub request_body_rate_grace: Duration,
    /// Upstream TCP connect (→ 504).
    pub connect_timeout: Duration,
    /// Wait for an upstream's response head once the request (and its body) went out (→ 504).
    /// Without it an upstream that never answers would hold the request, its upstream
    /// connection and, on HTTP/1.1, the client connection for ever.
    pub response_head_timeout: Duration,
    /// Wall clock of one handler call, fetches included (→ 504).
    pub handler_timeout: Duration,
    /// Memory of one Lua state (→ 500 for the request that hit it).
    pub lua_memory: usize,
    /// CPU time of one handler call (→ 500).
    pub lua_cpu: Duration,
    /// What `:text()`, `:json()`, `:bytes()` may buffer.
    pub body_buffer: usize,
    /// Upstream requests one handler call may make (`fetch`, each redirect followed), as
    /// Workers bound subrequests per request.
    pub subrequests: u32,
    /// moat's resident memory beyond which new handler calls get 503 until it falls again.
    pub memory_ceiling: usize,
    /// Client connections served at once, over every proxy listener; one more is answered
    /// 503 and closed at accept. Admin connections do not count.
    pub max_connections: usize,
    /// On SIGTERM or SIGINT, how long requests in flight may take to finish before moat exits.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_head_bytes: 64 * 1024,
            request_head_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            body_idle_timeout: Duration::from_secs(300),
            request_body_min_rate: 1024,
            request_body_rate_grace: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            response_head_timeout: Duration::from_secs(300),
            handler_timeout: Duration::from_secs(30),
            lua_memory: 64 * 1024 * 1024,
            lua_cpu: Duration::from_secs(1),
            body_buffer: 16 * 1024 * 1024,
            subrequests: 50,
            memory_ceiling: default_memory_ceiling(),
            max_connections: 10_000,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// `[limits]` as written; every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    request_head_bytes: Option<SizeValue>,
    request_head_timeout: Option<String>,
    tls_handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    request_body_min_rate: Option<SizeValue>,
    request_body_rate_grace: Option<String>,
    connect_timeout: Option<String>,
    response_head_timeout: Option<String>,
    handler_timeout: Option<String>,
    lua_memory: Option<SizeValue>,
    lua_cpu: Option<String>,
    body_buffer: Option<SizeValue>,
    subrequests: Option<u32>,
    memory_ceiling: Option<SizeValue>,
    max_connections: Option<usize>,
    shutdown_timeout: Option<String>,
}

/// A size written as a number of bytes or a string like `"64KiB"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl LimitsFile {
    /// Applies the keys that are set over the defaults; the error names the bad key.
    pub fn resolve(&self) -> Result<Limits, String> {
        let mut l = Limits::default();
        let dur = |key: &str, v: &Option<String>, slot: &mut Duration| -> Result<(), String> {
            if let Some(text) = v {
                *slot = parse_duration(text).ok_or_else(|| {
                    format!("limits.{key}: {text:?} is not a duration (write e.g. \"10s\" or \"500ms\")")
                })?;
            }
            Ok(())
        };
        let size = |key: &str, v: &Option<SizeValue>, slot: &mut usize| -> Result<(), String> {
            match v {
                None => {}
                Some(SizeValue::Bytes(n)) => *slot = *n as usize,
                Some(SizeValue::Text(t)) => {
                    *slot = parse_size(t).ok_or_else(|| {
                        format!("limits.{key}: {t:?} is not a size (write e.g. 65536, \"64KiB\" or \"16MiB\")")
                    })?
                }
            }
            Ok(())
        };
        size("request_head_bytes", &self.request_head_bytes, &mut l.request_head_bytes)?;
        dur("request_head_timeout", &self.request_head_timeout, &mut l.request_head_timeout)?;
        dur("tls_handshake_timeout", &self.tls_handshake_timeout, &mut l.tls_handshake_timeout)?;
        dur("idle_timeout", &self.idle_timeout, &mut l.idle_timeout)?;
        dur("body_idle_timeout", &self.body_idle_timeout, &mut l.body_idle_timeout)?;
        dur("connect_timeout", &self.connect_timeout, &mut l.connect_timeout)?;
        size("request_body_min_rate", &self.request_body_min_rate, &mut l.request_body_min_rate)?;
        dur("request_body_rate_grace", &self.request_body_rate_grace, &mut l.request_body_rate_grace)?;
        dur("response_head_timeout", &self.response_head_timeout, &mut l.response_head_timeout)?;
        dur("handler_timeout", &self.handler_timeout, &mut l.handler_timeout)?;
        size("lua_memory", &self.lua_memory, &mut l.lua_memory)?;
        dur("lua_cpu", &self.lua_cpu, &mut l.lua_cpu)?;
        size("body_buffer", &self.body_buffer, &mut l.body_buffer)?;
        if let Some(n) = self.subrequests {
            l.subrequests = n;
        }
        size("memory_ceiling", &self.memory_ceiling, &mut l.memory_ceiling)?;
        match self.max_connections {
            Some(0) => return Err("limits.max_connections: must be at least 1".into()),
            Some(n) => l.max_connections = n,
            None => {}
        }
        dur("shutdown_timeout", &self.shutdown_timeout, &mut l.shutdown_timeout)?;
        if l.lua_memory < 1024 * 1024 {
            return Err("limits.lua_memory: must be at least 1MiB".into());
        }
        Ok(l)
    }
}

/// Half of the machine's memory (`MemTotal` in /proc/meminfo); 4 GiB where that is unknown.
fn default_memory_ceiling() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<usize>().ok())
    });
    total_kib.map_or(4 << 30, |k| k * 1024 / 2)
}
