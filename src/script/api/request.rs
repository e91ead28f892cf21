//! `Request` (SPEC 3).

use http::Method;
use mlua::{Lua, Result, Table, UserData, UserDataFields, UserDataMethods, Value};

use super::body::{BodySlot, SharedBody};
use super::headers::{LuaHeaders, headers_from_lua};
use super::meter::Charge;
use super::{add_body_methods, body_from_lua};
use crate::policy::CanonicalHost;
use crate::upstream::Target;

/// What `fetch` does with a 3xx answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redirect {
    Follow,
    Manual,
}

/// A Request as Lua sees it. `headers` and `body` are shared handles.
pub struct LuaRequest {
    /// GET unless the script said otherwise.
    pub method: Method,
    /// Absolute URL: `scheme://host[:port]/path?query`.
    pub url: String,
    /// Shared with `request.headers`: changing one changes the other.
    pub headers: LuaHeaders,
    /// Shared with `request.body`.
    pub body: SharedBody,
    /// What `fetch` does with a 3xx (`redirect = "follow"|"manual"`).
    pub redirect: Redirect,
    /// The URL's bytes, charged to the state (headers and body carry their own charges).
    pub charge: Charge,
    /// Where `url` goes and its origin-form target, when known without parsing it again:
    /// moat made the URL from a routed request, or `Request.new` parsed it already. (`url`
    /// cannot be changed from Lua, so this stays true for the request's life.)
    pub parsed: Option<ParsedUrl>,
}

/// An absolute URL taken apart: the host and port it dials and its origin-form target.
#[derive(Clone, Debug)]
pub struct ParsedUrl {
    pub target: Target,
    /// `/path?query`.
    pub origin_form: String,
}

impl ParsedUrl {
    /// From a parsed http(s) URL.
    pub fn of(url: &url::Url) -> Result<Self> {
        let origin_form = url[url::Position::BeforePath..url::Position::AfterQuery].to_string();
        Ok(Self { target: target_of(url)?, origin_form })
    }
}

impl LuaRequest {
    /// A client's request for a handler, before its state is known (see
    /// [`LuaRequest::charge_to`]). Its redirects go back to the client: `manual`.
    pub fn incoming(method: Method, url: String, parsed: ParsedUrl, headers: LuaHeaders, body: SharedBody) -> Self {
        Self { method, url, headers, body, redirect: Redirect::Manual, charge: Charge::default(), parsed: Some(parsed) }
    }

    /// Charges what this request holds to `lua`'s state.
    pub fn charge_to(&self, lua: &Lua) -> Result<()> {
        self.headers.charge_to(lua)?;
        self.charge.add(lua, self.url.len())
    }

    fn made(
        lua: &Lua,
        method: Method,
        (url, parsed): (String, Option<ParsedUrl>),
        headers: LuaHeaders,
        body: SharedBody,
        redirect: Redirect,
    ) -> Result<Self> {
        let charge = Charge::new(lua, url.len())?;
        Ok(Self { method, url, headers, body, redirect, charge, parsed })
    }

    /// Copies a request: method, URL, headers copied; the body moved.
    fn copy(&self, lua: &Lua) -> Result<Self> {
        let headers = LuaHeaders::new(lua, self.headers.snapshot())?;
        let url = (self.url.clone(), self.parsed.clone());
        Self::made(lua, self.method.clone(), url, headers, self.body.transfer()?, self.redirect)
    }

    /// What `fetch(input, init?)` sends. A Request given as is (no `init`) is read directly:
    /// the copy a `Request.new` would make (a header object, its charges) lives only until
    /// fetch takes it apart, and cost about 2,000 instructions per fetch.
    pub fn outgoing(lua: &Lua, input: Value, init: Option<Value>) -> Result<Outgoing> {
        if let (Value::UserData(ud), None | Some(Value::Nil)) = (&input, &init)
            && let Ok(req) = ud.borrow::<LuaRequest>()
        {
            let body = req.body.transfer()?;
            check_body(&req.method, &body)?;
            return Ok(Outgoing {
                method: req.method.clone(),
                url: req.url.clone(),
                parsed: req.parsed.clone(),
                headers: req.headers.snapshot(),
                body,
                redirect: req.redirect,
            });
        }
        let LuaRequest { method, url, headers, body, redirect, parsed, .. } = Self::construct(lua, input, init)?;
        Ok(Outgoing { method, url, parsed, headers: headers.into_map(), body, redirect })
    }

    /// `Request.new(input, init?)`.
    pub fn construct(lua: &Lua, input: Value, init: Option<Value>) -> Result<Self> {
        let from_url = |url: &str| -> Result<Self> {
            let body = SharedBody::new(BodySlot::Empty);
            let parsed = parse_absolute(url)?;
            // A host fetch would refuse is refused by fetch, with its message, as before.
            let url = (parsed.to_string(), ParsedUrl::of(&parsed).ok());
            Self::made(lua, Method::GET, url, LuaHeaders::default(), body, Redirect::Follow)
        };
        let mut req = match input {
            Value::String(s) => from_url(&s.to_str()?)?,
            Value::UserData(ud) if ud.is::<LuaRequest>() => ud.borrow::<LuaRequest>()?.copy(lua)?,
            Value::UserData(ud) if ud.is::<super::url::LuaUrl>() => {
                from_url(&ud.borrow::<super::url::LuaUrl>()?.href())?
            }
            _ => return Err(mlua::Error::runtime("Request.new: input must be a URL string, URL or Request")),
        };
        match init {
            None | Some(Value::Nil) => {}
            Some(Value::Table(t)) => req.apply_init(lua, &t)?,
            Some(Value::UserData(ud)) if ud.is::<LuaRequest>() => {
                let other = ud.borrow::<LuaRequest>()?.copy(lua)?;
                req.method = other.method;
                req.headers = other.headers;
                req.body = other.body;
                req.redirect = other.redirect;
            }
            Some(_) => return Err(mlua::Error::runtime("Request.new: init must be a table")),
        }
        check_body(&req.method, &req.body)?;
        Ok(req)
    }

    fn apply_init(&mut self, lua: &Lua, init: &Table) -> Result<()> {
        if let Some(m) = init.get::<Option<String>>("method")? {
            self.method = Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| mlua::Error::runtime(format!("invalid method {m:?}")))?;
            // The Fetch standard's forbidden methods: CONNECT opens tunnels (not a request a
            // handler can make), TRACE/TRACK echo requests back, credentials included.
            if matches!(self.method.as_str(), "CONNECT" | "TRACE" | "TRACK") {
                return Err(mlua::Error::runtime(format!("method {} is not allowed in a Request", self.method)));
            }
        }
        let headers: Value = init.get("headers")?;
        if !headers.is_nil() {
            self.headers = LuaHeaders::new(lua, headers_from_lua(&headers)?)?;
        }
        let body: Value = init.get("body")?;
        if !body.is_nil() {
            self.body = body_from_lua(lua, body)?;
        }
        match init.get::<Option<String>>("redirect")?.as_deref() {
            None => {}
            Some("follow") => self.redirect = Redirect::Follow,
            Some("manual") => self.redirect = Redirect::Manual,
            Some(other) => {
                return Err(mlua::Error::runtime(format!("redirect must be \"follow\" or \"manual\", not {other:?}")));
            }
        }
        Ok(())
    }
}

/// A request on its way out through `fetch`: a [`LuaRequest`] taken apart.
pub struct Outgoing {
    pub method: Method,
    pub url: String,
    pub parsed: Option<ParsedUrl>,
    pub headers: http::HeaderMap,
    pub body: SharedBody,
    pub redirect: Redirect,
}

fn check_body(method: &Method, body: &SharedBody) -> Result<()> {
    if matches!(*method, Method::GET | Method::HEAD) && !body.is_empty() && !body.is_used() {
        return Err(mlua::Error::runtime("Request.new: a GET or HEAD request cannot have a body"));
    }
    Ok(())
}

/// Validates that `s` is an absolute http(s) URL and returns its serialisation.
pub fn absolute_url(s: &str) -> Result<String> {
    parse_absolute(s).map(String::from)
}

/// Parses `s` as an absolute http(s) URL.
fn parse_absolute(s: &str) -> Result<url::Url> {
    let u = url::Url::parse(s).map_err(|e| mlua::Error::runtime(format!("invalid URL {s:?}: {e}")))?;
    match u.scheme() {
        "http" | "https" => Ok(u),
        other => Err(mlua::Error::runtime(format!("unsupported URL scheme {other:?} (use http or https)"))),
    }
}

impl UserData for LuaRequest {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("method", |_, this| Ok(this.method.to_string()));
        f.add_field_method_get("url", |_, this| Ok(this.url.clone()));
        f.add_field_method_get("headers", |_, this| Ok(this.headers.clone()));
        f.add_field_method_get("redirect", |_, this| {
            Ok(if this.redirect == Redirect::Follow { "follow" } else { "manual" })
        });
        super::add_body_fields(f, |r: &Self| r.body.clone());
    }

    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        add_body_methods(m, |r: &Self| r.body.clone());
        m.add_async_method("clone", |lua, this, ()| {
            let body = this.body.clone();
            let (method, url, headers, redirect) =
                (this.method.clone(), (this.url.clone(), this.parsed.clone()), this.headers.snapshot(), this.redirect);
            drop(this);
            async move {
                let data = body.buffer(&lua, super::body_limit(&lua)).await?;
                let body = SharedBody::new(BodySlot::bytes(&lua, data)?);
                LuaRequest::made(&lua, method, url, LuaHeaders::new(&lua, headers)?, body, redirect)
            }
        });
    }
}

/// The host and port a URL dials (canonical, SPEC 4.1).
fn target_of(url: &url::Url) -> Result<Target> {
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        other => return Err(mlua::Error::runtime(format!("fetch: unsupported scheme {other:?}"))),
    };
    let host = url.host_str().ok_or_else(|| mlua::Error::runtime("fetch: URL has no host"))?;
    let host = CanonicalHost::parse(host).map_err(|e| mlua::Error::runtime(format!("fetch: {e}")))?;
    let port = url.port_or_known_default().unwrap_or(if https { 443 } else { 80 });
    Ok(Target { https, host, port })
}
