//! Benchmark of one handler call inside a worker, without the client side: builds a class
//! runtime as a worker does and calls its handler in a loop, printing the mean time per
//! call. Steadier than the end-to-end figures (no other process shares the measurement), so
//! it shows what a change to the Lua glue is worth.
//!
//! bench-lua-call local N          a handler that copies the request, sets a header and
//!                                 answers with Response.new (no I/O)
//! bench-lua-call loop N           the same with Lua-heavy work before the answer (2,000
//!                                 loop iterations, 100 strings joined)
//! bench-lua-call fetch N UPSTREAM the bench handler: the same, then fetch() to UPSTREAM
//!                                 (127.0.0.1:port of a running bench-upstream)
//! bench-lua-call send N UPSTREAM  no Lua: the same request sent upstream as egress sends
//!                                 it (what `fetch` costs beyond the Lua call)
//! bench-lua-call raw N UPSTREAM   no moat: 32 sockets writing the same request and reading
//!                                 the answer with httparse (the floor for `send`)
//! bench-lua-call floor N          no moat: the `local` handler on bare mlua with the thinnest
//!                                 userdata that can serve it (the floor for `local`)
//! bench-lua-call floor-fetch N    the same answering with an async `fetch` that is ready at
//!                                 once (the Lua side's floor on the handler path)
//! bench-lua-call floor-tables N   floor-fetch with plain Lua tables instead of userdata
//! bench-lua-call body N [UPSTREAM] the handler's whole body from $BENCH_LUA (it gets
//!                                 `request`, `env`, `ctx`), one call at a time: prices each
//!                                 piece of a handler (under callgrind, see bench/README.md)

mod lua_floor;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use moat::bench::{
    BodySlot, CallContext, CanonicalHost, ClassRuntime, DialRules, HandlerChoice, Limits, LuaHeaders, LuaRequest,
    ParsedUrl, Resolver, SharedBody, Target, Upstream, UpstreamTls,
};

// The same allocator as the moat binary: allocation is a good part of a handler call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct NoSink;
impl moat::bench::OverrideSink for NoSink {
    fn apply(&self, _: &str, _: moat::bench::Setter) -> Result<(), String> {
        Err("not in this benchmark".into())
    }
}

/// CPU time this thread has used (the scheduler's own account, in ns).
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map_or("local", String::as_str).to_string();
    let n: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let upstream_addr = args.get(2).cloned().unwrap_or_else(|| "127.0.0.1:18080".into());
    let upstream_port: u16 =
        upstream_addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("UPSTREAM is 127.0.0.1:PORT");
    let answer = match mode.as_str() {
        "fetch" => "fetch(r)",
        // Lua-heavy: 2,000 loop iterations of arithmetic and 100 strings joined.
        "loop" => {
            "(function() local x = 0; for i = 1, 2000 do x = x + (i * 3) % 7 end; local t = {}; for i = 1, 100 do t[#t + 1] = tostring(i + x) end; return Response.new(table.concat(t, \",\")) end)()"
        }
        _ => "Response.new(\"hello, moat!\\n\")",
    };
    let body = match mode.as_str() {
        "body" => std::env::var("BENCH_LUA").expect("body mode reads the handler from BENCH_LUA"),
        _ => format!(
            "local r = Request.new(request)\n    r.headers:set(\"x-moat-container\", ctx.containerId)\n    return {answer}"
        ),
    };
    let dir = std::env::temp_dir().join(format!("moat-bench-lua-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.lua");
    std::fs::write(
        &policy,
        format!(
            "allowedHosts = {{ \"127.0.0.1\" }}\noutboundByHost = {{\n  [\"127.0.0.1\"] = function(request, env, ctx)\n    {body}\n  end,\n}}\n"
        ),
    )
    .unwrap();
    let limits = Limits::default();
    let generation = Arc::new(moat::bench::load_generation("bench", &policy, 1, &limits).unwrap());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    if mode == "raw" {
        local.block_on(&rt, raw_floor(n, &upstream_addr));
        return;
    }
    match mode.as_str() {
        "floor" | "floor-fetch" => return local.block_on(&rt, lua_floor::run(n, mode == "floor-fetch")),
        "floor-tables" => return local.block_on(&rt, lua_floor::run_tables(n)),
        _ => {}
    }
    local.block_on(&rt, async move {
        let upstream = Rc::new(Upstream::new(
            Resolver::new(Default::default()),
            UpstreamTls::new(&[]).unwrap(),
            &limits,
            Arc::new(Vec::new()),
            Default::default(),
        ));
        let runtime =
            ClassRuntime::build(generation, upstream.clone(), Rc::new(NoSink), &limits, &Default::default()).unwrap();
        let target = Target { https: false, host: CanonicalHost::parse("127.0.0.1").unwrap(), port: upstream_port };
        let choice = HandlerChoice::ClassByHost { key: "127.0.0.1".into() };
        let url = format!("http://{upstream_addr}/");
        let runtime = Rc::new(runtime);
        // One call: a fresh request, as the proxy makes for each client request.
        let call = {
            let (runtime, choice, limits, target) =
                (runtime.clone(), Rc::new(choice), Rc::new(limits), Rc::new(target));
            let (upstream, send_only) = (upstream.clone(), mode == "send");
            move || {
                let (runtime, choice, limits, target) =
                    (runtime.clone(), choice.clone(), limits.clone(), target.clone());
                let upstream = upstream.clone();
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::HOST, upstream_addr.parse().unwrap());
                headers.insert(http::header::USER_AGENT, http::HeaderValue::from_static("moat-bench"));
                let parsed = ParsedUrl { target: (*target).clone(), origin_form: "/".into() };
                let request = LuaRequest::incoming(
                    http::Method::GET,
                    url.clone(),
                    parsed,
                    LuaHeaders::detached(headers),
                    SharedBody::new(BodySlot::Empty),
                );
                async move {
                    if send_only {
                        let mut req = http::Request::new(moat::bench::empty_body());
                        *req.uri_mut() = http::Uri::from_static("/");
                        *req.headers_mut() = request.headers.snapshot();
                        let req = moat::bench::to_upstream_request(req, &target);
                        let resp = upstream.send(req, &target, DialRules::Trusted).await.unwrap();
                        http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
                        return;
                    }
                    let who =
                        CallContext { request_id: "0123456789abcdef", container_id: "default", class: "bench".into() };
                    let resp =
                        runtime.call(&choice, request, who, &limits).await.map_err(|_| "handler failed").unwrap();
                    http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
                }
            }
        };
        // Calls in flight at once: 32 with fetch (as the end-to-end benchmark's connections,
        // so that upstream round trips overlap), 1 without.
        let conc: u32 = if matches!(mode.as_str(), "local" | "loop" | "body") { 1 } else { 32 };
        let run = |count: u32| {
            let tasks: Vec<_> = (0..conc)
                .map(|_| {
                    let call = call.clone();
                    tokio::task::spawn_local(async move {
                        for _ in 0..count / conc {
                            call().await;
                        }
                    })
                })
                .collect();
            join(tasks)
        };
        let (cpu, wall) = measure(n, run).await;
        println!(
            "{mode}: {n} calls, {cpu:.0} ns CPU ({wall:.0} ns wall) per call, Lua memory {} KiB",
            runtime.used_memory() / 1024
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// `raw`: the floor for `send`: 32 connections, each writing the same request and reading
/// the response with nothing but httparse (no pool, no policy, no hyper).
async fn raw_floor(n: u32, upstream_addr: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET / HTTP/1.1\r\nhost: {upstream_addr}\r\nuser-agent: moat-bench\r\n\r\n");
    let run = |count: u32| {
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (req, addr) = (req.clone(), upstream_addr.to_string());
                tokio::task::spawn_local(async move {
                    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
                    s.set_nodelay(true).unwrap();
                    let mut buf = Vec::with_capacity(4096);
                    for _ in 0..count / 32 {
                        s.write_all(req.as_bytes()).await.unwrap();
                        buf.clear();
                        loop {
                            let mut chunk = [0u8; 4096];
                            let k = s.read(&mut chunk).await.unwrap();
                            assert!(k > 0);
                            buf.extend_from_slice(&chunk[..k]);
                            let mut h = [httparse::EMPTY_HEADER; 32];
                            let mut r = httparse::Response::new(&mut h);
                            if let Ok(httparse::Status::Complete(end)) = r.parse(&buf) {
                                let len: usize = r
                                    .headers
                                    .iter()
                                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                                    .unwrap_or(0);
                                if buf.len() >= end + len {
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        join(tasks)
    };
    let (cpu, wall) = measure(n, run).await;
    println!("raw: {n} calls, {cpu:.0} ns CPU ({wall:.0} ns wall) per call");
}

async fn join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.unwrap();
    }
}

/// Warms up with `run(n / 10)`, then times `run(n)`: (CPU ns, wall ns) per call.
async fn measure<F: std::future::Future<Output = ()>>(n: u32, run: impl Fn(u32) -> F) -> (f64, f64) {
    run(n / 10).await;
    let (start, cpu_start) = (Instant::now(), thread_cpu_ns());
    run(n).await;
    let wall = start.elapsed().as_nanos() as f64 / f64::from(n);
    let cpu = (thread_cpu_ns() - cpu_start) as f64 / f64::from(n);
    (cpu, wall)
}
