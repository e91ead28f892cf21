//! moat: a programmable egress proxy. Every outbound HTTP(S) request of a sandboxed program
//! goes through a Lua policy that denies it, forwards it, rewrites it, or answers it.
//!
//! # Layout
//!
//! A request travels: [`proxy`] accepts and parses it, [`identity`] says whose it is,
//! [`policy`] decides (pure), then [`script`] runs a handler or [`upstream`] egresses.
//!
//! - [`policy`]: pure decision logic: canonical hosts, host patterns, the decision order,
//!   per-container override specs and their setters.
//! - [`proxy`]: listeners, workers (one Lua state per class per thread), the strict HTTP/1.1
//!   codec, one request's path, CONNECT tunnels, TLS interception (HTTP/1.1 and HTTP/2 to
//!   the client), upgrades, hot reload, redaction, the override store, and the one place
//!   failures become answers.
//! - [`script`]: sandboxed Lua states, loading and validating generations, handler calls
//!   with CPU/memory/wall-clock limits, and the Lua API (Request, Response, Headers, URL,
//!   fetch, console, ctx, KV and bucket objects, `moat.container`).
//! - [`upstream`]: moat's resolver, the dial-time address check, pooled HTTP/1.1 and
//!   HTTP/2 connections (TLS verified against webpki roots plus `[tls] extra_ca`).
//! - [`tls`]: moat's CA (ephemeral or persisted) and the cache of leaf certificates it signs
//!   for intercepted hosts.
//! - [`bindings`]: `env`: KV namespaces and `ctx.storage` (redb), blob buckets, secrets, vars;
//!   and the `moat kv` / `moat blob` commands.
//! - [`admin`]: the admin API (Unix socket, optional TCP), its CLI client, Prometheus metrics.
//! - [`config`]: `moat.toml` and flags to a typed [`config::Config`]; [`identity`]: container
//!   ids and proxy credentials; [`body`]: the streaming body type; [`db`]: the database file;
//!   [`log`]: access log, batching log writer, secret redaction; [`cli`]: check, explain,
//!   init, ca; [`rt`]: hyper's executor on worker threads; `fuzz`: the fuzz targets'
//!   entry points and their corpus replay.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod bindings;
pub mod body;
pub mod cli;
pub mod config;
pub mod db;
#[doc(hidden)]
pub mod fuzz;
pub mod headers;
pub mod identity;
pub mod log;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod rt;
pub mod script;
pub mod tls;
pub mod upstream;
