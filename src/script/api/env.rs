//! The `env` table a policy's handlers receive (SPEC 6): `[vars]`, secrets, KV namespaces and
//! buckets, built from [`Bindings`] (the storage) for one Lua state.

use mlua::{Lua, Result, Table};

use crate::bindings::{Bindings, kv::kv_table};

/// Builds the `env` table for one Lua state.
pub fn env_table(lua: &Lua, bindings: &Bindings) -> Result<Table> {
    let env = lua.create_table()?;
    for (k, v) in &bindings.vars {
        env.set(k.as_str(), v.as_str())?;
    }
    for (k, v) in bindings.secret_values() {
        env.set(k, v)?;
    }
    if let Some(store) = &bindings.kv {
        for name in &bindings.kv_names {
            env.set(name.as_str(), super::kv::LuaKv { table: kv_table(name), store: store.clone() })?;
        }
    }
    if let Some(store) = &bindings.blob {
        for name in &bindings.blob_names {
            env.set(name.as_str(), super::blob::LuaBucket { bucket: name.clone(), store: store.clone() })?;
        }
    }
    // A name nothing declares is a mistake to point at where it is made, not a nil that fails
    // later as "attempt to concatenate a nil value".
    let meta = lua.create_table()?;
    meta.set(
        "__index",
        lua.create_function(|_, (_, name): (Table, mlua::Value)| -> Result<()> {
            let name = name.to_string().unwrap_or_else(|_| "?".into());
            Err(mlua::Error::runtime(format!(
                "env has no binding {name} (declare it in moat.toml: [secrets] {name} = {{ env = \"...\" }}, [vars], [kv] or [blob]; or set MOAT_SECRET_{name})"
            )))
        })?,
    )?;
    env.set_metatable(Some(meta))?;
    Ok(env)
}
