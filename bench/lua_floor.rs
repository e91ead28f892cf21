//! `bench-lua-call floor N`: what the bench handler's Lua side costs on mlua and Lua 5.4 (SPEC 2,
//! RUST-NOTES) with none of moat's code: the same handler source as `local` (copy the
//! request, set a header, answer with `Response.new`), run as moat must run it (a coroutine
//! per call from mlua's async call, a count hook set, a memory limit), against the thinnest
//! userdata we could write for it: fields that hand back stored values, a header list
//! without validation, no scope, no timeout, no metering, no bodies.
//!
//! It is a reference, not a proof of a minimum: it shows how much of a handler call is the
//! Lua VM and the binding every mlua-based runtime pays, and how much is moat's own glue
//! (`local` against `floor`; `floor-fetch` against the handler path minus the egress path).

use std::cell::RefCell;
use std::rc::Rc;

use mlua::{
    AnyUserData, HookTriggers, Lua, LuaOptions, StdLib, UserData, UserDataFields, UserDataMethods, Value, VmState,
};

type HeaderList = Rc<RefCell<Vec<(String, String)>>>;

struct Headers(HeaderList);

impl UserData for Headers {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("set", |_, this, (name, value): (String, String)| {
            let mut list = this.0.borrow_mut();
            list.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
            list.push((name, value));
            Ok(())
        });
    }
}

struct Request {
    method: String,
    url: String,
    list: HeaderList,
}

impl Request {
    /// The request's userdata, its headers' userdata made with it and kept as its user value
    /// (traced by the collector): reading the field pushes that one, nothing is made.
    fn create(lua: &Lua, method: String, url: String, list: Vec<(String, String)>) -> mlua::Result<AnyUserData> {
        let list = Rc::new(RefCell::new(list));
        let headers = lua.create_userdata(Headers(list.clone()))?;
        let request = lua.create_userdata(Self { method, url, list })?;
        request.set_user_value(headers)?;
        Ok(request)
    }
}

impl UserData for Request {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_function_get("headers", |_, this| this.user_value::<AnyUserData>());
    }
}

struct Ctx {
    container_id: String,
}

impl UserData for Ctx {
    fn add_fields<F: UserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("containerId", |_, this| Ok(this.container_id.clone()));
    }
}

struct Response {
    body: String,
}

impl UserData for Response {}

/// The bench handler; `ANSWER` is `Response.new(...)` (as `local`) or `fetch(r)` (as the
/// end-to-end handler path, with a `fetch` whose future is ready at once: no HTTP at all).
const HANDLER: &str = r#"
return function(request, env, ctx)
  local r = Request.new(request)
  r.headers:set("x-moat-container", ctx.containerId)
  return ANSWER
end
"#;

/// A Lua state set up as moat's (script/sandbox.rs): the same libraries, thread pool and
/// collector, a count hook every 1,000 instructions as moat's (here it only lets the code
/// go on) and a memory limit; nothing else installed.
fn bare_state() -> Lua {
    let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE | StdLib::OS;
    let lua = Lua::new_with(libs, LuaOptions::new().thread_pool_size(64)).unwrap();
    lua.set_global_hook(HookTriggers::new().every_nth_instruction(1_000), |_, _| Ok(VmState::Continue)).unwrap();
    lua.set_memory_limit(64 << 20).unwrap();
    lua.gc_set_mode(mlua::prelude::LuaGcMode::Generational(Default::default()));
    lua
}

/// Runs the floor handler `n` times and prints the CPU per call; with `fetch`, the handler answers with an async `fetch` instead of `Response.new`.
pub async fn run(n: u32, fetch: bool) {
    let lua = bare_state();
    let request_api = lua.create_table().unwrap();
    let copy = lua
        .create_function(|lua, from: AnyUserData| {
            let from = from.borrow::<Request>()?;
            Request::create(lua, from.method.clone(), from.url.clone(), from.list.borrow().clone())
        })
        .unwrap();
    request_api.set("new", copy).unwrap();
    let response_api = lua.create_table().unwrap();
    response_api.set("new", lua.create_function(|_, body: String| Ok(Response { body })).unwrap()).unwrap();
    lua.globals().set("Request", request_api).unwrap();
    lua.globals().set("Response", response_api).unwrap();
    let fetch_fn = lua
        .create_async_function(|lua, request: AnyUserData| async move {
            let request = request.borrow::<Request>()?;
            let body = format!("{} {}", request.method, request.url);
            lua.create_userdata(Response { body })
        })
        .unwrap();
    lua.globals().set("fetch", fetch_fn).unwrap();
    let answer = if fetch { "fetch(r)" } else { "Response.new(\"hello, moat!\\n\")" };
    let handler: mlua::Function = lua.load(HANDLER.replace("ANSWER", answer)).eval().unwrap();
    let env = lua.create_table().unwrap();

    let call = || async {
        let headers =
            vec![("host".to_string(), "127.0.0.1:18080".to_string()), ("user-agent".into(), "moat-bench".into())];
        let request = Request::create(&lua, "GET".into(), "http://127.0.0.1:18080/".into(), headers).unwrap();
        let ctx = lua.create_userdata(Ctx { container_id: "default".into() }).unwrap();
        let answer = handler.call_async::<Value>((request, env.clone(), ctx)).await.unwrap();
        let Value::UserData(answer) = answer else { panic!("the handler answers a Response") };
        assert!(!answer.borrow::<Response>().unwrap().body.is_empty());
    };
    time_calls(if fetch { "floor-fetch" } else { "floor" }, n, &lua, call).await;
}

/// Request and headers as plain Lua tables, `Request.new` and `headers:set` written in Lua:
/// no userdata and no Rust callback but `fetch` itself (which SPEC's validation, detached
/// headers and bodies rule out for moat; here it prices the VM and the async call alone).
const TABLES_PRELUDE: &str = r#"
local Headers = {}
Headers.__index = Headers
function Headers:set(name, value) self[string.lower(name)] = value end
Request = {}
function Request.new(from)
  local headers = setmetatable({}, Headers)
  for k, v in pairs(from.headers) do headers[k] = v end
  return { method = from.method, url = from.url, headers = headers }
end
function make_request(method, url, host, agent)
  return { method = method, url = url, headers = setmetatable({ host = host, ["user-agent"] = agent }, Headers) }
end
"#;

/// `floor-tables`: the bench handler (answering with `fetch`) over plain tables.
pub async fn run_tables(n: u32) {
    let lua = bare_state();
    lua.load(TABLES_PRELUDE).exec().unwrap();
    let fetch_fn = lua
        .create_async_function(|lua, request: mlua::Table| async move {
            let (method, url): (mlua::LuaString, mlua::LuaString) = (request.get("method")?, request.get("url")?);
            let answer = lua.create_table()?;
            answer.set("status", 200)?;
            answer.set("body", format!("{} {}", method.to_str()?, url.to_str()?))?;
            Ok(answer)
        })
        .unwrap();
    lua.globals().set("fetch", fetch_fn).unwrap();
    let make_request: mlua::Function = lua.globals().get("make_request").unwrap();
    let handler: mlua::Function = lua.load(HANDLER.replace("ANSWER", "fetch(r)")).eval().unwrap();
    let env = lua.create_table().unwrap();
    let call = || async {
        let request: mlua::Table =
            make_request.call(("GET", "http://127.0.0.1:18080/", "127.0.0.1:18080", "moat-bench")).unwrap();
        let ctx = lua.create_table().unwrap();
        ctx.set("containerId", "default").unwrap();
        let answer = handler.call_async::<mlua::Table>((request, env.clone(), ctx)).await.unwrap();
        assert_eq!(answer.get::<u16>("status").unwrap(), 200);
    };
    time_calls("floor-tables", n, &lua, call).await;
}

/// Makes `call` `n` times one after another (after a tenth as warm-up) and prints the CPU
/// and wall time per call.
async fn time_calls<F: std::future::Future<Output = ()>>(mode: &str, n: u32, lua: &Lua, call: impl Fn() -> F) {
    let call = &call;
    let (cpu, wall) = super::measure(n, |count| async move {
        for _ in 0..count {
            call().await;
        }
    })
    .await;
    println!(
        "{mode}: {n} calls, {cpu:.0} ns CPU ({wall:.0} ns wall) per call, Lua memory {} KiB",
        lua.used_memory() / 1024
    );
}
