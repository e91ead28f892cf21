//! `ctx` (SPEC 3): who a handler runs for. A userdata rather than a table: one allocation per
//! request, and fields are produced only when a script reads them.

use mlua::{UserData, UserDataFields};

/// The `ctx` argument of a handler call.
pub struct LuaCtx {
    pub container_id: String,
    pub class: String,
    pub request_id: String,
    /// `ctx.params` for handlers chosen at runtime with params.
    pub params: Option<serde_json::Value>,
    /// The store behind `ctx.storage`.
    pub storage: Option<std::sync::Arc<crate::bindings::kv::KvStore>>,
}

impl UserData for LuaCtx {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("containerId", |_, this| Ok(this.container_id.clone()));
        f.add_field_method_get("className", |_, this| Ok(this.class.clone()));
        f.add_field_method_get("requestId", |_, this| Ok(this.request_id.clone()));
        f.add_field_method_get("storage", |_, this| {
            let store = this.storage.clone().ok_or_else(|| mlua::Error::runtime("ctx.storage is not available"))?;
            Ok(super::kv::LuaKv { table: crate::bindings::kv::storage_table(&this.container_id), store })
        });
        f.add_field_method_get("params", |lua, this| match &this.params {
            Some(p) => super::json_to_lua(lua, p),
            None => Ok(mlua::Value::Nil),
        });
    }
}
