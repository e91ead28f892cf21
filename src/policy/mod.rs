//! Pure policy: canonical hosts, host patterns, and the decision order. No I/O, no Lua.

pub mod decide;
pub mod host;
pub mod intercepts;
pub mod overrides;
pub mod pattern;
pub mod rules;

pub use decide::{
    ClassPolicy, ContainerSettings, Decision, DenyReason, HandlerChoice, Overrides, decide, decide_request,
    decide_tunnel,
};
pub use host::CanonicalHost;
pub use pattern::HostPattern;
pub use rules::{ByHost, HostList};

#[cfg(test)]
mod tests;
