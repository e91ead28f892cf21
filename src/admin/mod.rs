//! The admin API (SPEC 7.3): HTTP/1.1 + JSON on a Unix socket, and the client the CLI uses.

pub(crate) mod api;
pub(crate) mod client;
pub mod commands;
pub(crate) mod lifecycle;
pub(crate) mod server;
