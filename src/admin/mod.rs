//! The admin API (SPEC 7.3): HTTP/1.1 + JSON on a Unix socket, and the client the CLI uses.

pub mod api;
pub mod client;
pub mod commands;
pub mod server;
