//! One request on the explicit listener: identify, find the target, decide, then deny, run
//! the handler, or egress (SPEC 4.3, 5.1, 8).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};

use super::answer;
use super::h1::RequestHead;
use super::state::{ClassId, Shared};
use super::target::{self, Pinned};
use super::worker::Worker;
use crate::body::Body;
use crate::identity::{self, AuthError, ContainerId};
use crate::log::Logged;
use crate::policy::{CanonicalHost, Decision, DenyReason, HandlerChoice, Overrides};
use crate::script::api::body::{BodySlot, SharedBody};
use crate::script::api::headers::LuaHeaders;
use crate::script::api::request::{LuaRequest, ParsedUrl};
use crate::script::{CallContext, ClassRuntime};
use crate::upstream::{self, DialRules, Target};

/// The access-log fields, filled in as the request travels.
#[derive(Default)]
pub struct LogLine {
    pub request_id: String,
    pub container: String,
    pub class: Arc<str>,
    pub generation: u64,
    pub method: http::Method,
    pub scheme: &'static str,
    /// Formatted only when the line is written (the access log is often filtered out).
    pub host: Option<CanonicalHost>,
    pub port: u16,
    pub path: String,
    pub decision: Logged,
    pub detail: String,
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
    /// The handler failed (for `moat_handler_errors_total`).
    pub handler_failed: bool,
}

impl LogLine {
    /// Adds what went wrong after the decision (a broken response body, a failed upgrade) to
    /// the detail, so the log line says why the client got less than the status promised.
    pub fn add_failure(&mut self, what: &str, e: &dyn std::fmt::Display) {
        use std::fmt::Write as _;
        let sep = if self.detail.is_empty() { "" } else { " " };
        let _ = write!(self.detail, "{sep}({what} failed: {e})");
    }

    /// Counts the request in the metrics.
    pub fn record(&self, m: &crate::metrics::Metrics) {
        m.count_request(&self.class, self.decision.as_str(), self.status);
        m.duration.observe(self.duration.as_secs_f64());
        if self.handler_failed {
            m.handler_errors.get_or_create(&crate::metrics::Metrics::class_label(&self.class)).inc();
        }
    }

    pub fn emit(&self) {
        if !crate::log::access_wanted() {
            return;
        }
        let host = self.host.as_ref().map(CanonicalHost::to_string).unwrap_or_default();
        crate::log::access(&crate::log::AccessRecord {
            request_id: &self.request_id,
            container: &self.container,
            class: &self.class,
            generation: self.generation,
            method: self.method.as_str(),
            scheme: self.scheme,
            host: &host,
            port: self.port,
            path: &self.path,
            decision: self.decision,
            detail: &self.detail,
            status: self.status,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration: self.duration,
        });
    }
}

/// The log line of a new request, before anything is known but who asked how.
pub fn new_log(worker: &Worker, class: ClassId, method: &http::Method, tunnel: Option<&Pinned>) -> LogLine {
    LogLine {
        request_id: worker.shared.next_request_id(),
        class: worker.shared.class(class).config.name.clone(),
        method: method.clone(),
        scheme: tunnel.map_or("http", |t| t.target.scheme()),
        ..Default::default()
    }
}

/// Runs one request with a log line the caller keeps: a caller that gives up on the request
/// (the client went away) still has what was decided so far to log.
pub async fn respond(
    worker: &Worker,
    class: ClassId,
    head: RequestHead,
    body: Body,
    tunnel: Option<&Pinned>,
    log: &mut LogLine,
) -> Response<Body> {
    let response = match run(worker, class, head, body, tunnel, log).await {
        Ok(answer) => answer,
        Err(stop) => *stop,
    };
    log.status = response.status().as_u16();
    response
}

/// What a phase that cannot go on answers instead (boxed: a response is large, and most
/// requests pass every phase).
type Stop = Box<Response<Body>>;

/// One request's path, phase by phase (as pingora's proxy names its phases): [`identify_phase`]
/// (whose is it), [`target_phase`] (where does it go), [`decide_phase`] (what does the policy
/// say), then exactly one of [`deny`], [`call_handler`] or [`egress`]. Nothing is dialled
/// before the decision.
async fn run(
    worker: &Worker,
    class: ClassId,
    head: RequestHead,
    body: Body,
    tunnel: Option<&Pinned>,
    log: &mut LogLine,
) -> Result<Response<Body>, Stop> {
    let container = identify_phase(worker, &head, tunnel, log)?;
    let (target, path) = target_phase(&head, tunnel, log, worker.shared.class(class).config.listen)?;
    let (decided, decision) = decide_phase(worker, class, &container, &target, log)?;
    let request = Routed { head, body, target, path, container };
    Ok(match decision {
        Decision::Deny(reason) => deny(reason, log),
        Decision::Handler(choice) => call_handler(worker, &decided, choice, request, log).await,
        Decision::Egress => egress(worker, &decided, request, log).await?,
    })
}

/// A request whose owner and target are known.
struct Routed {
    head: RequestHead,
    body: Body,
    target: Target,
    /// Origin-form path and query, as passed on.
    path: String,
    container: ContainerId,
}

/// The generation that decided, with the container's overrides: the request runs start to
/// end on the generation current when it arrived (SPEC 7.1), so its decision and its handler
/// come from the same runtime.
struct Decided {
    runtime: Rc<ClassRuntime>,
    overrides: Option<Arc<Overrides>>,
}

/// Marks the request refused before a decision and answers 400 with `msg`.
fn refuse(log: &mut LogLine, msg: String) -> Stop {
    log.decision = Logged::Error;
    log.detail = msg.clone();
    Box::new(answer::bad_request(format!("moat: {msg}")))
}

/// Who: the container id from Proxy-Authorization (SPEC 5.1), or the pinned connection's (a
/// tunnel's, a sandbox's: there Proxy-Authorization means nothing, and as a hop-by-hop header
/// it goes no further).
fn identify_phase(
    worker: &Worker,
    head: &RequestHead,
    tunnel: Option<&Pinned>,
    log: &mut LogLine,
) -> Result<ContainerId, Stop> {
    let identified = match tunnel {
        Some(t) => Ok(t.container.clone()),
        None => identify(&worker.shared, &head.headers),
    };
    match identified {
        Ok(id) => {
            log.container = id.to_string();
            Ok(id)
        }
        Err(e) => {
            log.decision = Logged::Error;
            log.detail = e.to_string();
            Err(Box::new(answer::auth_required(&e.to_string())))
        }
    }
}

/// Where: the absolute-form target, whose authority wins over Host (SPEC 8.2); inside a
/// tunnel, the tunnel's host (an absolute-form target must name that same authority).
fn target_phase(
    head: &RequestHead,
    tunnel: Option<&Pinned>,
    log: &mut LogLine,
    listener: std::net::SocketAddr,
) -> Result<(Target, String), Stop> {
    if head.method == http::Method::CONNECT {
        // Only reached inside a tunnel (the listener hands a CONNECT to `connect::serve`): a
        // tunnel reaches its one host, it does not open others.
        return Err(refuse(
            log,
            "CONNECT inside a tunnel is not allowed; send each CONNECT to the proxy itself".into(),
        ));
    }
    let parsed = match tunnel {
        Some(t) if t.named_by_request => target::transparent(t, head),
        Some(t) => target::tunnel(t, head),
        None => target::absolute(&head.target).and_then(|(t, path)| {
            if t.https {
                Err("https:// URLs go through CONNECT; set HTTPS_PROXY to this proxy".into())
            } else {
                Ok((t, path))
            }
        }),
    };
    let (target, path) = parsed.map_err(|msg| {
        let msg = if msg == target::NOT_ABSOLUTE {
            format!("{msg} (e.g. curl -x http://{listener} http://host/, or set http_proxy=http://{listener})")
        } else {
            msg
        };
        refuse(log, msg)
    })?;
    log.host = Some(target.host.clone());
    log.port = target.port;
    log.path = path.split('?').next().unwrap_or("/").to_string();
    Ok((target, path))
}

/// What: the decision order (SPEC 4.3) on the class's current generation and the
/// container's overrides.
fn decide_phase(
    worker: &Worker,
    class: ClassId,
    container: &ContainerId,
    target: &Target,
    log: &mut LogLine,
) -> Result<(Decided, Decision), Stop> {
    let Some(runtime) = worker.runtime(class) else {
        log.decision = Logged::Error;
        log.detail = "policy not loaded".into();
        return Err(Box::new(answer::not_loaded()));
    };
    let generation = &runtime.generation;
    log.generation = generation.number;
    let overrides = worker.shared.overrides.get(container.as_str(), generation);
    let verdict = crate::policy::decide_request(
        &target.host,
        target.port,
        target.https,
        &generation.policy,
        overrides.as_deref(),
    );
    Ok((Decided { runtime, overrides }, verdict.decision))
}

/// The policy denied it: a 520 that says why.
fn deny(reason: DenyReason, log: &mut LogLine) -> Response<Body> {
    log.decision = Logged::Deny;
    log.detail = reason.to_string();
    answer::denied(reason)
}

/// A handler answers: it sees the request with the URI's authority as Host and no proxy
/// credentials, and its answer goes back without hop-by-hop headers, redacted if asked.
async fn call_handler(
    worker: &Worker,
    decided: &Decided,
    choice: HandlerChoice,
    request: Routed,
    log: &mut LogLine,
) -> Response<Body> {
    let shared = &worker.shared;
    log.decision = Logged::Handler;
    log.detail = choice.label();
    if shared.memory.over() {
        log.detail = format!("{}: not called, moat is over limits.memory_ceiling", choice.label());
        return answer::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "moat: over its memory ceiling (limits.memory_ceiling); try again shortly",
        );
    }
    let Routed { head, body, target, path, container } = request;
    let mut headers = head.headers;
    crate::headers::strip_hop_by_hop_keep_upgrade(&mut headers);
    let authority = target.authority();
    if let Ok(v) = HeaderValue::from_str(&authority) {
        headers.insert(http::header::HOST, v);
    }
    let body =
        SharedBody::new(if http_body::Body::is_end_stream(&body) { BodySlot::Empty } else { BodySlot::Stream(body) });
    let mut url = String::with_capacity(target.scheme().len() + 3 + authority.len() + path.len());
    for part in [target.scheme(), "://", &authority, &path] {
        url.push_str(part);
    }
    let parsed = ParsedUrl { target, origin_form: path };
    let lua_req = LuaRequest::incoming(head.method, url, parsed, LuaHeaders::detached(headers), body);
    let who = CallContext { request_id: &log.request_id, container_id: container.as_str(), class: log.class.clone() };
    let limits = &shared.config.limits;
    let redact = decided.runtime.generation.policy.redact_secrets;
    match decided.runtime.call(&choice, lua_req, who, limits).await {
        Ok(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            crate::headers::strip_hop_by_hop_keep_upgrade(resp.headers_mut());
            if redact {
                super::redact::redact_upgrade_headers(resp.headers_mut());
            }
            resp
        }
        Ok(mut resp) => {
            crate::headers::strip_hop_by_hop(resp.headers_mut());
            redact_if(redact, resp)
        }
        Err(f) => {
            log.handler_failed = true;
            log.detail = format!("{}: {}", choice.label(), answer::handler_failure_detail(&f));
            tracing::warn!(target: "moat::handler", request_id = %log.request_id, container = %log.container, class = %log.class, "{}", crate::log::redact(&log.detail));
            answer::handler_failure(&f, &log.request_id, limits.handler_timeout)
        }
    }
}

/// Upstream: dialled under the effective host lists (the dial-time address check, SPEC 8.3),
/// and the answer relayed without hop-by-hop headers, redacted if asked.
async fn egress(
    worker: &Worker,
    decided: &Decided,
    request: Routed,
    log: &mut LogLine,
) -> Result<Response<Body>, Stop> {
    log.decision = Logged::Egress;
    let policy = &decided.runtime.generation.policy;
    let overrides = decided.overrides.as_deref();
    let rules = DialRules::Egress {
        allowed: crate::policy::decide::effective_allowed(policy, overrides),
        denied: crate::policy::decide::effective_denied(policy, overrides),
    };
    let Routed { head, body, target, path, .. } = request;
    let uri = http::Uri::try_from(path.as_str()).map_err(|e| refuse(log, format!("bad request target: {e}")))?;
    let mut headers = head.headers;
    if policy.redact_secrets {
        // A compressed body would hide a reflected secret from the redactor.
        headers.remove(http::header::ACCEPT_ENCODING);
    }
    let mut req = Request::new(body);
    *req.method_mut() = head.method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let req = upstream::to_upstream_request(req, &target);
    let resp = match worker.upstream.send(req, &target, rules).await {
        Ok(resp) => resp,
        Err(e) => {
            log.detail = e.to_string();
            return Ok(answer::upstream_failure(&e));
        }
    };
    let (mut parts, incoming) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        crate::headers::strip_hop_by_hop_keep_upgrade(&mut parts.headers);
        if policy.redact_secrets {
            super::redact::redact_upgrade_headers(&mut parts.headers);
        }
        return Ok(Response::from_parts(parts, crate::body::boxed(incoming)));
    }
    crate::headers::strip_hop_by_hop(&mut parts.headers);
    Ok(redact_if(policy.redact_secrets, Response::from_parts(parts, crate::body::boxed(incoming))))
}

/// Applies `redactSecrets` (SPEC 8.5) to what goes back to the container.
fn redact_if(enabled: bool, resp: Response<Body>) -> Response<Body> {
    if enabled { super::redact::redact_response(resp) } else { resp }
}

/// The container id, checked against `[containers]` tokens when the config lists any.
pub(super) fn identify(shared: &Shared, headers: &http::HeaderMap) -> Result<ContainerId, AuthError> {
    let mut given = headers.get_all(http::header::PROXY_AUTHORIZATION).iter();
    let creds = match (given.next(), given.next()) {
        (Some(v), None) => Some(identity::parse_proxy_authorization(v.as_bytes())?),
        (None, _) => None,
        // Two identities in one request: refuse rather than pick one.
        (Some(_), Some(_)) => return Err(AuthError::Repeated),
    };
    let auth = &shared.config.containers;
    if auth.is_empty() {
        return Ok(creds.map_or_else(ContainerId::default_id, |c| c.id));
    }
    let creds = creds.ok_or(AuthError::Missing)?;
    match (auth.get(&creds.id), &creds.token) {
        (Some(expected), Some(given)) if identity::constant_time_eq(expected.token.as_bytes(), given.as_bytes()) => {
            Ok(creds.id)
        }
        _ => Err(AuthError::WrongToken(creds.id.to_string())),
    }
}
