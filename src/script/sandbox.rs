//! A fresh, sandboxed Lua 5.4 state (SPEC 2): safe libraries only, text chunks only,
//! `require` from the policy folder then the bundled stdlib, memory and CPU limits.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use mlua::chunk::ChunkMode;
use mlua::{HookTriggers, Lua, LuaOptions, Result, StdLib, Table, Value, VmState};

use super::api;
use super::scope;
use crate::upstream::Upstream;

/// How often (in VM instructions) the CPU budget is checked.
const HOOK_EVERY: u32 = 1000;

/// The bundled stdlib, embedded in the binary: module name → (file name, source).
const STDLIB: &[(&str, &str, &str)] = &[
    ("moat.json", "stdlib/moat/json.lua", include_str!("../../stdlib/moat/json.lua")),
    ("moat.base64", "stdlib/moat/base64.lua", include_str!("../../stdlib/moat/base64.lua")),
    ("moat.hex", "stdlib/moat/hex.lua", include_str!("../../stdlib/moat/hex.lua")),
    ("moat.crypto", "stdlib/moat/crypto.lua", include_str!("../../stdlib/moat/crypto.lua")),
    ("moat.auth", "stdlib/moat/auth.lua", include_str!("../../stdlib/moat/auth.lua")),
    ("moat.ratelimit", "stdlib/moat/ratelimit.lua", include_str!("../../stdlib/moat/ratelimit.lua")),
];

/// The bundled modules' names (`moat.json`, …).
pub fn stdlib_names() -> impl Iterator<Item = &'static str> {
    STDLIB.iter().map(|(name, _, _)| *name)
}

/// Where `require` finds modules, and what it has loaded from the policy folder.
pub struct ModuleSource {
    /// The policy's folder.
    pub dir: PathBuf,
    /// Module sources captured when the generation was validated; used before the disk so
    /// every worker runs the same text.
    pub captured: BTreeMap<String, (PathBuf, Arc<str>)>,
    /// Modules read from disk by this state (the validating state records them).
    pub read: RefCell<BTreeMap<String, (PathBuf, Arc<str>)>>,
}

/// Options for a new state.
pub struct StateOptions<'a> {
    pub memory_limit: usize,
    pub body_buffer: usize,
    pub upstream: Option<Rc<Upstream>>,
    /// Where `moat.container(id)` setters go (none while validating).
    pub sink: Option<Rc<dyn api::container::OverrideSink>>,
    pub modules: ModuleSource,
    pub policy_path: &'a Path,
}

/// Lua run once in each new state, before the policy: removes what a policy must not use.
const BOOTSTRAP: &str = r#"
local _load = load
-- Text chunks only: binary chunks can crash the VM.
load = function(chunk, name, _mode, env) return _load(chunk, name, "t", env) end
dofile, loadfile = nil, nil
string.dump = nil
local _collect = collectgarbage
collectgarbage = function(opt, ...)
  if opt == nil or opt == "collect" or opt == "count" or opt == "step" then return _collect(opt, ...) end
  error("collectgarbage: option '" .. tostring(opt) .. "' is not available", 2)
end
local _os = os
os = { time = _os.time, clock = _os.clock, date = _os.date, difftime = _os.difftime }
"#;

/// Makes a sandboxed state with the API installed.
pub fn new_state(opts: StateOptions<'_>) -> Result<Lua> {
    let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE | StdLib::OS;
    let lua = Lua::new_with(libs, LuaOptions::new().thread_pool_size(64))?;
    lua.load(BOOTSTRAP).set_name("=moat-bootstrap").exec()?;
    lua.set_global_hook(HookTriggers::new().every_nth_instruction(HOOK_EVERY), |_, debug| {
        match scope::hook_action() {
            scope::HookAction::Continue => Ok(VmState::Continue),
            scope::HookAction::Yield => Ok(VmState::Yield),
            // Never inside mlua's async wrapper, the Lua loop that polls a Rust future (`fetch`,
            // a bucket put) and yields its "pending" marker: cut there, on a loaded machine, a
            // streaming upload stopped for good (its task was never woken again). The slice ends
            // at the handler's own next instructions instead.
            scope::HookAction::Slice if debug.source().source.as_deref() == Some("=__mlua_async_poll") => {
                Ok(VmState::Continue)
            }
            scope::HookAction::Slice => {
                scope::slice_ends();
                Ok(VmState::Yield)
            }
            scope::HookAction::Raise => Err(mlua::Error::runtime("CPU budget exceeded (limits.lua_cpu)")),
        }
    })?;
    // The memory limit (with what objects hold outside Lua, see api::meter) applies from here.
    api::install(&lua, opts.upstream, opts.sink, opts.body_buffer, opts.memory_limit)?;
    lua.set_app_data(opts.modules);
    install_require(&lua)?;
    // Handlers make many short-lived objects (requests, header tables, strings): the
    // generational collector reclaims them in cheap minor collections.
    lua.gc_set_mode(mlua::prelude::LuaGcMode::Generational(Default::default()));
    let _ = opts.policy_path;
    Ok(lua)
}

fn install_require(lua: &Lua) -> Result<()> {
    let loaded = lua.create_table()?;
    let natives = api::natives::table(lua)?;
    let require = lua.create_function(move |lua, name: String| {
        if let Some(v) = loaded.raw_get::<Option<Value>>(name.as_str())? {
            return Ok(v);
        }
        if !valid_module_name(&name) {
            return Err(mlua::Error::runtime(format!("require: invalid module name {name:?}")));
        }
        let value = match find_in_policy_dir(lua, &name)? {
            Some((path, src)) => {
                let chunk_name = format!("@{}", path.display());
                lua.load(&*src).set_name(chunk_name).set_mode(ChunkMode::Text).call::<Value>(name.as_str())?
            }
            None => match STDLIB.iter().find(|(n, _, _)| *n == name) {
                Some((_, file, src)) => lua
                    .load(*src)
                    .set_name(format!("@{file}"))
                    .set_mode(ChunkMode::Text)
                    .call::<Value>(natives.clone())?,
                None => {
                    return Err(mlua::Error::runtime(format!(
                        "module {name:?} not found in the policy folder or the bundled stdlib"
                    )));
                }
            },
        };
        let value = if value.is_nil() { Value::Boolean(true) } else { value };
        loaded.raw_set(name.as_str(), value.clone())?;
        Ok(value)
    })?;
    lua.globals().set("require", require)
}

fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
}

fn find_in_policy_dir(lua: &Lua, name: &str) -> Result<Option<(PathBuf, Arc<str>)>> {
    let src = lua.app_data_ref::<ModuleSource>().ok_or_else(|| mlua::Error::runtime("require: no module source"))?;
    if let Some(found) = src.captured.get(name) {
        return Ok(Some(found.clone()));
    }
    let path = src.dir.join(format!("{}.lua", name.replace('.', "/")));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let text: Arc<str> = Arc::from(text);
            src.read.borrow_mut().insert(name.to_string(), (path.clone(), text.clone()));
            Ok(Some((path, text)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(mlua::Error::runtime(format!("require {name:?}: cannot read {}: {e}", path.display()))),
    }
}

/// Reads a table-valued global, or nil.
pub fn global_table(lua: &Lua, name: &str) -> Result<Option<Table>> {
    match lua.globals().get::<Value>(name)? {
        Value::Table(t) => Ok(Some(t)),
        _ => Ok(None),
    }
}
