//! Fixtures: what answers in place of the network during a test. A test registers answers
//! by host (`t.upstream("api.github.com", ...)`); every request that reaches an upstream is
//! recorded (`t.sent`) with the headers moat sent, after any injection. A request that no
//! fixture answers fails the test: it would have left the machine.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;

use super::text;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mlua::{Lua, Table, Value};

use crate::upstream::Target;
use crate::upstream::fixture::FixtureDialer;

/// Where every name resolves in a test unless its `hosts` says otherwise: an ordinary
/// public address (never dialled), so the address check lets egress through as it would
/// for a real host.
pub const ANY_NAME: IpAddr = IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4));

/// Most bytes of a request body a fixture reads.
const BODY_LIMIT: usize = 64 << 20;

/// One registered answer.
struct Route {
    /// Lower-case host, `*.suffix`, or `*`.
    host: String,
    /// Matches paths that start with it (empty: every path).
    path: String,
    answer: Value,
}

/// A test's fixtures and what reached them.
pub struct Fixtures {
    lua: Lua,
    routes: RefCell<Vec<Route>>,
    /// `t.sent`: every request that reached an upstream, in order.
    pub sent: Table,
    /// What went wrong outside the test's own assertions.
    pub failures: RefCell<Vec<String>>,
}

impl Fixtures {
    pub fn new(lua: &Lua) -> mlua::Result<Rc<Self>> {
        Ok(Rc::new(Self {
            lua: lua.clone(),
            routes: RefCell::default(),
            sent: lua.create_table()?,
            failures: RefCell::default(),
        }))
    }

    /// `t.upstream(match, answer)`: `match` is a host (`api.github.com`, `*.s3.amazonaws.com`,
    /// `*`), optionally followed by a path prefix (`api.github.com/repos/`).
    pub fn add(&self, matcher: &str, answer: Value) -> Result<(), String> {
        if !matches!(answer, Value::Function(_) | Value::Table(_) | Value::String(_)) {
            return Err(format!("t.upstream({matcher:?}, ...): answer with a function, a table or a string"));
        }
        let (host, path) = match matcher.find('/') {
            Some(i) => (&matcher[..i], &matcher[i..]),
            None => (matcher, ""),
        };
        let host = host.trim_start_matches("https://").trim_start_matches("http://").to_ascii_lowercase();
        self.routes.borrow_mut().push(Route { host, path: path.to_string(), answer });
        Ok(())
    }

    /// The most recently registered answer for `host` and `path`.
    fn find(&self, host: &str, path: &str) -> Option<Value> {
        let host = host.to_ascii_lowercase();
        self.routes
            .borrow()
            .iter()
            .rev()
            .find(|r| {
                let host_ok = match r.host.strip_prefix("*") {
                    Some("") => true,
                    Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
                    None => r.host == host,
                };
                host_ok && path.starts_with(&r.path)
            })
            .map(|r| r.answer.clone())
    }

    async fn answer(self: Rc<Self>, target: Target, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.clone().try_answer(target, req).await {
            Ok(resp) => resp,
            Err(message) => {
                let resp =
                    Response::builder().status(502).body(Full::new(Bytes::from(format!("moat test: {message}"))));
                self.failures.borrow_mut().push(message);
                resp.unwrap_or_default()
            }
        }
    }

    async fn try_answer(
        self: Rc<Self>,
        target: Target,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, String> {
        let (parts, body) = req.into_parts();
        let body = http_body_util::Limited::new(body, BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("reading the body moat sent upstream: {e}"))?
            .to_bytes();
        let authority = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map_or_else(|| target.authority(), str::to_string);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let url = format!("{}://{authority}{path}", target.scheme());
        let seen = self.lua.create_table().map_err(text)?;
        seen.set("method", parts.method.as_str()).map_err(text)?;
        seen.set("url", url.as_str()).map_err(text)?;
        seen.set("host", target.host.to_string()).map_err(text)?;
        seen.set("path", path.as_str()).map_err(text)?;
        seen.set("headers", header_table(&self.lua, &parts.headers).map_err(text)?).map_err(text)?;
        seen.set("body", self.lua.create_string(&body).map_err(text)?).map_err(text)?;
        self.sent.raw_push(seen.clone()).map_err(text)?;
        let host = target.host.to_string();
        let answer = self.find(&host, parts.uri.path()).ok_or_else(|| {
            format!(
                "{} {url} reached the network and no fixture answers it (add t.upstream(\"{host}\", ...))",
                parts.method
            )
        })?;
        let answer = match answer {
            Value::Function(f) => f
                .call_async::<Value>(seen)
                .await
                .map_err(|e| format!("the fixture for {url} failed: {}", first_line(&e)))?,
            other => other,
        };
        response_of(answer).map_err(|e| format!("the fixture for {url}: {e}"))
    }
}

/// `Fixtures` as the upstream client's dialer: each connection an in-memory HTTP/1.1 server.
pub struct Dialer(pub Rc<Fixtures>);

impl FixtureDialer for Dialer {
    fn dial(&self, target: &Target) -> Result<tokio::io::DuplexStream, String> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let fixtures = self.0.clone();
        let target = target.clone();
        tokio::task::spawn_local(async move {
            let service = hyper::service::service_fn(move |req| {
                let (fixtures, target) = (fixtures.clone(), target.clone());
                async move { Ok::<_, std::convert::Infallible>(fixtures.answer(target, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), service).await;
        });
        Ok(client)
    }

    fn address_of_any_name(&self) -> IpAddr {
        ANY_NAME
    }
}

/// Headers as a Lua table: lower-case name → value (repeated headers joined with ", ").
pub fn header_table(lua: &Lua, headers: &http::HeaderMap) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        t.set(name.as_str(), joined)?;
    }
    Ok(t)
}

/// A fixture's answer: a string (a 200 with that body) or `{ status, headers, body }`.
fn response_of(answer: Value) -> Result<Response<Full<Bytes>>, String> {
    let (status, headers, body) = match answer {
        Value::String(s) => (200, None, Bytes::copy_from_slice(&s.as_bytes())),
        Value::Table(t) => {
            let status: Option<u16> = t.get("status").map_err(text)?;
            let headers: Option<Table> = t.get("headers").map_err(text)?;
            let body: Option<mlua::LuaString> = t.get("body").map_err(text)?;
            (status.unwrap_or(200), headers, body.map(|b| Bytes::copy_from_slice(&b.as_bytes())).unwrap_or_default())
        }
        other => return Err(format!("answer with a string or a table, not {}", other.type_name())),
    };
    let mut resp = Response::builder().status(status);
    if let Some(headers) = headers {
        for pair in headers.pairs::<String, String>() {
            let (name, value) = pair.map_err(text)?;
            resp = resp.header(name, value);
        }
    }
    resp.body(Full::new(body)).map_err(text)
}

pub fn first_line(e: &mlua::Error) -> String {
    let mut cur = e;
    while let mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } = cur {
        cur = cause;
    }
    let text = cur.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("runtime error: ").unwrap_or(line).to_string()
}
