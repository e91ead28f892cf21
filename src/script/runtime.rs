//! A worker's Lua state for one class generation, and calling its handlers (SPEC 9 limits).

use rustc_hash::FxHashMap as HashMap;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{Function, Lua, Table, Value};

use super::api::ctx::LuaCtx;
use super::api::fetch::FetchError;
use super::api::request::LuaRequest;
use super::api::response::LuaResponse;
use super::load::{Generation, LoadError, run_chunk};
use super::sandbox::{self, ModuleSource, StateOptions, global_table};
use super::scope::{Scope, Scoped};
use crate::bindings::Bindings;
use crate::body::Body;
use crate::config::Limits;
use crate::policy::HandlerChoice;
use crate::upstream::Upstream;

/// One worker's running copy of a generation.
pub struct ClassRuntime {
    /// The policy generation this state runs.
    pub generation: Arc<Generation>,
    lua: Lua,
    by_host: HashMap<String, Handler>,
    outbound: Option<Handler>,
    handlers: HashMap<String, Handler>,
    env: Table,
    kv: Option<Arc<crate::bindings::kv::KvStore>>,
    /// Handler calls started on this state, and that count at the last heartbeat and at the
    /// last full collection (see [`ClassRuntime::collect_if_idle`]).
    calls: std::cell::Cell<u64>,
    calls_at_beat: std::cell::Cell<u64>,
    calls_at_collection: std::cell::Cell<u64>,
}

/// A handler function, and whether it takes `ctx`.
struct Handler {
    func: Function,
    /// Declared with a third parameter (or `...`): a handler written `function(request,
    /// env)` gets no `ctx`, which spares making one (a userdata, about 2,500 instructions
    /// with its finalizer) on each of its calls.
    wants_ctx: bool,
}

impl Handler {
    fn new(func: Function) -> Self {
        let info = func.info();
        Self { wants_ctx: info.num_params >= 3 || info.is_vararg, func }
    }
}

/// Who a handler call is for.
pub struct CallContext<'a> {
    /// The request's id (log lines, `ctx.requestId`).
    pub request_id: &'a str,
    /// `ctx.containerId`.
    pub container_id: &'a str,
    /// `ctx.className`.
    pub class: std::sync::Arc<str>,
}

/// Why a handler produced no response; each maps to one answer (SPEC 9).
#[derive(Debug)]
pub enum HandlerFailure {
    /// Raised an error (message with traceback, for the log).
    Error(String),
    /// Returned something that is not a Response.
    NotResponse(String),
    /// Went over `limits.lua_cpu`.
    Cpu,
    /// Went over `limits.lua_memory`.
    Memory,
    /// Went over `limits.handler_timeout`.
    Timeout,
    /// A `fetch` failed and the handler did not catch it: answered like egress would be.
    Upstream(String, Arc<FetchError>),
    /// A store (KV) did not answer and the handler did not catch it: the message says which.
    Store(String),
}

impl ClassRuntime {
    /// Builds this worker's state for `generation` (runs the script's top level again).
    pub fn build(
        generation: Arc<Generation>,
        upstream: Rc<Upstream>,
        sink: Rc<dyn super::api::container::OverrideSink>,
        limits: &Limits,
        bindings: &Bindings,
    ) -> Result<Self, LoadError> {
        let fail = |message: String| LoadError { file: generation.path.clone(), line: None, message };
        let lua = sandbox::new_state(StateOptions {
            memory_limit: limits.lua_memory,
            body_buffer: limits.body_buffer,
            upstream: Some(upstream),
            sink: Some(sink),
            modules: ModuleSource {
                dir: generation.path.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
                captured: generation.modules.clone(),
                read: Default::default(),
            },
            policy_path: &generation.path,
        })
        .map_err(|e| fail(e.to_string()))?;
        super::api::set_redact_secrets(&lua, generation.policy.redact_secrets);
        run_chunk(&lua, &generation.path, &generation.source, &generation.class, limits)
            .map_err(|e| fail(e.to_string()))?;
        let table_fns = |name: &str| -> mlua::Result<HashMap<String, Handler>> {
            let mut out = HashMap::default();
            if let Some(t) = global_table(&lua, name)? {
                for pair in t.pairs::<String, Function>() {
                    let (k, f) = pair?;
                    out.insert(k, Handler::new(f));
                }
            }
            Ok(out)
        };
        let by_host = table_fns("outboundByHost").map_err(|e| fail(e.to_string()))?;
        let handlers = table_fns("outboundHandlers").map_err(|e| fail(e.to_string()))?;
        let outbound = lua.globals().get::<Option<Function>>("outbound").map_err(|e| fail(e.to_string()))?;
        let outbound = outbound.map(Handler::new);
        let env = super::api::env::env_table(&lua, bindings).map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            generation,
            lua,
            by_host,
            outbound,
            handlers,
            env,
            kv: bindings.kv.clone(),
            calls: Default::default(),
            calls_at_beat: Default::default(),
            calls_at_collection: Default::default(),
        })
    }

    /// Runs the chosen handler for `request` and returns its Response as HTTP.
    pub async fn call(
        &self,
        choice: &HandlerChoice,
        request: LuaRequest,
        who: CallContext<'_>,
        limits: &Limits,
    ) -> Result<http::Response<Body>, HandlerFailure> {
        let handler = match choice {
            HandlerChoice::ClassByHost { key } => self.by_host.get(key),
            HandlerChoice::ClassOutbound => self.outbound.as_ref(),
            HandlerChoice::InstanceByHost { handler, .. } | HandlerChoice::InstanceOutbound(handler) => {
                self.handlers.get(&handler.name)
            }
        }
        .ok_or_else(|| {
            HandlerFailure::Error(format!("handler {} is not defined in this generation", choice.label()))
        })?;

        let lua_err = |e: mlua::Error| HandlerFailure::Error(e.to_string());
        self.calls.set(self.calls.get() + 1);
        let scope =
            Scope::new(who.request_id.into(), who.container_id.into(), who.class, limits.lua_cpu, limits.subrequests);
        request.body.end_with(&scope);
        request.charge_to(&self.lua).map_err(|e| self.classify(e))?;
        let req = self.lua.create_userdata(request).map_err(lua_err)?;
        let ctx = match handler.wants_ctx {
            true => Value::UserData(
                self.lua
                    .create_userdata(LuaCtx {
                        scope: scope.clone(),
                        params: choice.params().cloned(),
                        storage: self.kv.clone(),
                    })
                    .map_err(lua_err)?,
            ),
            false => Value::Nil,
        };
        let call = handler.func.call_async::<Value>((req, self.env.clone(), ctx));
        let outcome = tokio::time::timeout(limits.handler_timeout, Scoped::new(scope.clone(), call)).await;
        let answer = match outcome {
            Err(_) => Err(HandlerFailure::Timeout),
            Ok(_) if scope.exceeded() => Err(HandlerFailure::Cpu),
            Ok(Ok(Value::UserData(ud))) if ud.is::<LuaResponse>() => {
                ud.borrow::<LuaResponse>().map_err(lua_err).and_then(|resp| resp.take_http().map_err(lua_err))
            }
            Ok(Ok(other)) => Err(HandlerFailure::NotResponse(other.type_name().to_string())),
            Ok(Err(e)) => Err(self.classify(e)),
        };
        // After the answer has taken its body: what is left unread is closed.
        scope.end();
        answer
    }

    fn classify(&self, e: mlua::Error) -> HandlerFailure {
        let mut cur = &e;
        loop {
            match cur {
                mlua::Error::MemoryError(_) => {
                    // Give back what the failed call held before the next request runs.
                    let _ = self.lua.gc_collect();
                    return HandlerFailure::Memory;
                }
                mlua::Error::CallbackError { cause, .. } => cur = cause,
                mlua::Error::WithContext { cause, .. } => cur = cause,
                mlua::Error::ExternalError(ext) => {
                    if let Some(fe) = ext.downcast_ref::<FetchError>() {
                        let arc: Arc<FetchError> =
                            Arc::new(FetchError { url: fe.url.clone(), source: fe.source.clone() });
                        return HandlerFailure::Upstream(e.to_string(), arc);
                    }
                    if let Some(su) = ext.downcast_ref::<super::api::kv::StoreUnavailable>() {
                        return HandlerFailure::Store(su.0.clone());
                    }
                    break;
                }
                _ => break,
            }
        }
        if e.to_string().contains("not enough memory") {
            let _ = self.lua.gc_collect();
            return HandlerFailure::Memory;
        }
        HandlerFailure::Error(e.to_string())
    }

    /// Called on each heartbeat: a full collection when handlers ran since the last one and
    /// none started since the previous heartbeat (or at once when `urgent`).
    pub fn collect_if_idle(&self, urgent: bool) {
        let calls = self.calls.get();
        let quiet = calls == self.calls_at_beat.replace(calls);
        if calls != self.calls_at_collection.get() && (quiet || urgent) {
            let _ = self.lua.gc_collect();
            self.calls_at_collection.set(calls);
        }
    }

    /// Memory used by this state (for metrics and tests).
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }
}
