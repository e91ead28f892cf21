//! `moat.container(id)`: change a container's policy from inside a handler (SPEC 7.2), e.g.
//! `moat.container(ctx.containerId):allowHost("api.github.com")`.

use std::collections::BTreeMap;
use std::rc::Rc;

use mlua::{Lua, LuaSerdeExt, Result, Table, UserData, UserDataMethods, Value};

use crate::identity::ContainerId;
use crate::policy::overrides::{HandlerSpec, Setter};

/// Where setters go: the override store of the running instance.
pub trait OverrideSink {
    /// Applies `setter` to `container`; the error is the user-facing message.
    fn apply(&self, container: &str, setter: Setter) -> std::result::Result<(), String>;

    /// Adds one of the seed's intercepts for `container`; the error is the user-facing message.
    fn intercept(
        &self,
        container: &str,
        kind: crate::policy::intercepts::InterceptKind,
        target: Option<&str>,
        handler: HandlerSpec,
    ) -> std::result::Result<(), String> {
        let _ = (container, kind, target, handler);
        Err("intercepts need a running moat".into())
    }

    /// The daemon's containers, for the lifecycle methods (none under `moat run`).
    fn lifecycle(&self) -> Option<std::sync::Arc<dyn crate::lifecycle::Lifecycle>> {
        None
    }
}

/// The handle `moat.container(id)` returns.
struct LuaContainer {
    id: String,
    sink: Rc<dyn OverrideSink>,
}

impl super::lifecycle::Handle for LuaContainer {
    fn id(&self) -> &str {
        &self.id
    }

    fn lifecycle(&self) -> Option<std::sync::Arc<dyn crate::lifecycle::Lifecycle>> {
        self.sink.lifecycle()
    }
}

pub fn install(lua: &Lua, sink: Option<Rc<dyn OverrideSink>>) -> Result<()> {
    let moat = lua.create_table()?;
    moat.set(
        "container",
        lua.create_function(move |_, id: String| {
            ContainerId::parse(&id).map_err(|e| mlua::Error::runtime(format!("moat.container: {e}")))?;
            let sink =
                sink.clone().ok_or_else(|| mlua::Error::runtime("moat.container can only be used inside handlers"))?;
            Ok(LuaContainer { id, sink })
        })?,
    )?;
    lua.globals().set("moat", moat)
}

fn handler(lua: &Lua, name: String, params: Value) -> Result<HandlerSpec> {
    let params = if params.is_nil() { None } else { Some(lua.from_value::<serde_json::Value>(params)?) };
    Ok(HandlerSpec { method: name, params })
}

fn strings(t: Table) -> Result<Vec<String>> {
    t.sequence_values::<String>().collect()
}

impl UserData for LuaContainer {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        fn run(this: &LuaContainer, setter: Setter) -> Result<()> {
            this.sink.apply(&this.id, setter).map_err(mlua::Error::runtime)
        }
        m.add_method("setOutboundHandler", |lua, this, (name, params): (String, Value)| {
            run(this, Setter::SetOutboundHandler(handler(lua, name, params)?))
        });
        m.add_method("setOutboundByHost", |lua, this, (host, name, params): (String, String, Value)| {
            run(this, Setter::SetOutboundByHost(host, handler(lua, name, params)?))
        });
        m.add_method("setOutboundByHosts", |lua, this, map: Table| {
            let mut out = BTreeMap::new();
            for pair in map.pairs::<String, Value>() {
                let (host, v) = pair?;
                let spec = match v {
                    Value::String(s) => HandlerSpec { method: s.to_str()?.to_string(), params: None },
                    Value::Table(t) => handler(lua, t.get("method")?, t.get("params")?)?,
                    _ => {
                        return Err(mlua::Error::runtime(
                            "setOutboundByHosts: values are a handler name or {method=, params=}",
                        ));
                    }
                };
                out.insert(host, spec);
            }
            run(this, Setter::SetOutboundByHosts(out))
        });
        m.add_method("removeOutboundByHost", |_, this, host: String| run(this, Setter::RemoveOutboundByHost(host)));
        m.add_method("removeOutboundHandler", |_, this, ()| run(this, Setter::RemoveOutboundHandler));
        m.add_method("setAllowedHosts", |_, this, t: Table| run(this, Setter::SetAllowedHosts(strings(t)?)));
        m.add_method("setDeniedHosts", |_, this, t: Table| run(this, Setter::SetDeniedHosts(strings(t)?)));
        m.add_method("allowHost", |_, this, h: String| run(this, Setter::AllowHost(h)));
        m.add_method("denyHost", |_, this, h: String| run(this, Setter::DenyHost(h)));
        m.add_method("removeAllowedHost", |_, this, h: String| run(this, Setter::RemoveAllowedHost(h)));
        m.add_method("removeDeniedHost", |_, this, h: String| run(this, Setter::RemoveDeniedHost(h)));
        m.add_method("clearOverrides", |_, this, ()| run(this, Setter::ClearOverrides));
        use crate::policy::intercepts::InterceptKind;
        fn intercept(this: &LuaContainer, kind: InterceptKind, target: Option<&str>, h: HandlerSpec) -> Result<()> {
            this.sink.intercept(&this.id, kind, target, h).map_err(mlua::Error::runtime)
        }
        m.add_method("interceptOutboundHttp", |lua, this, (target, name, props): (String, String, Value)| {
            intercept(this, InterceptKind::Http, Some(&target), handler(lua, name, props)?)
        });
        m.add_method("interceptOutboundHttps", |lua, this, (host, name, props): (String, String, Value)| {
            intercept(this, InterceptKind::Https, Some(&host), handler(lua, name, props)?)
        });
        m.add_method("interceptAllOutboundHttp", |lua, this, (name, props): (String, Value)| {
            intercept(this, InterceptKind::All, None, handler(lua, name, props)?)
        });
        super::lifecycle::add_methods(m);
    }

    fn add_fields<F: mlua::UserDataFields<Self>>(f: &mut F) {
        super::lifecycle::add_fields(f);
    }
}
