//! Memory (SPEC 9): what Lua objects hold outside Lua counts against `limits.lua_memory`,
//! so moat's resident memory stays bounded under handlers that make big objects or many
//! fetches, and goes back down when moat is idle.

use std::time::{Duration, Instant};

use crate::harness::*;

fn policy(upstream: &Upstream) -> String {
    let up = upstream.url("/bytes/2000");
    format!(
        r#"
allowedHosts = {{ "127.0.0.1", "deep.test", "fetches.test", "bodies.test", "held.test" }}
outboundByHost = {{
  -- Recursion until Lua's stack gives up.
  ["deep.test"] = function()
    local function f(n) if n == 0 then return 0 end return 1 + f(n - 1) end
    local ok = pcall(f, 1e8)
    return Response.new(tostring(ok))
  end,
  -- A thousand fetches in one call, their answers left to the collector.
  ["fetches.test"] = function()
    local n = 0
    for i = 1, 1000 do
      if fetch("{up}").status == 200 then n = n + 1 end
    end
    return Response.new(tostring(n))
  end,
  -- 4,000 Requests of 256 KiB each (1 GiB in all), each garbage at once: a few hundred
  -- bytes apiece to Lua, 256 KiB to the process.
  ["bodies.test"] = function()
    local s = string.rep("x", 256 * 1024)
    for i = 1, 4000 do Request.new("http://127.0.0.1/", {{ method = "POST", body = s }}) end
    return Response.new("made")
  end,
  -- 200 MiB kept alive by the handler: over the 64 MiB budget however Lua counts it.
  ["held.test"] = function()
    local s = string.rep("x", 1024 * 1024)
    local keep = {{}}
    for i = 1, 200 do keep[i] = Response.new(s) end
    return Response.new("kept " .. #keep)
  end,
}}
"#
    )
}

#[test]
fn memory_held_outside_lua_counts_against_lua_memory_so_rss_stays_bounded_and_is_given_back_when_idle() {
    let up = Upstream::start();
    // The issue's case wants thousands of fetches; a debug build is slow, hence the time.
    let toml = "[limits]\nsubrequests = 1000\nhandler_timeout = \"120s\"\nlua_cpu = \"60s\"\n";
    let moat = Moat::policy(&policy(&up)).config(toml).start();
    let start = memory_kib(moat.pid(), "VmRSS");

    for _ in 0..3 {
        assert_eq!(curl(&moat, "http://deep.test/", &[]).body, "false");
    }
    for _ in 0..3 {
        assert_eq!(curl(&moat, "http://fetches.test/", &[]).body, "1000");
    }
    assert_eq!(up.count(), 3000);
    for _ in 0..2 {
        let r = curl(&moat, "http://bodies.test/", &[]);
        assert_eq!((r.status, r.body.as_str()), (200, "made"), "garbage objects are collected, not refused");
    }
    let r = curl(&moat, "http://held.test/", &[]);
    assert_eq!(r.status, 500, "live objects over the budget are a memory error: {}", r.body);
    let log = moat.wait_log("held.test\"]: handler exceeded limits.lua_memory");
    let id = r.body.trim().trim_end_matches(')').rsplit(' ').next().unwrap();
    assert!(log.contains(&format!("request_id={id}")), "the log names the failed request {id}: {log}");
    // The state that failed serves the next call.
    assert_eq!(curl(&moat, "http://bodies.test/", &[]).body, "made");

    // Two workers, each with a 64 MiB state; without the charges the bodies alone took 1 GiB.
    let peak = memory_kib(moat.pid(), "VmHWM");
    assert!(peak < 320 * 1024, "peak resident memory {} MiB", peak >> 10);

    // Idle: the heartbeat collects each state, and the memory goes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = memory_kib(moat.pid(), "VmRSS");
    while now > start + 48 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        now = memory_kib(moat.pid(), "VmRSS");
    }
    eprintln!("resident: {} MiB at start, {} MiB peak, {} MiB idle", start >> 10, peak >> 10, now >> 10);
    assert!(now <= start + 48 * 1024, "idle resident memory {} MiB, {} MiB at start", now >> 10, start >> 10);
}
