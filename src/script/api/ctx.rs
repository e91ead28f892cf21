//! `ctx` (SPEC 3): who a handler runs for. A userdata rather than a table: one allocation per
//! request, and fields are produced only when a script reads them.

use std::rc::Rc;

use mlua::{MetaMethod, UserData, UserDataMethods, Value};

use crate::script::scope::Scope;

/// The `ctx` argument of a handler call.
pub struct LuaCtx {
    /// The call's scope, which holds the container id, class and request id.
    pub scope: Rc<Scope>,
    /// `ctx.params` for handlers chosen at runtime with params.
    pub params: Option<serde_json::Value>,
    /// The store behind `ctx.storage`.
    pub storage: Option<std::sync::Arc<crate::bindings::kv::KvStore>>,
}

impl UserData for LuaCtx {
    // One `__index` in Rust rather than field getters: mlua puts field getters behind an
    // `__index` written in Lua, which cost about 1,000 instructions more per field read.
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method(MetaMethod::Index, |lua, this, key: Value| {
            let unknown = |key: &Value| {
                let key = key.to_string().unwrap_or_else(|_| key.type_name().to_string());
                Err(mlua::Error::runtime(format!("attempt to get an unknown field '{key}'")))
            };
            let Some(name) = key.as_string() else { return unknown(&key) };
            match &*name.as_bytes() {
                b"containerId" => lua.create_string(&this.scope.container_id).map(Value::String),
                b"className" => lua.create_string(this.scope.class.as_bytes()).map(Value::String),
                b"requestId" => lua.create_string(&this.scope.request_id).map(Value::String),
                b"storage" => {
                    let store =
                        this.storage.clone().ok_or_else(|| mlua::Error::runtime("ctx.storage is not available"))?;
                    let table = crate::bindings::kv::storage_table(&this.scope.container_id);
                    lua.create_userdata(super::kv::LuaKv { table, store }).map(Value::UserData)
                }
                b"params" => match &this.params {
                    Some(p) => super::json_to_lua(lua, p),
                    None => Ok(Value::Nil),
                },
                _ => unknown(&key),
            }
        });
    }
}
