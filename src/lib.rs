//! moat: a programmable egress proxy. Every outbound HTTP(S) request of a sandboxed program
//! goes through a Lua policy that denies it, forwards it, rewrites it, or answers it.
//!
//! # Layout
//!
//! A request travels: [`proxy`] accepts and parses it, [`identity`] says whose it is,
//! [`policy`] decides (pure), then [`script`] runs a handler or [`upstream`] egresses.
//! [`serve`] wires everything at start. Modules use only lower layers and no two files import
//! each other (docs/architecture.md, both checked by a test), lowest first:
//!
//! - [`policy`]: pure decision logic: canonical hosts, host patterns, the decision order,
//!   per-container override specs and their setters. [`identity`]: container ids and proxy
//!   credentials; [`body`]: the streaming body type; [`rt`]: hyper's executor, coarse timers,
//!   accept errors; [`log`]: access log, batching log writer, secret redaction; [`headers`]:
//!   hop-by-hop and upgrade rules both sides follow; [`metrics`]: the Prometheus registry;
//!   [`db`]: the database file; [`units`]: sizes and durations as users write them.
//! - [`config`]: `moat.toml` and flags to a typed [`config::Config`].
//! - [`tls`]: moat's CA (ephemeral or persisted), the cache of leaf certificates it signs for
//!   intercepted hosts, secure random bytes. [`bindings`]: the storage behind `env`: KV
//!   namespaces and `ctx.storage` (redb), blob buckets, secrets, vars. [`upstream`]: moat's
//!   resolver, the dial-time address check, pooled HTTP/1.1 and HTTP/2 connections (TLS
//!   verified against webpki roots plus `[tls] extra_ca`).
//! - [`script`]: sandboxed Lua states, loading and validating generations, handler calls
//!   with CPU/memory/wall-clock limits, and the Lua API (Request, Response, Headers, URL,
//!   fetch, console, ctx, `env`, KV and bucket objects, `moat.container`).
//! - [`proxy`]: the listener layer, workers (one Lua state per class per thread), the strict
//!   HTTP/1.1 codec, one request's path, CONNECT tunnels, TLS interception (HTTP/1.1 and
//!   HTTP/2 to the client), upgrades, hot reload, redaction, the override store, and the one
//!   place failures become answers.
//! - [`admin`]: the admin API (Unix socket, optional TCP) and its CLI client.
//! - [`policytest`]: `moat test`: policy tests against the real proxy, fixtures for the network.
//! - [`serve`]: `moat serve`'s wiring; [`cli`]: check, explain, init, ca, kv, blob; `fuzz`: the
//!   fuzz targets' entry points and their corpus replay; `bench`: what the benchmarks reach.
//!
//! # Public surface
//!
//! What the `moat` binary needs, documented: [`serve::run`], the [`cli`] commands, the
//! [`admin::commands`] that talk to a running instance, [`config::Config`] and
//! [`log::init`]. Everything else is crate-private; `fuzz` and `bench` (hidden) re-export the
//! few internals that the fuzz targets and the benchmarks drive directly.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
#[doc(hidden)]
pub mod bench;
pub(crate) mod bindings;
pub(crate) mod body;
pub mod cli;
pub mod config;
pub(crate) mod db;
#[doc(hidden)]
pub mod fuzz;
pub(crate) mod headers;
pub(crate) mod identity;
pub(crate) mod lifecycle;
pub mod log;
pub(crate) mod metrics;
pub(crate) mod policy;
pub(crate) mod policytest;
pub(crate) mod proxy;
pub(crate) mod rt;
pub(crate) mod sandbox;
pub(crate) mod script;
pub mod serve;
pub(crate) mod tls;
pub(crate) mod units;
pub(crate) mod upstream;
