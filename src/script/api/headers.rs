//! `Headers` (SPEC 3): a case-insensitive multimap shared by reference with its Request or
//! Response, so `request.headers:set(…)` changes the request.

use std::cell::{Ref, RefCell, RefMut};
use std::rc::Rc;

use http::{HeaderMap, HeaderName, HeaderValue};
use mlua::{Lua, MetaMethod, Result, Table, UserData, UserDataMethods, Value};

use super::meter::{Charge, header_bytes};

/// A Headers object; clones share the same map (and its charge).
#[derive(Clone, Default)]
pub struct LuaHeaders(Rc<Shared>);

#[derive(Default)]
struct Shared {
    map: RefCell<HeaderMap>,
    /// What the map holds, charged to the state's `lua_memory` (see [`super::meter`]).
    charge: Charge,
}

impl LuaHeaders {
    /// Headers made by a script: charged to its state.
    pub fn new(lua: &Lua, map: HeaderMap) -> Result<Self> {
        let headers = Self::uncharged(map);
        headers.charge_to(lua)?;
        Ok(headers)
    }

    fn uncharged(map: HeaderMap) -> Self {
        Self(Rc::new(Shared { map: RefCell::new(map), charge: Charge::default() }))
    }

    /// Charges the map to `lua`'s state (for headers made before the state was known).
    pub fn charge_to(&self, lua: &Lua) -> Result<()> {
        let bytes = header_bytes(&self.0.map.borrow());
        self.0.charge.add(lua, bytes)
    }

    /// The map, to read.
    pub fn map(&self) -> Ref<'_, HeaderMap> {
        self.0.map.borrow()
    }

    /// The map, to change (every holder of this Headers sees it).
    pub fn map_mut(&self) -> RefMut<'_, HeaderMap> {
        self.0.map.borrow_mut()
    }

    /// Headers parsed off a connection, made independent of its read buffer; not charged
    /// yet (see [`LuaHeaders::charge_to`]).
    ///
    /// A parser's header values are slices of the connection's read buffer. Lua frees a
    /// Request or Response only when its collector runs, and the collector counts only Lua's
    /// own memory (a few hundred bytes for such an object, not the buffer behind it): so the
    /// objects of each handler call kept a whole read buffer (8 KiB or more, client side and
    /// upstream side) alive until a collection, and made each connection allocate a new
    /// buffer for its next read. The values are copied into one small buffer of their own.
    pub fn detached(mut map: HeaderMap) -> Self {
        let total = map.values().map(HeaderValue::len).sum();
        let mut copy = bytes::BytesMut::with_capacity(total);
        for value in map.values() {
            copy.extend_from_slice(value.as_bytes());
        }
        let copy = copy.freeze();
        let mut at = 0;
        // `values_mut` visits the values in the same order as `values` above.
        for value in map.values_mut() {
            let end = at + value.len();
            if let Ok(mut own) = HeaderValue::from_maybe_shared(copy.slice(at..end)) {
                own.set_sensitive(value.is_sensitive());
                *value = own;
            }
            at = end;
        }
        Self::uncharged(map)
    }

    /// A copy of the map.
    pub fn snapshot(&self) -> HeaderMap {
        self.map().clone()
    }

    /// The map itself when nothing else shares it (a Request made for `fetch`), else a copy.
    pub fn into_map(self) -> HeaderMap {
        Rc::try_unwrap(self.0).map_or_else(|shared| shared.map.borrow().clone(), |own| own.map.into_inner())
    }
}

pub fn header_name(name: &str) -> Result<HeaderName> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| mlua::Error::runtime(format!("invalid header name {name:?}")))
}

pub fn header_value(name: &str, value: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(value).map_err(|_| mlua::Error::runtime(format!("invalid value for header {name:?}")))
}

/// Builds a map from a Lua value: nil, a Headers object, or a table of name → string (or a
/// list of strings for repeated headers).
pub fn headers_from_lua(value: &Value) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    match value {
        Value::Nil => {}
        Value::UserData(ud) => return Ok(ud.borrow::<LuaHeaders>()?.snapshot()),
        Value::Table(t) => {
            for pair in t.pairs::<String, Value>() {
                let (name, v) = pair?;
                let hn = header_name(&name)?;
                match v {
                    Value::Table(list) => {
                        for item in list.sequence_values::<String>() {
                            map.append(hn.clone(), header_value(&name, &item?)?);
                        }
                    }
                    other => {
                        let s = lua_to_header_string(&other)
                            .ok_or_else(|| mlua::Error::runtime(format!("header {name:?} must be a string")))?;
                        map.append(hn, header_value(&name, &s)?);
                    }
                }
            }
        }
        _ => return Err(mlua::Error::runtime("headers must be a table or a Headers object")),
    }
    Ok(map)
}

fn lua_to_header_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.to_str().ok()?.to_string()),
        Value::Integer(i) => Some(i.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The values of `name` joined by `", "`, as the Fetch API's `get` does.
fn joined(map: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut it = map.get_all(name).iter().peekable();
    it.peek()?;
    Some(it.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect::<Vec<_>>().join(", "))
}

impl UserData for LuaHeaders {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("get", |_, this, name: String| Ok(joined(&this.map(), &header_name(&name)?)));
        m.add_method("getAll", |lua, this, name: String| {
            let map = this.map();
            let values =
                map.get_all(header_name(&name)?).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            lua.create_sequence_from(values)
        });
        m.add_method("has", |_, this, name: String| Ok(this.map().contains_key(header_name(&name)?)));
        // A set or an append is charged whole; a delete gives nothing back until the object
        // goes (a map keeps its capacity too).
        m.add_method("set", |lua, this, (name, value): (String, String)| {
            let (n, v) = (header_name(&name)?, header_value(&name, &value)?);
            this.0.charge.add(lua, name.len() + value.len() + 32)?;
            this.map_mut().insert(n, v);
            Ok(())
        });
        m.add_method("append", |lua, this, (name, value): (String, String)| {
            let (n, v) = (header_name(&name)?, header_value(&name, &value)?);
            this.0.charge.add(lua, name.len() + value.len() + 32)?;
            this.map_mut().append(n, v);
            Ok(())
        });
        m.add_method("delete", |_, this, name: String| {
            this.map_mut().remove(header_name(&name)?);
            Ok(())
        });
        m.add_method("entries", |lua, this, ()| entries_iterator(lua, &this.map()));
        m.add_meta_method(MetaMethod::Pairs, |lua, this, ()| {
            let it = entries_iterator(lua, &this.map())?;
            Ok((it, Value::Nil, Value::Nil))
        });
    }
}

/// `for name, value in headers:entries()`: names sorted, repeated values joined (except
/// `set-cookie`, whose values are yielded one by one, as in the Fetch API).
fn entries_iterator(lua: &Lua, map: &HeaderMap) -> Result<mlua::Function> {
    let mut names: Vec<&HeaderName> = map.keys().collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut pairs: Vec<(String, String)> = Vec::new();
    for name in names {
        if name == http::header::SET_COOKIE {
            for v in map.get_all(name) {
                pairs.push((name.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()));
            }
        } else if let Some(v) = joined(map, name) {
            pairs.push((name.to_string(), v));
        }
    }
    let items: Table = lua.create_table_with_capacity(pairs.len(), 0)?;
    for (i, (n, v)) in pairs.into_iter().enumerate() {
        items.raw_set(i + 1, lua.create_sequence_from([n, v])?)?;
    }
    let index = std::cell::Cell::new(0usize);
    lua.create_function(move |_, ()| {
        let i = index.get() + 1;
        index.set(i);
        match items.raw_get::<Option<Table>>(i)? {
            Some(pair) => Ok((pair.raw_get::<Value>(1)?, pair.raw_get::<Value>(2)?)),
            None => Ok((Value::Nil, Value::Nil)),
        }
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::header::{ACCEPT, AUTHORIZATION, HOST};

    use super::*;

    #[test]
    fn detached_headers_do_not_hold_the_read_buffer() {
        // As a parser makes them: every value is a slice of the connection's read buffer.
        let head =
            "GET / HTTP/1.1\r\nhost: a.test\r\naccept: */*\r\naccept: text/html\r\nauthorization: s3cret\r\n\r\n";
        let buffer = Bytes::from(head.as_bytes().to_vec());
        let value = |v: &str| {
            let at = head.find(v).unwrap();
            HeaderValue::from_maybe_shared(buffer.slice(at..at + v.len())).unwrap()
        };
        let mut map = HeaderMap::new();
        map.insert(HOST, value("a.test"));
        map.append(ACCEPT, value("*/*"));
        map.append(ACCEPT, value("text/html"));
        let mut secret = value("s3cret");
        secret.set_sensitive(true);
        map.insert(AUTHORIZATION, secret);
        assert!(!buffer.is_unique());

        let headers = LuaHeaders::detached(map);
        assert!(buffer.is_unique(), "a header handed to Lua still holds the connection's read buffer");
        let map = headers.map();
        assert_eq!(map[HOST], "a.test");
        assert_eq!(map.get_all(ACCEPT).iter().collect::<Vec<_>>(), ["*/*", "text/html"]);
        assert_eq!(map[AUTHORIZATION], "s3cret");
        assert!(map[AUTHORIZATION].is_sensitive());
        assert_eq!(map.len(), 4);
    }
}
