//! Handler failures and limits (SPEC 9): each gets its answer and the proxy keeps serving.

use std::thread;

use crate::harness::*;

const POLICY: &str = r#"
outboundByHost = {
  ["ok.test"] = function() return Response.new("fine") end,
  ["raise.test"] = function() error("boom at runtime") end,
  ["nil.test"] = function() return nil end,
  ["table.test"] = function() return { status = 200 } end,
  ["loop.test"] = function() while true do end end,
  ["pcall-loop.test"] = function()
    -- Catching the CPU error must not let a handler run on.
    while true do pcall(function() while true do end end) end
  end,
  ["bomb.test"] = function()
    local t = {}
    for i = 1, 1e9 do t[i] = string.rep("x", 1024 * 1024) .. i end
  end,
  ["sleep.test"] = function(request)
    -- Waits on a slow upstream: wall clock, not CPU.
    return fetch("http://127.0.0.1:" .. request.headers:get("x-port") .. "/slow/5000")
  end,
}
"#;

fn toml() -> &'static str {
    "[limits]\nlua_cpu = \"200ms\"\nlua_memory = \"32MiB\"\nhandler_timeout = \"1s\"\n"
}

#[test]
fn handler_errors_are_500_with_the_request_id() {
    let moat = Moat::policy(POLICY).config(toml()).start();
    for host in ["raise.test", "nil.test", "table.test"] {
        let r = curl(&moat, &format!("http://{host}/"), &[]);
        assert_eq!(r.status, 500, "{host}");
        assert!(r.body.starts_with("policy handler error (request "), "{host}: {}", r.body);
    }
    let log = moat.wait_log("not a Response");
    assert!(log.contains("boom at runtime"), "the log has the message: {log}");
    assert!(log.contains("policy.lua:4:"), "the log has file:line: {log}");
    assert!(log.contains("handler returned nil, not a Response"), "{log}");
    assert_eq!(curl(&moat, "http://ok.test/", &[]).body, "fine");
}

#[test]
fn cpu_memory_and_wall_clock_limits_while_others_keep_succeeding() {
    let up = Upstream::start();
    let moat = Moat::policy(POLICY).config(toml()).start();
    let port = up.addr.port().to_string();
    // Run the bad handlers concurrently with good requests.
    let bad = ["loop.test", "pcall-loop.test", "bomb.test", "sleep.test"].map(|h| {
        let proxy = moat.proxy_url();
        let port = port.clone();
        thread::spawn(move || (h, curl_via(&proxy, &format!("http://{h}/"), &["-H", &format!("x-port: {port}")])))
    });
    for _ in 0..20 {
        let r = curl(&moat, "http://ok.test/", &[]);
        assert_eq!((r.status, r.body.as_str()), (200, "fine"));
    }
    for t in bad {
        let (host, r) = t.join().unwrap();
        let want = if host == "sleep.test" { 504 } else { 500 };
        assert_eq!(r.status, want, "{host}: {}", r.body);
    }
    // A request's log line is written after its answer: wait for each.
    for needle in ["exceeded limits.lua_cpu", "exceeded limits.lua_memory", "exceeded limits.handler_timeout"] {
        let log = moat.wait_log(needle);
        assert!(log.contains(needle), "{log}");
    }
    // Still healthy afterwards, memory given back.
    for _ in 0..5 {
        assert_eq!(curl(&moat, "http://ok.test/", &[]).status, 200);
    }
}

#[test]
fn body_buffer_limit_is_a_lua_error() {
    let up = Upstream::start();
    let policy = format!(
        r#"
outboundByHost = {{ ["read.test"] = function(request)
  local ok, err = pcall(function() return fetch("http://127.0.0.1:{}/bytes/5000"):text() end)
  return Response.new(ok and "read" or tostring(err))
end }}"#,
        up.addr.port()
    );
    let moat = Moat::policy(&policy).limit("body_buffer", "4KiB").start();
    let r = curl(&moat, "http://read.test/", &[]);
    assert!(r.body.contains("larger than the body_buffer limit"), "{}", r.body);
}
