//! The seed's low-level intercepts (SPEC 5.3): `interceptOutboundHttp(target, handler,
//! props?)`, `interceptOutboundHttps(hostOrGlob, handler, props?)` and
//! `interceptAllOutboundHttp(handler, props?)` on one container, for its life. As set
//! ([`InterceptSpec`], kept in memory only), then compiled for a generation ([`Intercepts`]):
//! runtime per-host overrides (step 3) and a catch-all (step 5) that come before the
//! container's stored overrides.

use std::sync::Arc;

use super::decide::{ClassPolicy, Intercepts, NamedHandler};
use super::overrides::{HandlerSpec, SetterError};
use super::pattern::HostPattern;
use super::rules::ByHost;

/// Which intercept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterceptKind {
    /// `interceptOutboundHttp(target, …)`: plain HTTP to a host, glob, IP, IP:port or CIDR.
    Http,
    /// `interceptOutboundHttps(hostOrGlob, …)`: HTTPS to a host (its TLS is intercepted).
    Https,
    /// `interceptAllOutboundHttp(…)`: every plain HTTP request.
    All,
}

impl InterceptKind {
    /// From the admin API's `kind` (`http`, `https`, `all`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(Self::Http),
            "https" => Some(Self::Https),
            "all" => Some(Self::All),
            _ => None,
        }
    }
}

/// A container's intercepts as set (the latest for a target wins).
#[derive(Clone, Debug, Default)]
pub struct InterceptSpec {
    http: Vec<(String, HandlerSpec)>,
    https: Vec<(String, HandlerSpec)>,
    all: Option<HandlerSpec>,
}

impl InterceptSpec {
    /// Adds one intercept; `target` is ignored for [`InterceptKind::All`]. The handler must
    /// be one of `class`'s `outboundHandlers`.
    pub fn add(
        &mut self,
        kind: InterceptKind,
        target: Option<&str>,
        handler: HandlerSpec,
        class_name: &str,
        class: &ClassPolicy,
    ) -> Result<(), SetterError> {
        if !class.handler_names.contains(&handler.method) {
            return Err(SetterError::UnknownHandler { method: handler.method, class: class_name.to_string() });
        }
        let list = match kind {
            InterceptKind::All => {
                self.all = Some(handler);
                return Ok(());
            }
            InterceptKind::Http => &mut self.http,
            InterceptKind::Https => &mut self.https,
        };
        let target = target.ok_or_else(|| SetterError::BadPattern("an intercept needs a target".into()))?;
        HostPattern::parse(target).map_err(|e| SetterError::BadPattern(e.to_string()))?;
        list.retain(|(t, _)| t != target);
        list.push((target.to_string(), handler));
        Ok(())
    }

    /// Whether none is set.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.https.is_empty() && self.all.is_none()
    }

    /// Compiled for `class` (handlers a reload removed are dropped).
    pub fn compile(&self, class: &ClassPolicy) -> Intercepts {
        let named = |h: &HandlerSpec| {
            class
                .handler_names
                .contains(&h.method)
                .then(|| Arc::new(NamedHandler { name: h.method.clone(), params: h.params.clone() }))
        };
        let by_host = |list: &[(String, HandlerSpec)]| {
            ByHost::new(list.iter().filter_map(|(t, h)| Some((HostPattern::parse(t).ok()?, named(h)?))).collect())
        };
        Intercepts { http: by_host(&self.http), https: by_host(&self.https), all: self.all.as_ref().and_then(named) }
    }

    /// As JSON, for the admin API.
    pub fn to_json(&self) -> serde_json::Value {
        let list = |l: &[(String, HandlerSpec)]| {
            l.iter().map(|(t, h)| serde_json::json!({"target": t, "handler": h})).collect::<Vec<_>>()
        };
        serde_json::json!({"http": list(&self.http), "https": list(&self.https), "all": self.all})
    }
}
