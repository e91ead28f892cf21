//! The proxy: listeners, workers, connections, and the path of one request.

pub mod admission;
pub mod answer;
pub mod conn;
pub mod connect;
pub mod dns;
pub mod h1;
pub mod intercept;
pub mod listen;
pub mod memory;
pub mod names;
pub mod overrides;
pub mod redact;
pub mod reload;
pub mod request;
pub mod sniff;
pub mod state;
pub mod target;
pub mod worker;

/// Write buffer per client connection: a response head and a small body leave in one write;
/// larger body chunks bypass it. Held for the whole life of a kept-alive connection, so it is
/// kept small (1,000 idle connections hold 8 MiB of it).
const WRITE_BUFFER: usize = 8 * 1024;
