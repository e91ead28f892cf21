//! The one place that turns a failure or a deny into what the client sees (SPEC 9).

use http::{HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::policy::DenyReason;
use crate::script::HandlerFailure;
use crate::upstream::UpstreamError;

/// A plain-text answer from moat itself.
pub fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg: String = msg.into();
    if !msg.ends_with('\n') {
        msg.push('\n');
    }
    let mut r = Response::new(body::full(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Marks an answer after which the client connection closes: after a malformed request
/// moat cannot trust where the next one starts (SPEC 8.6, docs/runtime.md).
#[derive(Clone, Copy, Debug)]
pub struct CloseAfter;

/// 400 for a request moat cannot take (bad target, bad host), closing the connection.
pub fn bad_request(msg: impl Into<String>) -> Response<Body> {
    let mut r = text(StatusCode::BAD_REQUEST, msg);
    r.extensions_mut().insert(CloseAfter);
    r
}

/// Whether the connection must close after this answer.
pub fn closes_connection<B>(r: &Response<B>) -> bool {
    r.extensions().get::<CloseAfter>().is_some()
}

/// 520 `Origin is disallowed` with `moat-denied: <reason>` (SPEC 4.3).
pub fn denied(reason: DenyReason) -> Response<Body> {
    let mut r = text(StatusCode::from_u16(520).expect("520 is a valid status"), "Origin is disallowed");
    r.headers_mut().insert("moat-denied", HeaderValue::from_static(reason.as_str()));
    r
}

/// 407 asking for container credentials.
pub fn auth_required(msg: &str) -> Response<Body> {
    let mut r = text(StatusCode::PROXY_AUTHENTICATION_REQUIRED, format!("moat: {msg}"));
    r.headers_mut().insert(http::header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"moat\""));
    r
}

/// 503 while a class has no loaded generation (SPEC 8.8).
pub fn not_loaded() -> Response<Body> {
    text(StatusCode::SERVICE_UNAVAILABLE, "policy not loaded")
}

/// What the client sees when a handler fails; the detail goes to the log only.
pub fn handler_failure(f: &HandlerFailure, request_id: &str, handler_timeout: std::time::Duration) -> Response<Body> {
    match f {
        HandlerFailure::Timeout => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "moat: handler took longer than {handler_timeout:?} (limits.handler_timeout), request {request_id}"
            ),
        ),
        HandlerFailure::Upstream(_, fe) => upstream_failure(&fe.source),
        HandlerFailure::Store(m) => {
            text(StatusCode::SERVICE_UNAVAILABLE, format!("moat: {} (request {request_id})", crate::units::one_line(m)))
        }
        _ => text(StatusCode::INTERNAL_SERVER_ERROR, format!("policy handler error (request {request_id})")),
    }
}

/// The log detail of a handler failure.
pub fn handler_failure_detail(f: &HandlerFailure) -> String {
    match f {
        HandlerFailure::Error(m) => m.clone(),
        HandlerFailure::NotResponse(t) => format!("handler returned {t}, not a Response"),
        HandlerFailure::Cpu => "handler exceeded limits.lua_cpu".into(),
        HandlerFailure::Memory => "handler exceeded limits.lua_memory".into(),
        HandlerFailure::Timeout => "handler exceeded limits.handler_timeout".into(),
        HandlerFailure::Upstream(m, _) => m.clone(),
        HandlerFailure::Store(m) => m.clone(),
    }
}

/// 502/504/520 for an upstream failure, with a one-line reason.
pub fn upstream_failure(e: &UpstreamError) -> Response<Body> {
    match e {
        UpstreamError::Blocked { .. } | UpstreamError::Loop { .. } => denied(DenyReason::BlockedAddress),
        UpstreamError::ConnectTimeout { .. }
        | UpstreamError::TlsTimeout { .. }
        | UpstreamError::ResponseTimeout { .. } => text(StatusCode::GATEWAY_TIMEOUT, format!("moat: {e}")),
        _ => text(StatusCode::BAD_GATEWAY, format!("moat: {e}")),
    }
}
