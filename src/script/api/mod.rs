//! The globals a policy script sees (SPEC 3): Request, Response, Headers, URL, fetch,
//! console. `ctx` and `env` are handler arguments, built in [`super::runtime`].

pub mod blob;
pub mod body;
pub mod console;
pub mod container;
pub mod ctx;
pub mod env;
pub mod fetch;
pub mod headers;
pub mod kv;
mod lifecycle;
pub mod meter;
pub mod natives;
pub mod request;
pub mod response;
pub mod url;

use std::rc::Rc;

use bytes::Bytes;
use mlua::{Lua, LuaSerdeExt, Result, UserData, UserDataFields, UserDataMethods, Value};

use body::{BodyHandle, BodySlot, SharedBody};
use headers::{LuaHeaders, headers_from_lua};
use request::LuaRequest;

use crate::upstream::Upstream;

/// What the API needs from its worker, stored as the state's app data.
pub struct ApiContext {
    /// `[limits] body_buffer`: most bytes `:text()`/`:json()`/`:bytes()` may read.
    pub body_buffer: usize,
    /// The policy sets `redactSecrets`: `fetch` asks upstreams for uncompressed bodies, which
    /// the redactor can read.
    pub redact_secrets: bool,
}

/// Installs every API global into a fresh state.
pub fn install(
    lua: &Lua,
    upstream: Option<Rc<Upstream>>,
    sink: Option<Rc<dyn container::OverrideSink>>,
    body_buffer: usize,
    memory_limit: usize,
) -> Result<()> {
    lua.set_app_data(ApiContext { body_buffer, redact_secrets: false });
    meter::Meter::install(lua, memory_limit)?;
    let g = lua.globals();
    let request = lua.create_table()?;
    request.set(
        "new",
        lua.create_function(|lua, (input, init): (Value, Option<Value>)| LuaRequest::construct(lua, input, init))?,
    )?;
    g.set("Request", request)?;
    let headers = lua.create_table()?;
    headers.set("new", lua.create_function(|lua, init: Value| LuaHeaders::new(lua, headers_from_lua(&init)?))?)?;
    g.set("Headers", headers)?;
    response::install(lua)?;
    url::install(lua)?;
    fetch::install(lua, upstream)?;
    console::install(lua)?;
    container::install(lua, sink)?;
    Ok(())
}

/// Marks this state's policy as one that redacts secrets in responses.
pub fn set_redact_secrets(lua: &Lua, on: bool) {
    if let Some(mut c) = lua.app_data_mut::<ApiContext>() {
        c.redact_secrets = on;
    }
}

/// Does this state's policy redact secrets in responses?
pub fn redacts_secrets(lua: &Lua) -> bool {
    lua.app_data_ref::<ApiContext>().is_some_and(|c| c.redact_secrets)
}

/// The body buffer limit of this state.
pub fn body_limit(lua: &Lua) -> usize {
    lua.app_data_ref::<ApiContext>().map_or(16 << 20, |c| c.body_buffer)
}

/// A body from Lua: nil, a string, or a `.body` handle (moved, not copied).
pub fn body_from_lua(lua: &Lua, v: Value) -> Result<SharedBody> {
    match v {
        Value::Nil => Ok(SharedBody::new(BodySlot::Empty)),
        Value::String(s) => Ok(SharedBody::new(BodySlot::bytes(lua, Bytes::copy_from_slice(&s.as_bytes()))?)),
        Value::UserData(ud) if ud.is::<BodyHandle>() => ud.borrow::<BodyHandle>()?.0.transfer(),
        other => {
            Err(mlua::Error::runtime(format!("body must be a string or a .body stream, not {}", other.type_name())))
        }
    }
}

/// `.body` and `.bodyUsed` for anything with a body.
pub fn add_body_fields<T: UserData + 'static, F: UserDataFields<T>>(f: &mut F, get: fn(&T) -> SharedBody) {
    f.add_field_method_get("bodyUsed", move |_, this| Ok(get(this).is_used()));
    f.add_field_method_get("body", move |_, this| {
        let body = get(this);
        Ok((!body.is_empty()).then(|| BodyHandle(body)))
    });
}

/// `:text()`, `:json()`, `:bytes()` for anything with a body.
pub fn add_body_methods<T: UserData + 'static, M: UserDataMethods<T>>(m: &mut M, get: fn(&T) -> SharedBody) {
    // A Lua string holds text and binary alike, so `text` and `bytes` are the same call.
    for name in ["text", "bytes"] {
        m.add_async_method(name, move |lua, this, ()| {
            let body = get(&this);
            drop(this);
            async move {
                let data = body.read_all(body_limit(&lua)).await?;
                lua.create_string(&data)
            }
        });
    }
    m.add_async_method("json", move |lua, this, ()| {
        let body = get(&this);
        drop(this);
        async move {
            let data = body.read_all(body_limit(&lua)).await?;
            natives::json_decode(&lua, &data)
        }
    });
}

/// A JSON value as a Lua value (for `ctx.params`).
pub fn json_to_lua(lua: &Lua, v: &serde_json::Value) -> Result<Value> {
    lua.to_value(v)
}
