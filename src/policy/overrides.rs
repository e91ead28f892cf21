//! Per-container runtime overrides (SPEC 7.2) as the user set them, and the setters with
//! Cloudflare's semantics. [`OverrideSpec`] is what is stored; [`Overrides`] (compiled) is
//! what the decision order reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::decide::{ClassPolicy, NamedHandler, Overrides};
use super::pattern::HostPattern;
use super::rules::{ByHost, HostList};

/// A handler chosen at runtime: a name from `outboundHandlers` and optional `ctx.params`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandlerSpec {
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
}

/// One container's overrides, as set. `None` means "use the class's".
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OverrideSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outbound_by_host: BTreeMap<String, HandlerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_handler: Option<HandlerSpec>,
}

/// Why a setter changed nothing. The message is what the user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetterError {
    /// SPEC 7.2's exact text.
    #[error("Outbound handler method '{method}' not found in outboundHandlers for {class}")]
    UnknownHandler { method: String, class: String },
    #[error("{0}")]
    BadPattern(String),
}

impl SetterError {
    /// A stable code for the admin API's JSON errors.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownHandler { .. } => "unknown_handler",
            Self::BadPattern(_) => "bad_pattern",
        }
    }
}

/// One setter call (the instance methods of Cloudflare's Container class).
#[derive(Clone, Debug, PartialEq)]
pub enum Setter {
    /// `setOutboundHandler(name, params?)`: one handler for every host.
    SetOutboundHandler(HandlerSpec),
    /// `removeOutboundHandler()`.
    RemoveOutboundHandler,
    /// `setOutboundByHost(host, name, params?)`: a handler for one host pattern.
    SetOutboundByHost(String, HandlerSpec),
    /// `setOutboundByHosts{host = name, …}`: replaces every per-host handler.
    SetOutboundByHosts(BTreeMap<String, HandlerSpec>),
    /// `removeOutboundByHost(host)`.
    RemoveOutboundByHost(String),
    /// `setAllowedHosts{…}`: replaces the allow list.
    SetAllowedHosts(Vec<String>),
    /// `setDeniedHosts{…}`: replaces the deny list.
    SetDeniedHosts(Vec<String>),
    /// `allowHost(host)`: adds to the allow list.
    AllowHost(String),
    /// `denyHost(host)`: adds to the deny list.
    DenyHost(String),
    /// `removeAllowedHost(host)`.
    RemoveAllowedHost(String),
    /// `removeDeniedHost(host)`.
    RemoveDeniedHost(String),
    /// `clearOverrides()`: back to the class policy.
    ClearOverrides,
}

fn check_pattern(p: &str) -> Result<(), SetterError> {
    HostPattern::parse(p).map(|_| ()).map_err(|e| SetterError::BadPattern(e.to_string()))
}

fn check_handler(h: &HandlerSpec, class_name: &str, class: &ClassPolicy) -> Result<(), SetterError> {
    if class.handler_names.contains(&h.method) {
        Ok(())
    } else {
        Err(SetterError::UnknownHandler { method: h.method.clone(), class: class_name.to_string() })
    }
}

/// The class's list as strings, to start an instance list from (Cloudflare copies the class
/// list into the instance, then edits it).
fn class_list(list: &Option<HostList>) -> Vec<String> {
    list.as_ref().map(|l| l.patterns().iter().map(|p| p.as_str().to_string()).collect()).unwrap_or_default()
}

impl OverrideSpec {
    /// Applies a setter after validating all of its input; on error nothing changes.
    pub fn apply(&mut self, setter: Setter, class_name: &str, class: &ClassPolicy) -> Result<(), SetterError> {
        match setter {
            Setter::SetOutboundHandler(h) => {
                check_handler(&h, class_name, class)?;
                self.outbound_handler = Some(h);
            }
            Setter::RemoveOutboundHandler => self.outbound_handler = None,
            Setter::SetOutboundByHost(host, h) => {
                check_pattern(&host)?;
                check_handler(&h, class_name, class)?;
                self.outbound_by_host.insert(host, h);
            }
            Setter::SetOutboundByHosts(map) => {
                for (host, h) in &map {
                    check_pattern(host)?;
                    check_handler(h, class_name, class)?;
                }
                self.outbound_by_host = map;
            }
            Setter::RemoveOutboundByHost(host) => {
                self.outbound_by_host.remove(&host);
            }
            Setter::SetAllowedHosts(list) => {
                list.iter().try_for_each(|p| check_pattern(p))?;
                self.allowed_hosts = Some(list);
            }
            Setter::SetDeniedHosts(list) => {
                list.iter().try_for_each(|p| check_pattern(p))?;
                self.denied_hosts = Some(list);
            }
            Setter::AllowHost(h) => {
                check_pattern(&h)?;
                let list = self.allowed_hosts.get_or_insert_with(|| class_list(&class.allowed));
                if !list.contains(&h) {
                    list.push(h);
                }
            }
            Setter::DenyHost(h) => {
                check_pattern(&h)?;
                let list = self.denied_hosts.get_or_insert_with(|| class_list(&class.denied));
                if !list.contains(&h) {
                    list.push(h);
                }
            }
            Setter::RemoveAllowedHost(h) => {
                let list = self.allowed_hosts.get_or_insert_with(|| class_list(&class.allowed));
                list.retain(|x| *x != h);
            }
            Setter::RemoveDeniedHost(h) => {
                let list = self.denied_hosts.get_or_insert_with(|| class_list(&class.denied));
                list.retain(|x| *x != h);
            }
            Setter::ClearOverrides => *self = Self::default(),
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Compiles for the decision order. Handlers no longer in the class (a reload removed
    /// them) are dropped, with their names returned for a warning.
    pub fn compile(&self, class: &ClassPolicy) -> (Overrides, Vec<String>) {
        let mut dropped = Vec::new();
        let mut keep = |h: &HandlerSpec| {
            let ok = class.handler_names.contains(&h.method);
            if !ok {
                dropped.push(h.method.clone());
            }
            ok.then(|| Arc::new(NamedHandler { name: h.method.clone(), params: h.params.clone() }))
        };
        let list = |l: &Option<Vec<String>>| {
            l.as_ref()
                .map(|items| HostList::from_patterns(items.iter().filter_map(|p| HostPattern::parse(p).ok()).collect()))
        };
        let by_host = self
            .outbound_by_host
            .iter()
            .filter_map(|(host, h)| Some((HostPattern::parse(host).ok()?, keep(h)?)))
            .collect();
        let outbound = self.outbound_handler.as_ref().and_then(&mut keep);
        let compiled = Overrides {
            allowed: list(&self.allowed_hosts),
            denied: list(&self.denied_hosts),
            by_host: ByHost::new(by_host),
            outbound,
            settings: Default::default(),
            intercepts: Default::default(),
        };
        (compiled, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CanonicalHost, Decision, DenyReason, decide};

    fn class() -> ClassPolicy {
        ClassPolicy {
            enable_internet: true,
            allowed: Some(HostList::parse(&["a.test", "b.test"]).unwrap()),
            handler_names: ["readOnly".to_string()].into(),
            ..Default::default()
        }
    }

    fn h(name: &str) -> HandlerSpec {
        HandlerSpec { method: name.into(), params: None }
    }

    #[test]
    fn unknown_handler_changes_nothing() {
        let mut s = OverrideSpec::default();
        let e = s.apply(Setter::SetOutboundHandler(h("nope")), "agent", &class()).unwrap_err();
        assert_eq!(e.to_string(), "Outbound handler method 'nope' not found in outboundHandlers for agent");
        assert!(s.is_empty());
    }

    #[test]
    fn set_outbound_by_hosts_is_all_or_nothing() {
        let mut s = OverrideSpec::default();
        s.apply(Setter::SetOutboundByHost("x.test".into(), h("readOnly")), "c", &class()).unwrap();
        let map: BTreeMap<_, _> = [("a.test".to_string(), h("readOnly")), ("b.test".to_string(), h("missing"))].into();
        assert!(s.apply(Setter::SetOutboundByHosts(map), "c", &class()).is_err());
        assert_eq!(s.outbound_by_host.keys().collect::<Vec<_>>(), ["x.test"]);
        let ok: BTreeMap<_, _> = [("a.test".to_string(), h("readOnly"))].into();
        s.apply(Setter::SetOutboundByHosts(ok), "c", &class()).unwrap();
        assert_eq!(s.outbound_by_host.keys().collect::<Vec<_>>(), ["a.test"], "replaces the whole map");
    }

    #[test]
    fn allow_host_starts_from_the_class_list_and_removal_can_empty_it() {
        let mut s = OverrideSpec::default();
        s.apply(Setter::AllowHost("c.test".into()), "c", &class()).unwrap();
        assert_eq!(s.allowed_hosts.as_deref().unwrap(), ["a.test", "b.test", "c.test"]);
        for host in ["a.test", "b.test", "c.test"] {
            s.apply(Setter::RemoveAllowedHost(host.into()), "c", &class()).unwrap();
        }
        let (o, _) = s.compile(&class());
        let v = decide(&CanonicalHost::parse("a.test").unwrap(), 80, &class(), Some(&o));
        assert_eq!(v.decision, Decision::Deny(DenyReason::NotAllowed), "an emptied list denies everything");
        // On a class without allowedHosts, allowHost starts a list: everything else is denied.
        let open = ClassPolicy { allowed: None, ..class() };
        let mut s = OverrideSpec::default();
        s.apply(Setter::AllowHost("only.test".into()), "c", &open).unwrap();
        let (o, _) = s.compile(&open);
        assert_eq!(decide(&CanonicalHost::parse("else.test").unwrap(), 80, &open, Some(&o)).step, 2);
    }

    #[test]
    fn compile_drops_handlers_a_reload_removed() {
        let mut s = OverrideSpec::default();
        s.apply(Setter::SetOutboundHandler(h("readOnly")), "c", &class()).unwrap();
        let gone = ClassPolicy { handler_names: Default::default(), ..class() };
        let (o, dropped) = s.compile(&gone);
        assert!(o.outbound.is_none());
        assert_eq!(dropped, ["readOnly"]);
    }
}
