//! The container lifecycle endpoints (SPEC 7.3): start, signal, destroy, wait, and the
//! records in `GET /v1/containers[/{id}]`, over [`Lifecycle`] (the daemon's supervisor).

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::api::{Answer, error, json_answer};
use crate::lifecycle::{Lifecycle, LifecycleError, StartSpec, State};
use crate::proxy::state::Shared;

/// Answers a lifecycle request, or `None` for a path that is not one (the rest of the API).
pub async fn route(
    shared: &Shared,
    lifecycle: Option<&Arc<dyn Lifecycle>>,
    parts: &http::request::Parts,
    body: &bytes::Bytes,
) -> Option<Answer> {
    let (method, path) = (&parts.method, parts.uri.path());
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let l = lifecycle?;
    let answer = match (method, segs.as_slice()) {
        (_, ["v1", "containers", id, "ports", port, rest @ ..]) => {
            let Ok(port) = port.parse::<u16>() else {
                return Some(error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("port {port:?}: a number 1..65535"),
                ));
            };
            let target = match parts.uri.query() {
                Some(q) => format!("/{}?{q}", rest.join("/")),
                None => format!("/{}", rest.join("/")),
            };
            into_container(l, id, port, parts, &target, body.clone()).await
        }
        (&Method::POST, ["v1", "containers"]) => {
            let spec: StartSpec = match serde_json::from_slice(body) {
                Ok(s) => s,
                Err(e) => return Some(error(StatusCode::BAD_REQUEST, "bad_request", format!("start: {e}"))),
            };
            let l = l.clone();
            // Making a sandbox blocks (its init step's setup): not on the admin's runtime.
            match tokio::task::spawn_blocking(move || l.start(spec)).await {
                Ok(Ok(status)) => json_answer(StatusCode::CREATED, json!(status)),
                Ok(Err(e)) => failure(&e),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
            }
        }
        (&Method::GET, ["v1", "containers"]) => {
            let mut v = answer_json(super::api::route(shared, method, path, None, body).await)?;
            v["records"] = json!(l.list());
            json_answer(StatusCode::OK, v)
        }
        (&Method::GET, ["v1", "containers", id]) => {
            let mut v = answer_json(super::api::route(shared, method, path, None, body).await)?;
            v["lifecycle"] = json!(l.get(id));
            json_answer(StatusCode::OK, v)
        }
        (&Method::POST, ["v1", "containers", id, "signal"]) => {
            let number = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["signal"].as_i64());
            let Some(number) = number.and_then(|n| i32::try_from(n).ok()) else {
                return Some(error(StatusCode::BAD_REQUEST, "bad_request", "signal: send {\"signal\": N}"));
            };
            ok_or_failure(l.signal(id, number))
        }
        (&Method::DELETE, ["v1", "containers", id]) => {
            let message =
                serde_json::from_slice::<Value>(body).ok().and_then(|v| v["error"].as_str().map(str::to_string));
            ok_or_failure(l.destroy(id, message))
        }
        (&Method::GET, ["v1", "containers", id, "wait"]) => {
            let Some(mut rx) = l.watch(id) else { return Some(failure(&LifecycleError::NotFound(id.to_string()))) };
            // Blocks until it has ended (monitor()); the client may hang up meanwhile.
            let status = match rx.wait_for(|s| !s.running).await {
                Ok(s) => s.clone(),
                Err(_) => return Some(error(StatusCode::SERVICE_UNAVAILABLE, "stopping", "moat is stopping")),
            };
            match (&status.state, &status.error) {
                (State::Destroyed, Some(message)) => json_answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": message, "code": "destroyed", "exitCode": status.exit_code}),
                ),
                (State::Lost, _) => {
                    error(StatusCode::GONE, "lost", format!("container {id} was lost: moat stopped while it ran"))
                }
                _ => json_answer(StatusCode::OK, json!({"exitCode": status.exit_code, "state": status.state})),
            }
        }
        _ => return None,
    };
    Some(answer)
}

/// Whether `req` asks for raw TCP into a container: `Upgrade: tcp` on
/// `/v1/containers/{id}/ports/{port}`.
pub fn wants_tcp<B>(req: &http::Request<B>) -> bool {
    let upgrade = req.headers().get(http::header::UPGRADE).and_then(|v| v.to_str().ok());
    upgrade.is_some_and(|u| u.eq_ignore_ascii_case("tcp")) && tcp_target(req.uri().path()).is_some()
}

fn tcp_target(path: &str) -> Option<(String, u16)> {
    match path.trim_matches('/').split('/').collect::<Vec<_>>().as_slice() {
        ["v1", "containers", id, "ports", port] => Some((id.to_string(), port.parse().ok()?)),
        _ => None,
    }
}

/// The raw TCP variant of `getTcpPort`: `101 Switching Protocols`, then the admin
/// connection carries the bytes of a connection made inside the container, both ways.
pub async fn tcp_into_container(
    lifecycle: Option<&Arc<dyn Lifecycle>>,
    mut req: http::Request<hyper::body::Incoming>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let reply = |a: Answer| {
        http::Response::builder()
            .status(a.status)
            .header("content-type", a.content_type.as_ref())
            .body(http_body_util::Full::new(bytes::Bytes::from(a.body)))
            .expect("valid response")
    };
    let Some((id, port)) = tcp_target(req.uri().path()) else {
        return reply(error(StatusCode::NOT_FOUND, "not_found", "raw TCP: /v1/containers/{id}/ports/{port}"));
    };
    let Some(l) = lifecycle.cloned() else {
        return reply(error(StatusCode::NOT_FOUND, "not_found", "this moat runs no containers"));
    };
    // Refused before anything is promised: nobody on that port is a 502, not an empty tunnel.
    let stream = match tokio::task::spawn_blocking(move || l.connect(&id, port)).await {
        Ok(Ok(s)) => s,
        Ok(Err(LifecycleError::Failed(why))) => return reply(error(StatusCode::BAD_GATEWAY, "connect_failed", why)),
        Ok(Err(e)) => return reply(failure(&e)),
        Err(e) => return reply(error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
    };
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (Ok(client), Ok(mut inside)) = (upgraded.await, tokio::net::TcpStream::from_std(stream)) else { return };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut inside).await;
    });
    http::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "tcp")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("valid response")
}

/// `getTcpPort(port).fetch`: the request, sent over a connection moat asked the container's
/// init step for (made inside its network namespace), and the container's answer.
async fn into_container(
    l: &Arc<dyn Lifecycle>,
    id: &str,
    port: u16,
    parts: &http::request::Parts,
    target: &str,
    body: bytes::Bytes,
) -> Answer {
    let (l, owned_id) = (l.clone(), id.to_string());
    let stream = match tokio::task::spawn_blocking(move || l.connect(&owned_id, port)).await {
        Ok(Ok(s)) => s,
        Ok(Err(LifecycleError::Failed(why))) => return error(StatusCode::BAD_GATEWAY, "connect_failed", why),
        Ok(Err(e)) => return failure(&e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    };
    let failed = |e: &dyn std::fmt::Display| {
        error(StatusCode::BAD_GATEWAY, "container_failed", format!("port {port} of {id}: {e}"))
    };
    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else { return failed(&"no usable connection") };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return failed(&e),
    };
    tokio::spawn(conn);
    let mut headers = parts.headers.clone();
    crate::headers::strip_hop_by_hop(&mut headers);
    headers.insert(http::header::HOST, http::HeaderValue::from_static("container"));
    let mut request =
        match http::Request::builder().method(parts.method.clone()).uri(target).body(http_body_util::Full::new(body)) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        };
    *request.headers_mut() = headers;
    let response = match tokio::time::timeout(std::time::Duration::from_secs(30), sender.send_request(request)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return failed(&e),
        Err(_) => return failed(&"no answer within 30s"),
    };
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map_or("application/octet-stream".to_string(), str::to_string);
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(response.into_body(), super::api::MAX_BODY).collect().await {
        Ok(b) => Answer { status, body: b.to_bytes().to_vec(), content_type: content_type.into() },
        Err(e) => failed(&e),
    }
}

fn answer_json(a: Answer) -> Option<Value> {
    serde_json::from_slice(&a.body).ok()
}

fn ok_or_failure(r: Result<(), LifecycleError>) -> Answer {
    match r {
        Ok(()) => json_answer(StatusCode::OK, json!({"ok": true})),
        Err(e) => failure(&e),
    }
}

fn failure(e: &LifecycleError) -> Answer {
    let (status, code) = match e {
        LifecycleError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        LifecycleError::NotFound(_) => (StatusCode::NOT_FOUND, "no_such_container"),
        LifecycleError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        LifecycleError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "start_failed"),
    };
    error(status, code, e.to_string())
}
