//! The lifecycle half of `moat.container(id)` (SPEC 5.3, Cloudflare's `ctx.container`):
//! `running`, `start{}`, `signal(n)`, `destroy(msg)`, `monitor()` and
//! `getTcpPort(port):fetch(...)`, over the daemon's [`Lifecycle`].

use std::collections::BTreeMap;
use std::sync::Arc;

use mlua::{Lua, LuaSerdeExt, Result, Table, UserData, UserDataFields, UserDataMethods, Value};

use super::request::LuaRequest;
use super::response::LuaResponse;
use crate::lifecycle::{Lifecycle, LifecycleError, StartSpec, State};

/// What the lifecycle methods need of `moat.container(id)`'s handle.
pub(super) trait Handle {
    fn id(&self) -> &str;
    /// The daemon's containers; `None` under `moat run`.
    fn lifecycle(&self) -> Option<Arc<dyn Lifecycle>>;
}

fn lifecycle<T: Handle>(this: &T) -> Result<Arc<dyn Lifecycle>> {
    this.lifecycle()
        .ok_or_else(|| mlua::Error::runtime("moat.container: starting and managing containers needs moat serve"))
}

fn lua_error(e: LifecycleError) -> mlua::Error {
    mlua::Error::runtime(e.to_string())
}

/// Runs blocking lifecycle work (making a sandbox, connecting inside one) off the worker.
async fn off_worker<T: Send + 'static>(
    work: impl FnOnce() -> std::result::Result<T, LifecycleError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(mlua::Error::external)?.map_err(lua_error)
}

pub(super) fn add_fields<T: Handle + 'static, F: UserDataFields<T>>(f: &mut F) {
    f.add_field_method_get("running", |_, this| Ok(lifecycle(this)?.get(this.id()).is_some_and(|s| s.running)));
}

pub(super) fn add_methods<T: Handle + 'static, M: UserDataMethods<T>>(m: &mut M) {
    // start{entrypoint = {...}, env = {...}, enableInternet = bool, class = ..., workdir = ...,
    //       memory = "256MiB", pids = 100}
    m.add_async_method("start", |lua, this, options: Table| async move {
        let l = lifecycle(&*this)?;
        for key in options.pairs::<String, mlua::Value>().map(|kv| kv.map(|(k, _)| k)) {
            let key = key?;
            if !START_OPTIONS.contains(&key.as_str()) {
                return Err(mlua::Error::runtime(format!(
                    "start: unknown option {key:?} (known: {})",
                    START_OPTIONS.join(", ")
                )));
            }
        }
        let spec = StartSpec {
            id: this.id().to_string(),
            class: options.get("class")?,
            entrypoint: options.get::<Option<Vec<String>>>("entrypoint")?.unwrap_or_default(),
            env: options.get::<Option<BTreeMap<String, String>>>("env")?.unwrap_or_default(),
            enable_internet: options.get("enableInternet")?,
            workdir: options.get("workdir")?,
            user: None,
            memory: memory_option(options.get("memory")?)?,
            pids: options.get("pids")?,
        };
        let status = off_worker(move || l.start(spec)).await?;
        lua.to_value(&status)
    });
    m.add_method("signal", |_, this, number: i32| lifecycle(this)?.signal(this.id(), number).map_err(lua_error));
    m.add_method("destroy", |_, this, message: Option<String>| {
        lifecycle(this)?.destroy(this.id(), message).map_err(lua_error)
    });
    // monitor(): waits for its end; its exit code, or an error with the destroy message.
    m.add_async_method("monitor", |_, this, ()| async move {
        let id = this.id().to_string();
        let mut rx = lifecycle(&*this)?.watch(&id).ok_or_else(|| lua_error(LifecycleError::NotFound(id.clone())))?;
        let status = rx.wait_for(|s| !s.running).await.map_err(|_| mlua::Error::runtime("moat is stopping"))?.clone();
        match (status.state, status.error) {
            (State::Destroyed, Some(message)) => Err(mlua::Error::runtime(message)),
            (State::Lost, _) => Err(mlua::Error::runtime(format!("container {id} was lost"))),
            _ => Ok(status.exit_code),
        }
    });
    m.add_method("getTcpPort", |_, this, port: u16| {
        Ok(TcpPort { id: this.id().to_string(), port, lifecycle: lifecycle(this)? })
    });
}

/// What `start{}` takes.
const START_OPTIONS: [&str; 7] = ["entrypoint", "env", "enableInternet", "class", "workdir", "memory", "pids"];

/// `start{memory = ...}`: bytes, or a size such as `"256MiB"`.
fn memory_option(value: mlua::Value) -> mlua::Result<Option<u64>> {
    match value {
        mlua::Value::Nil => Ok(None),
        // Too small a number is refused with the limits' own line.
        mlua::Value::Integer(n) => Ok(Some(u64::try_from(n).unwrap_or(0))),
        mlua::Value::String(s) => crate::units::size_arg(&s.to_str()?)
            .map(Some)
            .map_err(|e| mlua::Error::runtime(format!("start: memory {e}"))),
        other => Err(mlua::Error::runtime(format!(
            "start: memory must be a size such as \"256MiB\", not {}",
            other.type_name()
        ))),
    }
}

/// `getTcpPort(port)`: the container's port, reached inside its namespace.
struct TcpPort {
    id: String,
    port: u16,
    lifecycle: Arc<dyn Lifecycle>,
}

impl UserData for TcpPort {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        // fetch(input, init?): as `fetch`, but to this port of the container, whatever the
        // URL's host (the seed's `getTcpPort(8080).fetch("http://container/...")`).
        m.add_async_method("fetch", |lua, this, (input, init): (Value, Option<Value>)| async move {
            let req = LuaRequest::construct(&lua, input, init)?;
            let (l, id, port) = (this.lifecycle.clone(), this.id.clone(), this.port);
            let stream = off_worker(move || l.connect(&id, port)).await?;
            Box::pin(send(&lua, stream, req, &this.id, this.port)).await
        });
        // connect(body?): a raw connection to this port; `body` (a string or a `.body`
        // stream, e.g. the request's) is sent into it, then its write side is closed; what
        // comes back is a `.body` stream for `Response.new` (the seed's connect + pipeTo).
        m.add_async_method("connect", |lua, this, body: Value| async move {
            let outgoing = super::body_from_lua(&lua, body)?.take()?;
            let (l, id, port) = (this.lifecycle.clone(), this.id.clone(), this.port);
            let stream = off_worker(move || l.connect(&id, port)).await?;
            let stream = tokio::net::TcpStream::from_std(stream).map_err(mlua::Error::external)?;
            let (mut rd, mut wr) = stream.into_split();
            tokio::task::spawn_local(async move {
                use http_body_util::BodyExt;
                use tokio::io::AsyncWriteExt;
                let mut outgoing = outgoing;
                while let Some(Ok(frame)) = outgoing.frame().await {
                    if let Ok(data) = frame.into_data()
                        && wr.write_all(&data).await.is_err()
                    {
                        return;
                    }
                }
                let _ = wr.shutdown().await;
            });
            let (tx, incoming) = crate::body::ChannelBody::new(None);
            tokio::task::spawn_local(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) => return,
                        Ok(n) => {
                            if tx.send(Ok(bytes::Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
            });
            let slot = super::body::BodySlot::Stream(crate::body::boxed(incoming));
            Ok(super::body::BodyHandle(super::body::SharedBody::new(slot)))
        });
    }
}

/// Sends `req` over `stream` (HTTP/1.1) and answers with the container's response.
async fn send(lua: &Lua, stream: std::net::TcpStream, req: LuaRequest, id: &str, port: u16) -> Result<LuaResponse> {
    let failed = |e: &dyn std::fmt::Display| mlua::Error::runtime(format!("getTcpPort({port}) of {id}: {e}"));
    let LuaRequest { method, url, headers, body, .. } = req;
    let url = url::Url::parse(&url).map_err(mlua::Error::external)?;
    let origin_form = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let stream = tokio::net::TcpStream::from_std(stream).map_err(|e| failed(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| failed(&e))?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let mut headers = headers.into_map();
    crate::headers::strip_hop_by_hop(&mut headers);
    let host = url.host_str().unwrap_or("container").to_string();
    headers.insert(http::header::HOST, http::HeaderValue::from_str(&host).map_err(mlua::Error::external)?);
    let mut request = http::Request::new(body.take()?);
    *request.method_mut() = method;
    *request.uri_mut() = http::Uri::try_from(origin_form).map_err(mlua::Error::external)?;
    *request.headers_mut() = headers;
    let resp = sender.send_request(request).await.map_err(|e| failed(&e))?;
    super::fetch::response_from_upstream(lua, resp, url.to_string())
}
