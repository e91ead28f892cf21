//! A blob bucket as Lua sees it (`env.BUCKET`): the R2 API in Lua idiom. Bodies stream to and
//! from the backend; nothing is buffered unless a script calls `:text()`/`:json()`/`:bytes()`.

use std::sync::Arc;

use bytes::Bytes;
use mlua::{Lua, LuaSerdeExt, Result, Table, UserData, UserDataFields, UserDataMethods, Value};

use super::body::{BodyHandle, BodySlot, SharedBody};
use crate::bindings::blob::{BlobError, BlobStore, ListQuery, MAX_LIST, ObjectMeta, PutMeta, validate_key};

/// One bucket.
#[derive(Clone)]
pub struct LuaBucket {
    pub bucket: String,
    pub store: Arc<BlobStore>,
}

/// An object (from `get`, with a body) or its metadata (`head`, `put`, `list`).
pub struct LuaObject {
    meta: ObjectMeta,
    body: Option<SharedBody>,
}

/// A storage failure travels as [`super::kv::StoreUnavailable`] (uncaught, moat answers
/// 503); a mistake of the script's is a plain error.
fn lua_err(e: BlobError) -> mlua::Error {
    match e {
        BlobError::Storage(m) => {
            mlua::Error::external(super::kv::StoreUnavailable(format!("blob storage failed: {m}")))
        }
        other => mlua::Error::runtime(other.to_string()),
    }
}

impl UserData for LuaObject {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("key", |_, this| Ok(this.meta.key.clone()));
        f.add_field_method_get("size", |_, this| Ok(this.meta.size));
        f.add_field_method_get("etag", |_, this| Ok(this.meta.etag.clone()));
        f.add_field_method_get("httpEtag", |_, this| Ok(format!("\"{}\"", this.meta.etag)));
        f.add_field_method_get("uploaded", |_, this| Ok(this.meta.uploaded));
        f.add_field_method_get("httpMetadata", |lua, this| lua.to_value(&this.meta.http_metadata));
        f.add_field_method_get("customMetadata", |lua, this| lua.to_value(&this.meta.custom_metadata));
        f.add_field_method_get("body", |_, this| Ok(this.body.clone().map(BodyHandle)));
        f.add_field_method_get("bodyUsed", |_, this| Ok(this.body.as_ref().is_some_and(|b| b.is_used())));
    }

    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        fn body_of(o: &LuaObject) -> SharedBody {
            o.body.clone().unwrap_or_else(|| SharedBody::new(BodySlot::Used))
        }
        super::add_body_methods(m, body_of);
    }
}

impl UserData for LuaBucket {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_async_method("head", |_, this, key: String| {
            let b = this.clone();
            async move {
                validate_key(&key).map_err(lua_err)?;
                let meta = b.store.of(&b.bucket).head(&b.bucket, &key).await.map_err(lua_err)?;
                Ok(meta.map(|meta| LuaObject { meta, body: None }))
            }
        });
        m.add_async_method("get", |_, this, (key, opts): (String, Option<Table>)| {
            let b = this.clone();
            let range = (|| -> Result<Option<(u64, Option<u64>)>> {
                let Some(r) = opts.map(|o| o.get::<Option<Table>>("range")).transpose()?.flatten() else {
                    return Ok(None);
                };
                let field = |name: &str| {
                    r.get::<Option<u64>>(name)
                        .map_err(|_| mlua::Error::runtime(format!("get: range.{name} must be a whole number ≥ 0")))
                };
                Ok(Some((field("offset")?.unwrap_or(0), field("length")?)))
            })();
            async move {
                let range = range?;
                validate_key(&key).map_err(lua_err)?;
                let found = b.store.of(&b.bucket).get(&b.bucket, &key, range).await.map_err(lua_err)?;
                Ok(found.map(|(meta, body)| LuaObject { meta, body: Some(SharedBody::new(BodySlot::Stream(body))) }))
            }
        });
        m.add_async_method("put", |lua, this, (key, value, opts): (String, Value, Option<Table>)| {
            let b = this.clone();
            let prepared = prepare_put(&lua, &key, value, opts);
            async move {
                let (body, meta) = prepared?;
                let meta = b.store.of(&b.bucket).put(&b.bucket, &key, body, meta).await.map_err(lua_err)?;
                Ok(LuaObject { meta, body: None })
            }
        });
        m.add_async_method("delete", |_, this, keys: Value| {
            let b = this.clone();
            let keys: Result<Vec<String>> = match keys {
                Value::String(s) => s.to_str().map(|k| vec![k.to_string()]),
                Value::Table(t) => t.sequence_values::<String>().collect(),
                _ => Err(mlua::Error::runtime("delete: pass a key or a list of keys")),
            };
            async move {
                let keys = keys?;
                keys.iter().try_for_each(|k| validate_key(k)).map_err(lua_err)?;
                b.store.of(&b.bucket).delete(&b.bucket, &keys).await.map_err(lua_err)
            }
        });
        m.add_async_method("list", |lua, this, opts: Option<Table>| {
            let b = this.clone();
            let args = (|| -> Result<(String, usize, Option<String>, Option<String>)> {
                let Some(o) = opts else { return Ok((String::new(), MAX_LIST, None, None)) };
                Ok((
                    o.get::<Option<String>>("prefix")?.unwrap_or_default(),
                    o.get::<Option<usize>>("limit")?.unwrap_or(MAX_LIST),
                    o.get::<Option<String>>("cursor")?,
                    o.get::<Option<String>>("delimiter")?,
                ))
            })();
            async move {
                let (prefix, limit, cursor, delimiter) = args?;
                let query = ListQuery { prefix, limit: limit.clamp(1, MAX_LIST), cursor, delimiter };
                let l = b.store.of(&b.bucket).list(&b.bucket, &query).await.map_err(lua_err)?;
                let objects = lua.create_table()?;
                for (i, meta) in l.objects.into_iter().enumerate() {
                    objects.raw_set(i + 1, LuaObject { meta, body: None })?;
                }
                let out = lua.create_table()?;
                out.set("objects", objects)?;
                out.set("delimitedPrefixes", lua.create_sequence_from(l.delimited_prefixes)?)?;
                out.set("truncated", l.truncated)?;
                out.set("cursor", l.cursor)?;
                Ok(out)
            }
        });
    }
}

type PutArgs = (crate::body::Body, PutMeta);

fn prepare_put(lua: &Lua, key: &str, value: Value, opts: Option<Table>) -> Result<PutArgs> {
    validate_key(key).map_err(lua_err)?;
    let body = match value {
        Value::String(s) => crate::body::full(Bytes::copy_from_slice(&s.as_bytes())),
        Value::UserData(ud) if ud.is::<BodyHandle>() => ud.borrow::<BodyHandle>()?.0.take()?,
        other => {
            return Err(mlua::Error::runtime(format!(
                "put: value must be a string or a .body stream, not {}",
                other.type_name()
            )));
        }
    };
    let map = |v: Value| -> Result<serde_json::Map<String, serde_json::Value>> {
        match v {
            Value::Nil => Ok(Default::default()),
            v => lua.from_value(v),
        }
    };
    let meta = match opts {
        Some(o) => {
            PutMeta { http_metadata: map(o.get("httpMetadata")?)?, custom_metadata: map(o.get("customMetadata")?)? }
        }
        None => PutMeta::default(),
    };
    Ok((body, meta))
}
