//! moat: a programmable egress proxy. Every outbound HTTP(S) request of a sandboxed program
//! goes through a Lua policy that denies it, forwards it, rewrites it, or answers it.
//!
//! # Layout
//!
//! - [`policy`]: pure decision logic: canonical hosts, host patterns, the decision order.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod policy;
pub mod config;
pub mod identity;
pub mod body;
pub mod proxy;
pub mod upstream;
pub mod log;
pub mod script;
pub mod bindings;
pub mod cli;
