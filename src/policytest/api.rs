//! The `t` a test function receives: `t.send{...}` through the engine, `t.upstream(...)`
//! fixtures, `t.sent`, `t.env` (the engine's own bindings: seed KV, read a bucket after),
//! `t.override(container, spec)`, `t.sleep(seconds)`, and the assertions `t.eq`, `t.contains`, `t.ok`.

use std::rc::Rc;

use bytes::Bytes;
use mlua::{Lua, Table, Value};

use super::client::{self, Outgoing};
use super::engine::Engine;
use super::fixtures::{Fixtures, header_table};
use crate::log::Logged;
use crate::policy::overrides::{OverrideSpec, Setter};

/// The assertions, in Lua so that a failure names the test file's line (`error(msg, 2)`).
const ASSERTIONS: &str = r#"
local t = ...
local function show(v)
  if type(v) == "string" then
    if #v > 200 then v = v:sub(1, 200) .. "..." end
    return string.format("%q", v)
  end
  if type(v) == "table" then
    local parts = {}
    for k, x in pairs(v) do parts[#parts + 1] = tostring(k) .. "=" .. (type(x) == "table" and "{...}" or show(x)) end
    table.sort(parts)
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  return tostring(v)
end
local function same(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end
local function prefix(label) return label and (label .. ": ") or "" end
function t.eq(actual, expected, label)
  if not same(actual, expected) then
    error(prefix(label) .. "expected " .. show(expected) .. ", got " .. show(actual), 2)
  end
end
function t.contains(text, part, label)
  if type(text) ~= "string" or not string.find(text, part, 1, true) then
    error(prefix(label) .. show(text) .. " does not contain " .. show(part), 2)
  end
end
function t.ok(value, label)
  if not value then error(prefix(label) .. "expected a true value, got " .. show(value), 2) end
end
"#;

/// Builds `t` for one test.
pub fn make(lua: &Lua, engine: &Rc<Engine>, fixtures: &Rc<Fixtures>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    lua.load(ASSERTIONS).set_name("=moat-test").call::<()>(t.clone())?;
    t.set("sent", fixtures.sent.clone())?;
    t.set("env", crate::script::api::env::env_table(lua, &engine.shared.bindings)?)?;
    let fx = fixtures.clone();
    t.set(
        "upstream",
        lua.create_function(move |_, (matcher, answer): (String, Value)| fx.add(&matcher, answer).map_err(err))?,
    )?;
    let (e, fx) = (engine.clone(), fixtures.clone());
    t.set(
        "send",
        lua.create_async_function(move |lua, spec: Table| {
            let (engine, fixtures) = (e.clone(), fx.clone());
            async move { send(&lua, &engine, &fixtures, spec).await }
        })?,
    )?;
    t.set(
        "sleep",
        lua.create_async_function(|_, seconds: f64| async move {
            tokio::time::sleep(std::time::Duration::from_secs_f64(seconds.clamp(0.0, 60.0))).await;
            Ok(())
        })?,
    )?;
    let e = engine.clone();
    t.set(
        "override",
        lua.create_function(move |lua, (container, spec): (String, Value)| {
            override_container(lua, &e, &container, spec)
        })?,
    )?;
    Ok(t)
}

/// `t.send{ url = ..., method?, headers?, body?, container? }` → `{ status, headers, body,
/// decision, detail, tunnelled }`.
async fn send(lua: &Lua, engine: &Engine, fixtures: &Fixtures, spec: Table) -> mlua::Result<Table> {
    let url: String = spec.get::<Option<String>>("url")?.ok_or_else(|| err("t.send: url is required"))?;
    let url = url::Url::parse(&url).map_err(|e| err(format!("t.send: url {url:?}: {e}")))?;
    let body: Option<mlua::LuaString> = spec.get("body")?;
    let method: Option<String> = spec.get("method")?;
    let method = method.as_deref().unwrap_or(if body.is_some() { "POST" } else { "GET" });
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| err(format!("t.send: method {method:?}")))?;
    let mut headers = Vec::new();
    if let Some(h) = spec.get::<Option<Table>>("headers")? {
        for pair in h.pairs::<String, String>() {
            headers.push(pair?);
        }
    }
    let container = spec.get::<Option<String>>("container")?.unwrap_or_else(|| "test".into());
    let what = format!("{method} {url}");
    let out = Outgoing {
        method,
        url,
        headers,
        body: body.map(|b| Bytes::copy_from_slice(&b.as_bytes())).unwrap_or_default(),
        container,
    };
    crate::log::capture::drain();
    let got = client::send(engine.addr, &engine.ca, out).await.map_err(|e| err(format!("t.send {what}: {e}")))?;
    // A tunnel's record is written as it closes, just after its client saw the end.
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let records = crate::log::capture::drain();
    let record = records.iter().rev().find(|r| r.method != "CONNECT").or(records.last());
    if let Some(name) = leaked_secret(&got) {
        fixtures.failures.borrow_mut().push(format!(
            "the response to {what} carries the value of secret {name} (set redactSecrets = true, or do not echo it)"
        ));
    }
    let result = lua.create_table()?;
    result.set("status", got.status)?;
    result.set("headers", header_table(lua, &got.headers)?)?;
    result.set("body", lua.create_string(&got.body)?)?;
    result.set("tunnelled", got.tunnelled)?;
    let decision = match record.map(|r| r.decision) {
        Some(Logged::Egress) if got.tunnelled => "tunnel",
        Some(d) => d.as_str(),
        None => "",
    };
    result.set("decision", decision)?;
    result.set("detail", record.map(|r| r.detail.clone()).unwrap_or_default())?;
    Ok(result)
}

/// The name of a secret whose value is anywhere in what the client got.
fn leaked_secret(got: &client::Received) -> Option<String> {
    let has = |hay: &[u8], needle: &str| {
        needle.len() >= crate::log::MIN_REDACTED_LEN && hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    };
    crate::log::secrets().into_iter().find_map(|(name, value)| {
        let in_headers =
            got.headers.iter().any(|(n, v)| has(n.as_str().as_bytes(), &value) || has(v.as_bytes(), &value));
        (in_headers || has(&got.body, &value)).then_some(name)
    })
}

/// `t.override(container, { allowedHosts = {...}, deniedHosts = {...}, outboundByHost = {...},
/// outboundHandler = {...} })`: what the admin API's PUTs would set.
fn override_container(lua: &Lua, engine: &Engine, container: &str, spec: Value) -> mlua::Result<()> {
    use mlua::LuaSerdeExt;
    let json: serde_json::Value = lua.from_value(spec)?;
    let spec: OverrideSpec = serde_json::from_value(json).map_err(|e| err(format!("t.override: {e}")))?;
    let generation = engine.shared.class(engine.class).current().ok_or_else(|| err("t.override: no policy loaded"))?;
    let mut setters = vec![Setter::ClearOverrides];
    setters.extend(spec.allowed_hosts.map(Setter::SetAllowedHosts));
    setters.extend(spec.denied_hosts.map(Setter::SetDeniedHosts));
    if !spec.outbound_by_host.is_empty() {
        setters.push(Setter::SetOutboundByHosts(spec.outbound_by_host));
    }
    setters.extend(spec.outbound_handler.map(Setter::SetOutboundHandler));
    for setter in setters {
        engine.shared.overrides.apply(container, setter, &generation).map_err(|e| err(format!("t.override: {e}")))?;
    }
    Ok(())
}

fn err(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(msg.into())
}
