//! `ctx` (SPEC 3): who a handler runs for. A userdata rather than a table: one allocation per
//! request, and fields are produced only when a script reads them.

use std::rc::Rc;

use mlua::{UserData, UserDataFields};

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
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("containerId", |lua, this| lua.create_string(&this.scope.container_id));
        f.add_field_method_get("className", |lua, this| lua.create_string(this.scope.class.as_bytes()));
        f.add_field_method_get("requestId", |lua, this| lua.create_string(&this.scope.request_id));
        f.add_field_method_get("storage", |_, this| {
            let store = this.storage.clone().ok_or_else(|| mlua::Error::runtime("ctx.storage is not available"))?;
            Ok(super::kv::LuaKv { table: crate::bindings::kv::storage_table(&this.scope.container_id), store })
        });
        f.add_field_method_get("params", |lua, this| match &this.params {
            Some(p) => super::json_to_lua(lua, p),
            None => Ok(mlua::Value::Nil),
        });
    }
}
