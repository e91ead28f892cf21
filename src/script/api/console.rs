//! `console.log/info/warn/error` and `print`: log lines tagged with the request they ran for.

use mlua::{Lua, MultiValue, Result, Value};

use crate::script::scope;

pub fn install(lua: &Lua) -> Result<()> {
    let console = lua.create_table()?;
    for level in ["log", "info", "warn", "error", "debug"] {
        console.set(level, lua.create_function(move |lua, args: MultiValue| emit(lua, level, &args))?)?;
    }
    lua.globals().set("console", console)?;
    lua.globals().set("print", lua.create_function(|lua, args: MultiValue| emit(lua, "log", &args))?)
}

fn emit(lua: &Lua, level: &str, args: &MultiValue) -> Result<()> {
    let text = args.iter().map(|v| display(lua, v)).collect::<Vec<_>>().join(" ");
    let text = crate::log::redact(&text);
    let s = scope::current();
    let (req, container, class) = match &s {
        Some(s) => (s.request_id.as_str(), s.container_id.as_str(), &*s.class),
        None => ("-", "-", "-"),
    };
    match level {
        "error" => {
            tracing::error!(target: "moat::console", request_id = req, container = container, class = class, "{text}")
        }
        "warn" => {
            tracing::warn!(target: "moat::console", request_id = req, container = container, class = class, "{text}")
        }
        "debug" => {
            tracing::debug!(target: "moat::console", request_id = req, container = container, class = class, "{text}")
        }
        _ => tracing::info!(target: "moat::console", request_id = req, container = container, class = class, "{text}"),
    }
    Ok(())
}

fn display(lua: &Lua, v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string_lossy(),
        Value::Table(_) => crate::script::api::natives::json_encode(lua, v.clone()).unwrap_or_else(|_| "table".into()),
        other => other.to_string().unwrap_or_else(|_| other.type_name().to_string()),
    }
}
