//! Pure policy: canonical hosts, host patterns, and the decision order. No I/O, no Lua.

pub mod decide;
pub mod host;
pub mod overrides;
pub mod pattern;
pub mod rules;

pub use decide::{
    ClassPolicy, Decision, DenyReason, HandlerChoice, NamedHandler, Overrides, Verdict, decide, decide_tunnel,
};
pub use host::{CanonicalHost, InvalidHost};
pub use pattern::{HostPattern, InvalidPattern};
pub use rules::{ByHost, HostList};

#[cfg(test)]
mod tests;
