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
    method: &Method,
    path: &str,
    body: &[u8],
) -> Option<Answer> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let l = lifecycle?;
    let answer = match (method, segs.as_slice()) {
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
            let mut v = answer_json(super::api::route(shared, method, path, None, body))?;
            v["records"] = json!(l.list());
            json_answer(StatusCode::OK, v)
        }
        (&Method::GET, ["v1", "containers", id]) => {
            let mut v = answer_json(super::api::route(shared, method, path, None, body))?;
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
