//! A blob bucket as Lua sees it (`env.BUCKET`): the R2 API in Lua idiom. Bodies stream to and
//! from disk; nothing is buffered unless a script calls `:text()`/`:json()`/`:bytes()`.

use std::io::SeekFrom;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use mlua::{Lua, LuaSerdeExt, Result, Table, UserData, UserDataFields, UserDataMethods, Value};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt, ReadBuf};

use super::body::{BodyHandle, BodySlot, SharedBody};
use crate::bindings::blob::{BlobError, BlobStore, MAX_LIST, ObjectMeta, validate_key};
use crate::body::BoxError;

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

fn lua_err(e: BlobError) -> mlua::Error {
    mlua::Error::runtime(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, BlobError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| mlua::Error::runtime(format!("blob task failed: {e}")))?
        .map_err(lua_err)
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
                let meta = blocking(move || b.store.head(&b.bucket, &key)).await?;
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
            async move { get(b, key, range?).await }
        });
        m.add_async_method("put", |lua, this, (key, value, opts): (String, Value, Option<Table>)| {
            let b = this.clone();
            let prepared = prepare_put(&lua, &key, value, opts);
            async move {
                let (body, http_metadata, custom_metadata) = prepared?;
                let meta = put(&b, key, body, http_metadata, custom_metadata).await?;
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
                let store = b.store.clone();
                let bucket = b.bucket.clone();
                let removed = blocking(move || store.remove(&bucket, &keys)).await?;
                for m in removed {
                    let _ = tokio::fs::remove_file(b.store.bucket_dir(&b.bucket).join(&m.file)).await;
                }
                Ok(())
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
                let l =
                    blocking(move || b.store.list(&b.bucket, &prefix, limit, cursor.as_deref(), delimiter.as_deref()))
                        .await?;
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

type PutArgs =
    (crate::body::Body, serde_json::Map<String, serde_json::Value>, serde_json::Map<String, serde_json::Value>);

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
    let (http, custom) = match opts {
        Some(o) => (map(o.get("httpMetadata")?)?, map(o.get("customMetadata")?)?),
        None => Default::default(),
    };
    Ok((body, http, custom))
}

/// An upload's temporary file, removed unless the upload completed: a handler call cancelled
/// mid-upload (its timeout, the client gone) must not leave it behind.
struct Unfinished(Option<std::path::PathBuf>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn put(
    b: &LuaBucket,
    key: String,
    mut body: crate::body::Body,
    http_metadata: serde_json::Map<String, serde_json::Value>,
    custom_metadata: serde_json::Map<String, serde_json::Value>,
) -> Result<ObjectMeta> {
    let io = |e: std::io::Error| mlua::Error::runtime(format!("blob put {key:?}: {e}"));
    let dir = b.store.bucket_dir(&b.bucket);
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    let (file, tmp) = crate::bindings::blob::new_file_names(&key);
    let tmp = dir.join(tmp);
    let mut out = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut unfinished = Unfinished(Some(tmp.clone()));
    let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut size = 0u64;
    let written: std::result::Result<(), String> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(data) = frame.into_data() {
                hash.update(&data);
                size += data.len() as u64;
                out.write_all(&data).await.map_err(|e| e.to_string())?;
            }
        }
        out.sync_all().await.map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(mlua::Error::runtime(format!("blob put {key:?}: {e}")));
    }
    drop(out);
    tokio::fs::rename(&tmp, dir.join(&file)).await.map_err(io)?;
    unfinished.0 = None;
    let meta = ObjectMeta {
        key,
        size,
        etag: crate::bindings::blob::etag(hash.finish().as_ref()),
        uploaded: crate::bindings::blob::now_millis(),
        http_metadata,
        custom_metadata,
        file,
    };
    let (store, bucket, m) = (b.store.clone(), b.bucket.clone(), meta.clone());
    let old = blocking(move || store.commit(&bucket, &m)).await?;
    if let Some(old) = old {
        let _ = tokio::fs::remove_file(dir.join(old.file)).await;
    }
    Ok(meta)
}

async fn get(b: LuaBucket, key: String, range: Option<(u64, Option<u64>)>) -> Result<Option<LuaObject>> {
    // The metadata names the file of the current version; if a concurrent put replaced and
    // removed it between the two steps, read the metadata again.
    for _ in 0..3 {
        let (store, bucket, k) = (b.store.clone(), b.bucket.clone(), key.clone());
        let Some(meta) = blocking(move || store.head(&bucket, &k)).await? else { return Ok(None) };
        let path = b.store.bucket_dir(&b.bucket).join(&meta.file);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(mlua::Error::runtime(format!("blob get {key:?}: {e}"))),
        };
        let (offset, length) = match range {
            None => (0, meta.size),
            Some((off, len)) => {
                let off = off.min(meta.size);
                (off, len.unwrap_or(meta.size - off).min(meta.size - off))
            }
        };
        if offset > 0 {
            file.seek(SeekFrom::Start(offset)).await.map_err(|e| mlua::Error::runtime(e.to_string()))?;
        }
        let body = FileBody { file, remaining: length, buf: BytesMut::new() };
        let body = SharedBody::new(BodySlot::Stream(crate::body::boxed(body)));
        return Ok(Some(LuaObject { meta, body: Some(body) }));
    }
    Err(mlua::Error::runtime(format!("blob get {key:?}: the object kept changing; try again")))
}

/// Streams `remaining` bytes of a file in 64 KiB chunks.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: BytesMut,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = self.remaining.min(64 * 1024) as usize;
        let this = &mut *self;
        this.buf.resize(want, 0);
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err("blob file ended early".into())));
                }
                this.remaining -= n as u64;
                let chunk = this.buf.split_to(n).freeze();
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
}
