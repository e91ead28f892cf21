//! `Request` (SPEC 3).

use http::Method;
use mlua::{Lua, Result, Table, UserData, UserDataFields, UserDataMethods, Value};

use super::body::{BodySlot, SharedBody};
use super::headers::{LuaHeaders, headers_from_lua};
use super::meter::Charge;
use super::{add_body_methods, body_from_lua};

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
}

impl LuaRequest {
    /// A client's request for a handler, before its state is known (see
    /// [`LuaRequest::charge_to`]). Its redirects go back to the client: `manual`.
    pub fn incoming(method: Method, url: String, headers: LuaHeaders, body: SharedBody) -> Self {
        Self { method, url, headers, body, redirect: Redirect::Manual, charge: Charge::default() }
    }

    /// Charges what this request holds to `lua`'s state.
    pub fn charge_to(&self, lua: &Lua) -> Result<()> {
        self.headers.charge_to(lua)?;
        self.charge.add(lua, self.url.len())
    }

    fn made(
        lua: &Lua,
        method: Method,
        url: String,
        headers: LuaHeaders,
        body: SharedBody,
        redirect: Redirect,
    ) -> Result<Self> {
        let charge = Charge::new(lua, url.len())?;
        Ok(Self { method, url, headers, body, redirect, charge })
    }

    /// Copies a request: method, URL, headers copied; the body moved.
    fn copy(&self, lua: &Lua) -> Result<Self> {
        let headers = LuaHeaders::new(lua, self.headers.snapshot())?;
        Self::made(lua, self.method.clone(), self.url.clone(), headers, self.body.transfer()?, self.redirect)
    }

    /// `Request.new(input, init?)`.
    pub fn construct(lua: &Lua, input: Value, init: Option<Value>) -> Result<Self> {
        let from_url = |url: &str| -> Result<Self> {
            let body = SharedBody::new(BodySlot::Empty);
            Self::made(lua, Method::GET, absolute_url(url)?, LuaHeaders::default(), body, Redirect::Follow)
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
        if matches!(req.method, Method::GET | Method::HEAD) && !req.body.is_empty() && !req.body.is_used() {
            return Err(mlua::Error::runtime("Request.new: a GET or HEAD request cannot have a body"));
        }
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

/// Validates that `s` is an absolute http(s) URL and returns its serialisation.
pub fn absolute_url(s: &str) -> Result<String> {
    let u = url::Url::parse(s).map_err(|e| mlua::Error::runtime(format!("invalid URL {s:?}: {e}")))?;
    match u.scheme() {
        "http" | "https" => Ok(u.to_string()),
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
                (this.method.clone(), this.url.clone(), this.headers.snapshot(), this.redirect);
            drop(this);
            async move {
                let data = body.buffer(&lua, super::body_limit(&lua)).await?;
                let body = SharedBody::new(BodySlot::bytes(&lua, data)?);
                LuaRequest::made(&lua, method, url, LuaHeaders::new(&lua, headers)?, body, redirect)
            }
        });
    }
}
