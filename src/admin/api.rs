//! Admin API routes (SPEC 7.3). Every answer is JSON; errors are `{"error", "code"}`.

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::policy::overrides::{HandlerSpec, Setter};
use crate::proxy::overrides::ApplyError;
use crate::proxy::state::Shared;

/// Most bytes an admin request body may have (`moat blob put` through a running instance
/// sends whole objects).
pub(super) const MAX_BODY: usize = 256 << 20;

/// An answer: status and JSON body (or Prometheus text for `/metrics`).
pub struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub content_type: std::borrow::Cow<'static, str>,
}

pub(super) fn json_answer(status: StatusCode, v: Value) -> Answer {
    Answer { status, body: format!("{v}\n").into_bytes(), content_type: "application/json".into() }
}

pub(super) fn error(status: StatusCode, code: &str, msg: impl Into<String>) -> Answer {
    json_answer(status, json!({ "error": msg.into(), "code": code }))
}

/// 401 for a TCP admin request without the right bearer token.
pub fn unauthorized() -> Answer {
    error(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <token from [admin] token_env>")
}

/// Routes one admin request.
pub async fn route(shared: &Shared, method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> Answer {
    let segments: Vec<String> = path.trim_matches('/').split('/').map(percent_decode).collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, segs.as_slice()) {
        (&Method::GET, ["metrics"]) => Answer {
            status: StatusCode::OK,
            body: shared.metrics.encode().into_bytes(),
            content_type: "text/plain; version=0.0.4".into(),
        },
        (&Method::GET, ["v1", "status"]) => json_answer(StatusCode::OK, status(shared)),
        (&Method::POST, ["v1", "reload"]) => {
            for (id, _) in shared.classes() {
                crate::proxy::reload::reload_class(shared, id);
            }
            json_answer(StatusCode::OK, status(shared))
        }
        (&Method::GET, ["v1", "containers"]) => {
            json_answer(StatusCode::OK, json!({ "containers": shared.overrides.containers() }))
        }
        (&Method::GET, ["v1", "containers", id]) => match crate::identity::ContainerId::parse(id) {
            Ok(_) => {
                let spec = shared.overrides.spec(id);
                let effective = effective_policy(shared, &spec);
                json_answer(StatusCode::OK, json!({ "id": id, "overrides": spec, "effective": effective }))
            }
            Err(e) => error(StatusCode::BAD_REQUEST, "bad_container_id", e.to_string()),
        },
        (_, ["v1", "kv", binding, rest @ ..]) => kv_route(shared, method, binding, rest, query, body),
        (_, ["v1", "blob", bucket, rest @ ..]) => {
            blob_route(shared, method, bucket, &rest.join("/"), query, body).await
        }
        (&Method::POST, ["v1", "containers", id, "intercepts"]) => intercept(shared, id, body, query),
        (&Method::GET, ["v1", "containers", id, "intercepts"]) => {
            json_answer(StatusCode::OK, json!({ "id": id, "intercepts": shared.overrides.intercepts_json(id) }))
        }
        (&Method::DELETE, ["v1", "containers", id, "intercepts"]) => {
            shared.overrides.clear_intercepts(id);
            json_answer(StatusCode::OK, json!({ "ok": true }))
        }
        (_, ["v1", "containers", id, rest @ ..]) => match setter_for(method, rest, body) {
            Ok(setter) => apply(shared, id, setter, query),
            Err(a) => a,
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", format!("no admin endpoint {method} {path}")),
    }
}

/// `moat kv` through a running instance (which holds the database open).
fn kv_route(
    shared: &Shared,
    method: &Method,
    binding: &str,
    rest: &[&str],
    query: Option<&str>,
    body: &[u8],
) -> Answer {
    let Some(store) = shared.bindings.kv.as_ref() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no_kv", "KV storage is not open");
    };
    if !shared.bindings.kv_names.iter().any(|n| n == binding) {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_binding",
            format!("no KV binding {binding:?} (have: {})", shared.bindings.kv_names.join(", ")),
        );
    }
    let table = crate::bindings::kv::kv_table(binding);
    let param = |name: &str| {
        query
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('='))))
            .map(percent_decode)
    };
    let failed = |e: crate::bindings::kv::KvError| match e {
        crate::bindings::kv::KvError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, "store", other.to_string()),
    };
    match (method, rest) {
        (&Method::GET, [] | [""]) => {
            let limit = param("limit").and_then(|l| l.parse().ok()).unwrap_or(crate::bindings::kv::MAX_LIST);
            let prefix = param("prefix").unwrap_or_default();
            match store.list(&table, prefix.as_bytes(), limit, param("cursor").as_deref()) {
                Ok(page) => {
                    let keys: Vec<Value> = page
                        .keys
                        .iter()
                        .map(|k| json!({"name": String::from_utf8_lossy(&k.name), "expiration": k.expiration, "metadata": k.metadata}))
                        .collect();
                    json_answer(
                        StatusCode::OK,
                        json!({"keys": keys, "list_complete": page.complete, "cursor": page.cursor}),
                    )
                }
                Err(e) => failed(e),
            }
        }
        (&Method::GET, [key]) => match store.get(&table, key.as_bytes()) {
            Ok(Some(e)) => {
                Answer { status: StatusCode::OK, body: e.value, content_type: "application/octet-stream".into() }
            }
            Ok(None) => error(StatusCode::NOT_FOUND, "no_such_key", format!("no key {key:?} in {binding}")),
            Err(e) => failed(e),
        },
        (&Method::PUT, [key]) => {
            let entry = crate::bindings::kv::Entry { value: body.to_vec(), expiration: None, metadata: None };
            match store.put(&table, key.as_bytes(), &entry) {
                Ok(()) => json_answer(StatusCode::OK, json!({"ok": true})),
                Err(e) => failed(e),
            }
        }
        (&Method::DELETE, [key]) => match store.delete(&table, key.as_bytes()) {
            Ok(()) => json_answer(StatusCode::OK, json!({"ok": true})),
            Err(e) => failed(e),
        },
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint {method} /v1/kv/{binding}/{}", rest.join("/")),
        ),
    }
}

/// `moat blob` through a running instance.
async fn blob_route(
    shared: &Shared,
    method: &Method,
    bucket: &str,
    key: &str,
    query: Option<&str>,
    body: &[u8],
) -> Answer {
    use crate::bindings::blob::BlobError;
    let Some(store) = shared.bindings.blob.as_ref() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no_blob", "blob storage is not open");
    };
    if !shared.bindings.blob_names.iter().any(|n| n == bucket) {
        let have = shared.bindings.blob_names.join(", ");
        return error(StatusCode::NOT_FOUND, "unknown_binding", format!("no bucket {bucket:?} (have: {have})"));
    }
    let failed = |e: BlobError| match e {
        BlobError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, "store", other.to_string()),
    };
    match (method, key) {
        (&Method::GET, "") => {
            let prefix = query
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("prefix=")))
                .map(percent_decode)
                .unwrap_or_default();
            let names: Vec<Value> = match store.list_all(bucket, &prefix).await {
                Ok(objects) => {
                    objects.into_iter().map(|o| json!({"key": o.key, "size": o.size, "etag": o.etag})).collect()
                }
                Err(e) => return failed(e),
            };
            json_answer(StatusCode::OK, json!({ "objects": names }))
        }
        (&Method::GET, key) => match store.get_bytes(bucket, key).await {
            Ok(Some(b)) => Answer { status: StatusCode::OK, body: b, content_type: "application/octet-stream".into() },
            Ok(None) => error(StatusCode::NOT_FOUND, "no_such_key", format!("no object {key:?} in {bucket}")),
            Err(e) => failed(e),
        },
        (&Method::PUT, key) => match store.put_bytes(bucket, key, body.to_vec()).await {
            Ok(m) => json_answer(StatusCode::OK, json!({"key": m.key, "size": m.size, "etag": m.etag})),
            Err(e) => failed(e),
        },
        (&Method::DELETE, key) => match store.of(bucket).delete(bucket, &[key.to_string()]).await {
            Ok(()) => json_answer(StatusCode::OK, json!({"ok": true})),
            Err(e) => failed(e),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", format!("no admin endpoint {method} /v1/blob/{bucket}/{key}")),
    }
}

fn status(shared: &Shared) -> Value {
    let classes: Vec<Value> = shared
        .classes()
        .map(|(_, c)| {
            let g = c.current();
            json!({
                "name": &*c.config.name,
                "policy": c.config.policy.display().to_string(),
                "listen": c.config.listen.to_string(),
                "generation": g.as_ref().map(|g| g.number),
                "lastError": c.last_error.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|e| e.to_string()),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node": &shared.config.stores.node,
        "uptimeSeconds": shared.started.elapsed().as_secs(),
        "classes": classes,
    })
}

/// What the decision order uses for a container with `spec`, per class (a container id may
/// reach any class's listener): its overrides where set, else the class's current script.
/// `outboundByHost` lists the per-host handlers in the order the decision order tries them
/// (the container's, step 3, before the class's, step 4).
fn effective_policy(shared: &Shared, spec: &crate::policy::overrides::OverrideSpec) -> Value {
    let handler = |h: &crate::policy::overrides::HandlerSpec| match &h.params {
        Some(p) => json!({ "handler": format!("outboundHandlers.{}", h.method), "params": p }),
        None => json!({ "handler": format!("outboundHandlers.{}", h.method) }),
    };
    let mut out = serde_json::Map::new();
    for (_, class) in shared.classes() {
        let Some(g) = class.current() else {
            out.insert(class.config.name.to_string(), json!({ "generation": null, "error": "policy not loaded" }));
            continue;
        };
        let p = &g.policy;
        let list = |over: &Option<Vec<String>>, class_list: &Option<crate::policy::HostList>| match (over, class_list) {
            (Some(l), _) => json!(l),
            (None, Some(l)) => json!(l.patterns().iter().map(|p| p.as_str()).collect::<Vec<_>>()),
            (None, None) => Value::Null,
        };
        let mut by_host: Vec<Value> = spec
            .outbound_by_host
            .iter()
            .map(|(host, h)| {
                let mut v = handler(h);
                v["host"] = json!(host);
                v["from"] = json!("container");
                v
            })
            .collect();
        by_host.extend(p.by_host.iter().map(|(k, _)| {
            json!({ "host": k.as_str(), "handler": format!("outboundByHost[\"{}\"]", k.as_str()), "from": "class" })
        }));
        let outbound = match (&spec.outbound_handler, p.has_outbound) {
            (Some(h), _) => handler(h),
            (None, true) => json!({ "handler": "outbound" }),
            (None, false) => Value::Null,
        };
        out.insert(
            class.config.name.to_string(),
            json!({
                "generation": g.number,
                "enableInternet": p.enable_internet,
                "interceptHttps": p.intercept_https,
                "allowedHosts": list(&spec.allowed_hosts, &p.allowed),
                "deniedHosts": list(&spec.denied_hosts, &p.denied),
                "outboundByHost": by_host,
                "outbound": outbound,
            }),
        );
    }
    Value::Object(out)
}

/// Maps a REST call to a setter (SPEC 7.3 paths).
fn setter_for(method: &Method, rest: &[&str], body: &[u8]) -> Result<Setter, Answer> {
    let parse = |what: &str| -> Result<Value, Answer> {
        serde_json::from_slice(body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_json", format!("{what}: invalid JSON body: {e}")))
    };
    let handler = |v: Value| -> Result<HandlerSpec, Answer> {
        match v {
            Value::String(method) => Ok(HandlerSpec { method, params: None }),
            other => serde_json::from_value(other).map_err(|e| {
                error(StatusCode::BAD_REQUEST, "bad_json", format!("expected {{\"method\": NAME, \"params\": …}}: {e}"))
            }),
        }
    };
    let list = |v: Value| -> Result<Vec<String>, Answer> {
        serde_json::from_value(v)
            .map_err(|_| error(StatusCode::BAD_REQUEST, "bad_json", "expected a JSON list of host patterns"))
    };
    let setter = match (method, rest) {
        (&Method::PUT, ["outbound-by-host", host]) => {
            Setter::SetOutboundByHost(host.to_string(), handler(parse("outbound-by-host")?)?)
        }
        (&Method::DELETE, ["outbound-by-host", host]) => Setter::RemoveOutboundByHost(host.to_string()),
        (&Method::PUT, ["outbound-by-hosts"]) => {
            let Value::Object(map) = parse("outbound-by-hosts")? else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    "expected {\"host\": NAME | {\"method\": NAME, \"params\": …}}",
                ));
            };
            let mut out = BTreeMap::new();
            for (host, v) in map {
                out.insert(host, handler(v)?);
            }
            Setter::SetOutboundByHosts(out)
        }
        (&Method::PUT, ["outbound-handler"]) => Setter::SetOutboundHandler(handler(parse("outbound-handler")?)?),
        (&Method::DELETE, ["outbound-handler"]) => Setter::RemoveOutboundHandler,
        (&Method::PUT, ["allowed-hosts"]) => Setter::SetAllowedHosts(list(parse("allowed-hosts")?)?),
        (&Method::PUT, ["denied-hosts"]) => Setter::SetDeniedHosts(list(parse("denied-hosts")?)?),
        (&Method::POST, ["allowed-hosts", host]) => Setter::AllowHost(host.to_string()),
        (&Method::DELETE, ["allowed-hosts", host]) => Setter::RemoveAllowedHost(host.to_string()),
        (&Method::POST, ["denied-hosts", host]) => Setter::DenyHost(host.to_string()),
        (&Method::DELETE, ["denied-hosts", host]) => Setter::RemoveDeniedHost(host.to_string()),
        (&Method::DELETE, ["overrides"]) => Setter::ClearOverrides,
        _ => {
            return Err(error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no admin endpoint {method} …/{}", rest.join("/")),
            ));
        }
    };
    Ok(setter)
}

fn apply(shared: &Shared, id: &str, setter: Setter, query: Option<&str>) -> Answer {
    let generation = match generation_for(shared, id, query) {
        Ok(g) => g,
        Err(a) => return a,
    };
    match shared.overrides.apply(id, setter, &generation) {
        Ok(spec) => json_answer(StatusCode::OK, json!({ "id": id, "overrides": spec })),
        Err(ApplyError::Setter(e)) => error(StatusCode::BAD_REQUEST, e.code(), e.to_string()),
        Err(ApplyError::Store(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string()),
    }
}

/// `POST /v1/containers/{id}/intercepts` `{"kind": "http"|"https"|"all", "target"?, "handler", "props"?}`.
fn intercept(shared: &Shared, id: &str, body: &[u8], query: Option<&str>) -> Answer {
    let generation = match generation_for(shared, id, query) {
        Ok(g) => g,
        Err(a) => return a,
    };
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let Some(kind) = v["kind"].as_str().and_then(crate::policy::intercepts::InterceptKind::parse) else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "kind: http, https or all");
    };
    let Some(method) = v["handler"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "handler: the name of an outboundHandlers entry");
    };
    let handler = HandlerSpec { method: method.to_string(), params: Some(v["props"].clone()).filter(|p| !p.is_null()) };
    match shared.overrides.intercept(id, kind, v["target"].as_str(), handler, &generation) {
        Ok(()) => json_answer(StatusCode::OK, json!({ "id": id, "intercepts": shared.overrides.intercepts_json(id) })),
        Err(e) => error(StatusCode::BAD_REQUEST, e.code(), e.to_string()),
    }
}

/// The current generation of the class a container's setter is validated against:
/// `?class=NAME`, else the only class.
fn generation_for(
    shared: &Shared,
    id: &str,
    query: Option<&str>,
) -> Result<std::sync::Arc<crate::script::Generation>, Answer> {
    if let Err(e) = crate::identity::ContainerId::parse(id) {
        return Err(error(StatusCode::BAD_REQUEST, "bad_container_id", e.to_string()));
    }
    let wanted = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("class=")));
    let class = match (wanted, shared.class_count()) {
        (Some(name), _) => shared.classes().map(|(_, c)| c).find(|c| &*c.config.name == name),
        (None, 1) => shared.classes().map(|(_, c)| c).next(),
        (None, _) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "class_required",
                "several classes are served: add ?class=NAME",
            ));
        }
    };
    let Some(class) = class else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "unknown_class",
            format!("no class {:?}", wanted.unwrap_or_default()),
        ));
    };
    class.current().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "policy_not_loaded",
            format!("class {} has no loaded policy", class.config.name),
        )
    })
}

/// `%2A.example.com` → `*.example.com`. Invalid escapes are kept as written.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        let escaped = (b[i] == b'%' && i + 2 < b.len()).then(|| Some((hex(b[i + 1])?, hex(b[i + 2])?))).flatten();
        if let Some((h, l)) = escaped {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
