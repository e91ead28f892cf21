//! moat: a programmable egress proxy. Every outbound HTTP(S) request of a sandboxed program
//! goes through a Lua policy that denies it, forwards it, rewrites it, or answers it.
//!
//! # Layout
//!
//! - [`policy`]: pure decision logic: canonical hosts, host patterns, the decision order.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod bindings;
pub mod body;
pub mod cli;
pub mod config;
pub mod db;
pub mod identity;
pub mod log;
pub mod policy;
pub mod proxy;
pub mod script;
pub mod upstream;
