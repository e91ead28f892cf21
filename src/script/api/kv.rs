//! A KV namespace as Lua sees it (`env.KV`, `ctx.storage`): the Workers KV API, in Lua idiom.
//! Every call runs on tokio's blocking pool so that a redb commit never stalls the worker.

use std::sync::Arc;

use mlua::{Lua, LuaSerdeExt, Result, Table, UserData, UserDataMethods, Value};

use crate::bindings::kv::{Entry, KvError, KvStore, MAX_LIST, now_secs};

/// One namespace: a table of the store.
#[derive(Clone)]
pub struct LuaKv {
    pub table: String,
    pub store: Arc<KvStore>,
}

/// A storage failure travels as [`StoreUnavailable`] (a handler that does not catch it makes
/// moat answer 503); a mistake of the script's is a plain error.
fn lua_err(e: KvError) -> mlua::Error {
    match e {
        KvError::Storage(m) => mlua::Error::external(StoreUnavailable(format!("KV storage failed: {m}"))),
        other => mlua::Error::runtime(other.to_string()),
    }
}

/// A store that did not answer (down, unreachable, out of space).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreUnavailable(pub String);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, KvError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| mlua::Error::runtime(format!("KV task failed: {e}")))?
        .map_err(lua_err)
}

/// `"text"` (default), `"json"` or `"bytes"`, given as a string or `{type = …}`.
fn value_type(opts: &Value) -> Result<String> {
    let t = match opts {
        Value::Nil => None,
        Value::String(s) => Some(s.to_str()?.to_string()),
        Value::Table(t) => t.get::<Option<String>>("type")?,
        _ => return Err(mlua::Error::runtime("get: options must be a type string or {type = ...}")),
    };
    match t.as_deref() {
        None | Some("text") => Ok("text".into()),
        Some("json") | Some("bytes") => Ok(t.unwrap_or_default()),
        Some("arrayBuffer") | Some("stream") => Ok("bytes".into()),
        Some(other) => {
            Err(mlua::Error::runtime(format!("get: type must be \"text\", \"json\" or \"bytes\", not {other:?}")))
        }
    }
}

fn to_lua(lua: &Lua, value: &[u8], kind: &str) -> Result<Value> {
    match kind {
        "json" => super::natives::json_decode(lua, value),
        _ => Ok(Value::String(lua.create_string(value)?)),
    }
}

fn metadata_to_lua(lua: &Lua, m: &Option<serde_json::Value>) -> Result<Value> {
    match m {
        Some(m) => lua.to_value(m),
        None => Ok(Value::Nil),
    }
}

impl UserData for LuaKv {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_async_method("get", |lua, this, (key, opts): (mlua::LuaString, Value)| {
            let (kv, key, kind) = (this.clone(), key.as_bytes().to_vec(), value_type(&opts));
            async move {
                let kind = kind?;
                match read(kv, key).await? {
                    Some(e) => to_lua(&lua, &e.value, &kind),
                    None => Ok(Value::Nil),
                }
            }
        });
        m.add_async_method("getWithMetadata", |lua, this, (key, opts): (mlua::LuaString, Value)| {
            let (kv, key, kind) = (this.clone(), key.as_bytes().to_vec(), value_type(&opts));
            async move {
                let kind = kind?;
                match read(kv, key).await? {
                    Some(e) => Ok((to_lua(&lua, &e.value, &kind)?, metadata_to_lua(&lua, &e.metadata)?)),
                    None => Ok((Value::Nil, Value::Nil)),
                }
            }
        });
        m.add_async_method("put", |lua, this, (key, value, opts): (mlua::LuaString, Value, Option<Table>)| {
            let kv = this.clone();
            let key = key.as_bytes().to_vec();
            let entry = put_entry(&lua, value, opts);
            async move {
                let entry = entry?;
                blocking(move || kv.store.put(&kv.table, &key, &entry)).await
            }
        });
        m.add_async_method("delete", |_, this, key: mlua::LuaString| {
            let (kv, key) = (this.clone(), key.as_bytes().to_vec());
            async move { blocking(move || kv.store.delete(&kv.table, &key)).await }
        });
        m.add_async_method("list", |lua, this, opts: Option<Table>| {
            let kv = this.clone();
            let args = (|| -> Result<(Vec<u8>, usize, Option<String>)> {
                let Some(o) = opts else { return Ok((Vec::new(), MAX_LIST, None)) };
                let prefix =
                    o.get::<Option<mlua::LuaString>>("prefix")?.map(|s| s.as_bytes().to_vec()).unwrap_or_default();
                let limit = o.get::<Option<usize>>("limit")?.unwrap_or(MAX_LIST);
                Ok((prefix, limit, o.get::<Option<String>>("cursor")?))
            })();
            async move {
                let (prefix, limit, cursor) = args?;
                let page = blocking(move || kv.store.list(&kv.table, &prefix, limit, cursor.as_deref())).await?;
                let keys = lua.create_table_with_capacity(page.keys.len(), 0)?;
                for (i, k) in page.keys.iter().enumerate() {
                    let item = lua.create_table()?;
                    item.set("name", lua.create_string(&k.name)?)?;
                    if let Some(x) = k.expiration {
                        item.set("expiration", x)?;
                    }
                    item.set("metadata", metadata_to_lua(&lua, &k.metadata)?)?;
                    keys.raw_set(i + 1, item)?;
                }
                let out = lua.create_table()?;
                out.set("keys", keys)?;
                out.set("list_complete", page.complete)?;
                out.set("cursor", page.cursor)?;
                Ok(out)
            }
        });
    }
}

/// A read: from the cache when it knows the key, else from redb on the blocking pool.
async fn read(kv: LuaKv, key: Vec<u8>) -> Result<Option<Arc<Entry>>> {
    KvStore::validate_key(&key).map_err(lua_err)?;
    if let Some(hit) = kv.store.cached(&kv.table, &key) {
        return Ok(hit);
    }
    Ok(blocking(move || kv.store.get(&kv.table, &key)).await?.map(Arc::new))
}

fn put_entry(lua: &Lua, value: Value, opts: Option<Table>) -> Result<Entry> {
    let value = match value {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Integer(_) | Value::Number(_) => value.to_string()?.into_bytes(),
        other => return Err(mlua::Error::runtime(format!("put: value must be a string, not {}", other.type_name()))),
    };
    let mut entry = Entry { value, expiration: None, metadata: None };
    if let Some(o) = opts {
        if let Some(ttl) = o.get::<Option<f64>>("expirationTtl")? {
            if ttl.is_nan() || ttl < 1.0 {
                return Err(mlua::Error::runtime("put: expirationTtl must be at least 1 second"));
            }
            // Round up: an entry lives at least `expirationTtl` seconds, never less because
            // the clock was near the end of a second.
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            entry.expiration = Some((now + ttl).ceil() as u64);
        }
        if let Some(at) = o.get::<Option<f64>>("expiration")? {
            if at <= now_secs() as f64 {
                return Err(mlua::Error::runtime("put: expiration must be in the future (seconds since the epoch)"));
            }
            entry.expiration = Some(at as u64);
        }
        let meta: Value = o.get("metadata")?;
        if !meta.is_nil() {
            entry.metadata = Some(lua.from_value(meta)?);
        }
    }
    Ok(entry)
}
