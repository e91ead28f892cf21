//! The proxy: listeners, workers, connections, and the path of one request.

pub mod answer;
pub mod conn;
pub mod connect;
pub mod h1;
pub mod intercept;
pub mod overrides;
pub mod redact;
pub mod reload;
pub mod request;
pub mod server;
pub mod state;
pub mod worker;
