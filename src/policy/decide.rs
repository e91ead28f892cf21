//! The decision order (SPEC 4.3): pure, synchronous, no I/O and no Lua.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use super::host::CanonicalHost;
use super::rules::{ByHost, HostList};

/// A class's policy as Rust data, compiled from the script's globals once per generation.
#[derive(Clone, Debug, Default)]
pub struct ClassPolicy {
    /// `enableInternet` (default true, as Cloudflare).
    pub enable_internet: bool,
    /// `interceptHttps` (default false).
    pub intercept_https: bool,
    /// `redactSecrets` (default false).
    pub redact_secrets: bool,
    /// `allowedHosts`; `None` means no gate.
    pub allowed: Option<HostList>,
    /// `deniedHosts`.
    pub denied: Option<HostList>,
    /// The keys of `outboundByHost`; the functions live in each worker's Lua state, found by key.
    pub by_host: ByHost<()>,
    /// Whether the script defines `outbound`.
    pub has_outbound: bool,
    /// The names in `outboundHandlers`, selectable at runtime.
    pub handler_names: BTreeSet<String>,
}

/// A runtime-selected handler: a name from `outboundHandlers` and its `ctx.params`.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedHandler {
    pub name: String,
    pub params: Option<serde_json::Value>,
}

/// One container's runtime overrides (SPEC 7.2). Each `None` falls back to the class.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub allowed: Option<HostList>,
    pub denied: Option<HostList>,
    pub by_host: ByHost<Arc<NamedHandler>>,
    pub outbound: Option<Arc<NamedHandler>>,
    /// What the container was started with ([`ContainerSettings`]), over the class's.
    pub settings: ContainerSettings,
    /// The seed's intercepts, for the container's life: before its per-host overrides
    /// (step 3) and its catch-all (step 5).
    pub intercepts: Intercepts,
}

/// A container's intercepts (`interceptOutboundHttp`, `interceptOutboundHttps`,
/// `interceptAllOutboundHttp`), compiled: each names an `outboundHandlers` entry.
#[derive(Clone, Debug, Default)]
pub struct Intercepts {
    /// Plain HTTP requests whose host (or IP, IP:port, CIDR) matches.
    pub http: ByHost<Arc<NamedHandler>>,
    /// HTTPS requests whose host matches; such TLS is intercepted whatever the class says.
    pub https: ByHost<Arc<NamedHandler>>,
    /// Every plain HTTP request.
    pub all: Option<Arc<NamedHandler>>,
}

/// What a container was started with that changes how it is decided: `moat run
/// --internet|--no-internet` and `--intercept-https` (Cloudflare's `start({enableInternet})`).
/// Kept for the container's life only, never persisted with its overrides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerSettings {
    /// `enableInternet` for this container; `None` is the class's.
    pub enable_internet: Option<bool>,
    /// `interceptHttps` for this container; `None` is the class's.
    pub intercept_https: Option<bool>,
}

impl ContainerSettings {
    /// Whether any setting differs from the class's.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The effective `enableInternet` (the container's setting if made, else the class's).
pub fn effective_internet(class: &ClassPolicy, inst: Option<&Overrides>) -> bool {
    inst.and_then(|o| o.settings.enable_internet).unwrap_or(class.enable_internet)
}

/// The effective `interceptHttps` for TLS to `host:port`: the container's setting if made,
/// else the class's; always when one of the container's HTTPS intercepts names the host.
pub fn effective_intercept(class: &ClassPolicy, inst: Option<&Overrides>, host: &CanonicalHost, port: u16) -> bool {
    inst.is_some_and(|o| o.intercepts.https.find(host, port).is_some())
        || inst.and_then(|o| o.settings.intercept_https).unwrap_or(class.intercept_https)
}

/// Why a request was denied; the value of the `moat-denied` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    DeniedHost,
    NotAllowed,
    InternetDisabled,
    /// The egress address check refused every address (SPEC 8.3); decided at dial time.
    BlockedAddress,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeniedHost => "denied-host",
            Self::NotAllowed => "not-allowed",
            Self::InternetDisabled => "internet-disabled",
            Self::BlockedAddress => "blocked-address",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which handler runs.
#[derive(Clone, Debug, PartialEq)]
pub enum HandlerChoice {
    /// Step 3: the container's `setOutboundByHost` override.
    InstanceByHost {
        /// The override's host pattern that matched.
        key: String,
        /// The handler it names, with its params.
        handler: Arc<NamedHandler>,
    },
    /// Step 4: the class's `outboundByHost[key]`.
    ClassByHost {
        /// The `outboundByHost` key that matched.
        key: String,
    },
    /// Step 5: the container's `setOutboundHandler` override.
    InstanceOutbound(Arc<NamedHandler>),
    /// Step 6: the class's `outbound`.
    ClassOutbound,
}

impl HandlerChoice {
    /// The name used in logs and `moat explain`.
    pub fn label(&self) -> String {
        // Joined without the formatting machinery: this is made on every handler call.
        let parts = match self {
            Self::InstanceByHost { handler, .. } | Self::InstanceOutbound(handler) => {
                ["outboundHandlers.", handler.name.as_str(), ""]
            }
            Self::ClassByHost { key } => ["outboundByHost[\"", key.as_str(), "\"]"],
            Self::ClassOutbound => ["outbound", "", ""],
        };
        let mut label = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        parts.iter().for_each(|p| label.push_str(p));
        label
    }

    /// `ctx.params`, for runtime-selected handlers.
    pub fn params(&self) -> Option<&serde_json::Value> {
        match self {
            Self::InstanceByHost { handler, .. } | Self::InstanceOutbound(handler) => handler.params.as_ref(),
            _ => None,
        }
    }
}

/// The outcome of the decision order.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Deny(DenyReason),
    Handler(HandlerChoice),
    Egress,
}

/// A decision and the step (1–9 of SPEC 4.3) that made it.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub step: u8,
    pub decision: Decision,
}

impl Verdict {
    fn new(step: u8, decision: Decision) -> Self {
        Self { step, decision }
    }

    /// A sentence saying which step decided and why, for `moat explain`.
    pub fn explain(&self) -> String {
        match (&self.step, &self.decision) {
            (1, _) => "step 1: host matches deniedHosts".into(),
            (2, _) => "step 2: allowedHosts is set and the host matches none of it".into(),
            (3, Decision::Handler(h)) => format!("step 3: container override setOutboundByHost → {}", h.label()),
            (4, Decision::Handler(h)) => format!("step 4: class {}", h.label()),
            (5, Decision::Handler(h)) => format!("step 5: container override setOutboundHandler → {}", h.label()),
            (6, _) => "step 6: class catch-all outbound".into(),
            (7, _) => "step 7: host passed allowedHosts → egress".into(),
            (8, _) => "step 8: enableInternet is true → egress".into(),
            (9, _) => "step 9: enableInternet is false and nothing else matched".into(),
            (n, d) => format!("step {n}: {d:?}"),
        }
    }
}

/// Runs the nine steps for one plain HTTP request.
pub fn decide(host: &CanonicalHost, port: u16, class: &ClassPolicy, inst: Option<&Overrides>) -> Verdict {
    decide_request(host, port, false, class, inst)
}

/// Runs the nine steps for one HTTP request, plain or (`https`) inside intercepted TLS.
pub fn decide_request(
    host: &CanonicalHost,
    port: u16,
    https: bool,
    class: &ClassPolicy,
    inst: Option<&Overrides>,
) -> Verdict {
    if let Some(v) = gate(host, port, class, inst) {
        return v;
    }
    let intercepts = inst.map(|o| &o.intercepts);
    let intercepted = intercepts.and_then(|i| if https { i.https.find(host, port) } else { i.http.find(host, port) });
    if let Some((key, handler)) = intercepted.or_else(|| inst.and_then(|o| o.by_host.find(host, port))) {
        let choice = HandlerChoice::InstanceByHost { key: key.as_str().to_string(), handler: handler.clone() };
        return Verdict::new(3, Decision::Handler(choice));
    }
    if let Some((key, ())) = class.by_host.find(host, port) {
        return Verdict::new(4, Decision::Handler(HandlerChoice::ClassByHost { key: key.as_str().to_string() }));
    }
    let catch_all = intercepts.and_then(|i| i.all.clone()).filter(|_| !https);
    if let Some(handler) = catch_all.or_else(|| inst.and_then(|o| o.outbound.clone())) {
        return Verdict::new(5, Decision::Handler(HandlerChoice::InstanceOutbound(handler)));
    }
    if class.has_outbound {
        return Verdict::new(6, Decision::Handler(HandlerChoice::ClassOutbound));
    }
    fallthrough(class, inst)
}

/// Steps 1, 2, 7, 8, 9 only: for TLS that is not intercepted and for raw tunnels, where no
/// handler can run (SPEC 4.3, last paragraph).
pub fn decide_tunnel(host: &CanonicalHost, port: u16, class: &ClassPolicy, inst: Option<&Overrides>) -> Verdict {
    gate(host, port, class, inst).unwrap_or_else(|| fallthrough(class, inst))
}

/// The effective `allowedHosts` (instance override if set, else class).
pub fn effective_allowed<'a>(class: &'a ClassPolicy, inst: Option<&'a Overrides>) -> Option<&'a HostList> {
    inst.and_then(|o| o.allowed.as_ref()).or(class.allowed.as_ref())
}

/// The effective `deniedHosts` (instance override if set, else class).
pub fn effective_denied<'a>(class: &'a ClassPolicy, inst: Option<&'a Overrides>) -> Option<&'a HostList> {
    inst.and_then(|o| o.denied.as_ref()).or(class.denied.as_ref())
}

/// Steps 1 and 2.
fn gate(host: &CanonicalHost, port: u16, class: &ClassPolicy, inst: Option<&Overrides>) -> Option<Verdict> {
    if effective_denied(class, inst).is_some_and(|d| d.matches(host, port)) {
        return Some(Verdict::new(1, Decision::Deny(DenyReason::DeniedHost)));
    }
    if effective_allowed(class, inst).is_some_and(|a| !a.matches(host, port)) {
        return Some(Verdict::new(2, Decision::Deny(DenyReason::NotAllowed)));
    }
    None
}

/// Steps 7, 8 and 9.
fn fallthrough(class: &ClassPolicy, inst: Option<&Overrides>) -> Verdict {
    if effective_allowed(class, inst).is_some() {
        Verdict::new(7, Decision::Egress)
    } else if effective_internet(class, inst) {
        Verdict::new(8, Decision::Egress)
    } else {
        Verdict::new(9, Decision::Deny(DenyReason::InternetDisabled))
    }
}
