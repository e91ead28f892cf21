//! `URL` with WHATWG semantics (the `url` crate implements the WHATWG URL Standard).

use std::cell::RefCell;
use std::rc::Rc;

use mlua::{Lua, MetaMethod, Result, UserData, UserDataFields, UserDataMethods, Value};
use url::{Url, quirks};

use super::meter::Charge;

/// A URL; its `searchParams` share it (and its charge), so editing them edits the URL.
#[derive(Clone)]
pub struct LuaUrl(Rc<RefCell<Url>>, Rc<Charge>);

impl LuaUrl {
    pub fn href(&self) -> String {
        self.0.borrow().as_str().to_string()
    }
}

/// `url.searchParams`.
pub struct SearchParams {
    url: Rc<RefCell<Url>>,
    /// Kept for as long as the URL is held through its params.
    _charge: Rc<Charge>,
}

impl SearchParams {
    fn pairs(&self) -> Vec<(String, String)> {
        self.url.borrow().query_pairs().into_owned().collect()
    }

    fn replace(&self, pairs: &[(String, String)]) {
        let mut u = self.url.borrow_mut();
        if pairs.is_empty() {
            u.set_query(None);
        } else {
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
}

pub fn install(lua: &Lua) -> Result<()> {
    let t = lua.create_table()?;
    t.set(
        "new",
        lua.create_function(|lua, (input, base): (String, Option<Value>)| {
            let base = match base {
                None | Some(Value::Nil) => None,
                Some(Value::String(s)) => Some(parse(&s.to_str()?)?),
                Some(Value::UserData(ud)) => Some(ud.borrow::<LuaUrl>()?.0.borrow().clone()),
                Some(_) => return Err(mlua::Error::runtime("URL.new: base must be a string or URL")),
            };
            let url = match base {
                Some(b) => b.join(&input).map_err(|e| mlua::Error::runtime(format!("invalid URL {input:?}: {e}")))?,
                None => parse(&input)?,
            };
            // Charged as parsed; setters that lengthen it later are not.
            let charge = Charge::new(lua, url.as_str().len())?;
            Ok(LuaUrl(Rc::new(RefCell::new(url)), Rc::new(charge)))
        })?,
    )?;
    lua.globals().set("URL", t)
}

fn parse(s: &str) -> Result<Url> {
    Url::parse(s).map_err(|e| mlua::Error::runtime(format!("invalid URL {s:?}: {e}")))
}

macro_rules! url_prop {
    ($f:expr, $name:literal, $get:path, $set:path) => {
        $f.add_field_method_get($name, |_, this: &LuaUrl| Ok($get(&this.0.borrow()).to_string()));
        $f.add_field_method_set($name, |_, this: &mut LuaUrl, v: String| {
            // WHATWG setters ignore invalid input rather than throwing.
            let _ = $set(&mut this.0.borrow_mut(), &v);
            Ok(())
        });
    };
}

impl UserData for LuaUrl {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        url_prop!(f, "href", quirks::href, quirks::set_href);
        url_prop!(f, "protocol", quirks::protocol, quirks::set_protocol);
        url_prop!(f, "host", quirks::host, quirks::set_host);
        url_prop!(f, "hostname", quirks::hostname, quirks::set_hostname);
        url_prop!(f, "port", quirks::port, quirks::set_port);
        url_prop!(f, "pathname", quirks::pathname, quirks::set_pathname);
        url_prop!(f, "search", quirks::search, quirks::set_search);
        url_prop!(f, "hash", quirks::hash, quirks::set_hash);
        url_prop!(f, "username", quirks::username, quirks::set_username);
        url_prop!(f, "password", quirks::password, quirks::set_password);
        f.add_field_method_get("origin", |_, this| Ok(quirks::origin(&this.0.borrow())));
        f.add_field_method_get("searchParams", |_, this| {
            Ok(SearchParams { url: this.0.clone(), _charge: this.1.clone() })
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("toString", |_, this, ()| Ok(this.href()));
        m.add_meta_method(MetaMethod::ToString, |_, this, ()| Ok(this.href()));
        m.add_meta_method(MetaMethod::Eq, |_, this, other: mlua::UserDataRef<LuaUrl>| Ok(this.href() == other.href()));
    }
}

impl UserData for SearchParams {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("get", |_, this, name: String| {
            Ok(this.pairs().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v))
        });
        m.add_method("getAll", |lua, this, name: String| {
            lua.create_sequence_from(this.pairs().into_iter().filter(|(k, _)| *k == name).map(|(_, v)| v))
        });
        m.add_method("has", |_, this, name: String| Ok(this.pairs().iter().any(|(k, _)| *k == name)));
        m.add_method("append", |_, this, (name, value): (String, String)| {
            let mut pairs = this.pairs();
            pairs.push((name, value));
            this.replace(&pairs);
            Ok(())
        });
        m.add_method("set", |_, this, (name, value): (String, String)| {
            let mut pairs = this.pairs();
            match pairs.iter().position(|(k, _)| *k == name) {
                Some(i) => {
                    pairs[i].1 = value;
                    let mut seen = false;
                    pairs.retain(|(k, _)| *k != name || !std::mem::replace(&mut seen, true));
                }
                None => pairs.push((name, value)),
            }
            this.replace(&pairs);
            Ok(())
        });
        m.add_method("delete", |_, this, name: String| {
            let pairs: Vec<_> = this.pairs().into_iter().filter(|(k, _)| *k != name).collect();
            this.replace(&pairs);
            Ok(())
        });
        m.add_method("toString", |_, this, ()| Ok(this.url.borrow().query().unwrap_or("").to_string()));
        m.add_meta_method(MetaMethod::ToString, |_, this, ()| Ok(this.url.borrow().query().unwrap_or("").to_string()));
    }
}
