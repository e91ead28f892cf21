//! `Response` (SPEC 3).

use http::StatusCode;
use mlua::{Lua, Result, UserData, UserDataFields, UserDataMethods, Value};

use super::body::{BodySlot, SharedBody};
use super::headers::{LuaHeaders, headers_from_lua};
use super::meter::Charge;
use super::{add_body_methods, body_from_lua};
use crate::body::Body;

/// A Response as Lua sees it.
pub struct LuaResponse {
    pub status: StatusCode,
    pub status_text: String,
    pub headers: LuaHeaders,
    pub body: SharedBody,
    /// The URL it came from (`fetch`), else empty.
    pub url: String,
    /// The upstream response's extensions (for a `101`, the pending protocol switch), moved
    /// into the HTTP response when the handler returns this one.
    pub extensions: std::cell::RefCell<http::Extensions>,
    /// The URL and status text, charged to the state (and, for an upstream answer, what its
    /// connection holds while the body streams; see [`super::meter`]).
    pub charge: Charge,
}

impl LuaResponse {
    /// `Response.new(body?, init?)`. `init` is a table, or a Response whose status, status
    /// text and headers are copied (`Response.new(r.body, r)`, the Workers idiom for a
    /// changeable copy of a fetched response).
    pub fn construct(lua: &Lua, body: Value, init: Value) -> Result<Self> {
        let mut r = Self::empty(body_from_lua(lua, body)?);
        match init {
            Value::Nil => {}
            Value::Table(init) => {
                if let Some(code) = init.get::<Option<u16>>("status")? {
                    r.status = status(code)?;
                }
                if let Some(t) = init.get::<Option<String>>("statusText")? {
                    // RFC 9112 reason-phrase (the Fetch standard's check): no CR, LF or other
                    // control bytes, so the text can never break out of a status line.
                    if t.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                        return Err(mlua::Error::runtime(
                            "Response.new: statusText must not contain control characters",
                        ));
                    }
                    r.charge.add(lua, t.len())?;
                    r.status_text = t;
                }
                let headers: Value = init.get("headers")?;
                if !headers.is_nil() {
                    r.headers = LuaHeaders::new(lua, headers_from_lua(&headers)?)?;
                }
            }
            Value::UserData(ud) if ud.is::<LuaResponse>() => {
                let from = ud.borrow::<LuaResponse>()?;
                r.status = status(from.status.as_u16())?;
                r.charge.add(lua, from.status_text.len())?;
                r.status_text = from.status_text.clone();
                r.headers = LuaHeaders::new(lua, from.headers.snapshot())?;
            }
            other => {
                return Err(mlua::Error::runtime(format!(
                    "Response.new: init must be a table or a Response, not {}",
                    other.type_name()
                )));
            }
        }
        if (r.status == StatusCode::NO_CONTENT || r.status == StatusCode::NOT_MODIFIED) && !r.body.is_empty() {
            return Err(mlua::Error::runtime(format!("a {} response cannot have a body", r.status.as_u16())));
        }
        Ok(r)
    }

    /// A 200 with `body` and nothing else.
    pub fn empty(body: SharedBody) -> Self {
        Self {
            status: StatusCode::OK,
            status_text: String::new(),
            headers: LuaHeaders::default(),
            body,
            url: String::new(),
            extensions: Default::default(),
            charge: Charge::default(),
        }
    }

    /// The HTTP response sent to the client; the body moves out (a second take fails).
    pub fn take_http(&self) -> Result<http::Response<Body>> {
        let body = self.body.take()?;
        let mut resp = http::Response::new(body);
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.snapshot();
        *resp.extensions_mut() = self.extensions.take();
        Ok(resp)
    }
}

fn status(code: u16) -> Result<StatusCode> {
    if !(200..=599).contains(&code) {
        return Err(mlua::Error::runtime(format!("status must be 200-599, got {code}")));
    }
    StatusCode::from_u16(code).map_err(|_| mlua::Error::runtime(format!("invalid status {code}")))
}

/// Installs the `Response` global table.
pub fn install(lua: &Lua) -> Result<()> {
    let t = lua.create_table()?;
    t.set("new", lua.create_function(|lua, (body, init): (Value, Value)| LuaResponse::construct(lua, body, init))?)?;
    t.set(
        "json",
        lua.create_function(|lua, (value, init): (Value, Value)| {
            let text = super::natives::json_encode(lua, value)?;
            let r = LuaResponse::construct(lua, Value::String(lua.create_string(&text)?), init)?;
            if !r.headers.map().contains_key(http::header::CONTENT_TYPE) {
                r.headers
                    .map_mut()
                    .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            }
            Ok(r)
        })?,
    )?;
    t.set(
        "redirect",
        lua.create_function(|lua, (url, code): (String, Option<u16>)| {
            let code = code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&code) {
                return Err(mlua::Error::runtime(format!(
                    "redirect status must be 301, 302, 303, 307 or 308, got {code}"
                )));
            }
            let location = super::request::absolute_url(&url)?;
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::LOCATION, super::headers::header_value("location", &location)?);
            let mut r = LuaResponse::empty(SharedBody::new(BodySlot::Empty));
            r.status = status(code)?;
            r.headers = LuaHeaders::new(lua, headers)?;
            Ok(r)
        })?,
    )?;
    lua.globals().set("Response", t)
}

impl UserData for LuaResponse {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("status", |_, this| Ok(this.status.as_u16()));
        f.add_field_method_get("ok", |_, this| Ok(this.status.is_success()));
        f.add_field_method_get("statusText", |_, this| {
            Ok(if this.status_text.is_empty() {
                this.status.canonical_reason().unwrap_or("").to_string()
            } else {
                this.status_text.clone()
            })
        });
        f.add_field_method_get("headers", |_, this| Ok(this.headers.clone()));
        f.add_field_method_get("url", |_, this| Ok(this.url.clone()));
        f.add_field_method_get("redirected", |_, _| Ok(false));
        super::add_body_fields(f, |r: &Self| r.body.clone());
    }

    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        add_body_methods(m, |r: &Self| r.body.clone());
        m.add_async_method("clone", |lua, this, ()| {
            let body = this.body.clone();
            let (status, status_text, headers, url) =
                (this.status, this.status_text.clone(), this.headers.snapshot(), this.url.clone());
            drop(this);
            async move {
                let data = body.buffer(&lua, super::body_limit(&lua)).await?;
                let mut r = LuaResponse::empty(SharedBody::new(BodySlot::bytes(&lua, data)?));
                r.charge.add(&lua, status_text.len() + url.len())?;
                (r.status, r.status_text, r.url) = (status, status_text, url);
                r.headers = LuaHeaders::new(&lua, headers)?;
                Ok(r)
            }
        });
    }
}
