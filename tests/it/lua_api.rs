//! The Lua API of SPEC 3, each type observed through a response a client gets.

use std::time::Duration;

use crate::harness::*;

fn api_policy(up: u16) -> String {
    format!(
        r#"
local UP = "http://127.0.0.1:{up}"
local json = require("moat.json")
local helper = require("lib.helper")

outboundByHost = {{
  -- Request: read the client's body as JSON, copy with new method and headers.
  ["request.test"] = function(request, env, ctx)
    local data = request:json()
    local r = Request.new(UP .. "/echo", {{ method = "PUT", headers = {{ ["x-from"] = data.name }}, body = "copied" }})
    local echoed = fetch(r):json()
    return Response.json({{ method = echoed.method, from = echoed.headers["x-from"], body = echoed.body, orig = request.method }})
  end,
  -- Forwarding the container's request keeps its body streaming and its method.
  ["forward.test"] = function(request)
    local r = Request.new(request)
    r.headers:set("x-injected", "yes")
    local target = Request.new(UP .. "/fwd", r)
    return fetch(target)
  end,
  -- Response: status, statusText, headers, json, redirect.
  ["response.test"] = function(request)
    local u = URL.new(request.url)
    local kind = u.searchParams:get("kind")
    if kind == "json" then return Response.json({{ a = 1 }}, {{ status = 201 }}) end
    if kind == "redirect" then return Response.redirect("http://elsewhere.test/x", 307) end
    if kind == "badtext" then return Response.new("x", {{ statusText = "Nope\r\nX-Injected: 1" }}) end
    local r = Response.new("teapot", {{ status = 418, headers = {{ ["x-a"] = "1" }} }})
    r.headers:append("x-a", "2")
    return r
  end,
  -- Headers: case-insensitive get, joined values, has, delete, entries.
  ["headers.test"] = function(request)
    local h = Headers.new({{ ["X-One"] = "1", ["x-list"] = {{ "a", "b" }} }})
    h:append("X-ONE", "2")
    h:delete("x-gone")
    local names = {{}}
    for name, value in h:entries() do names[#names + 1] = name .. "=" .. value end
    return Response.new(table.concat(names, ";") .. "|" .. h:get("x-one") .. "|" .. tostring(h:has("X-List"))
      .. "|" .. #h:getAll("x-list") .. "|" .. (request.headers:get("user-agent") and "ua" or "no-ua"))
  end,
  -- URL: WHATWG parsing and searchParams.
  ["url.test"] = function(request)
    local u = URL.new("../b/c?x=1&y=2#frag", "https://Example.COM:8443/a/z")
    u.searchParams:set("x", "9")
    u.searchParams:append("z", "a b")
    return Response.new(table.concat({{ u.href, u.hostname, u.port, u.pathname, u.search, u.hash, u.origin, tostring(URL.new(request.url)) }}, " "))
  end,
  -- fetch: a URL string follows redirects; the container's own request does not.
  ["fetch.test"] = function(request)
    local followed = fetch(UP .. "/redirect")
    local manual = fetch(Request.new(UP .. "/redirect", {{ redirect = "manual" }}))
    return Response.new(followed.status .. " " .. followed.url .. " " .. manual.status .. " " .. manual.headers:get("location"))
  end,
  ["get-body.test"] = function(request)
    -- A GET with a body is refused by fetch as by Request.new, whether given as is or copied.
    local ok, err = pcall(fetch, request)
    return Response.new(tostring(ok) .. ": " .. tostring(err))
  end,
  ["fetch-manual.test"] = function(request)
    -- Built from the intercepted request: redirect = "manual", as in Workers.
    return fetch(Request.new(UP .. "/redirect", request))
  end,
  -- console, ctx, print.
  ["ctx-vararg.test"] = function(...)
    -- A handler that takes `...` gets ctx too (one without a third parameter gets none).
    local _, _, ctx = ...
    local ok, err = pcall(function() return ctx.nope end)
    return Response.new(select('#', ...) .. " " .. ctx.containerId .. " " .. tostring(ok) .. " " .. tostring(tostring(err):match("unknown field 'nope'")))
  end,
  ["ctx.test"] = function(request, env, ctx)
    console.log("hello from", ctx.containerId, {{ n = 1 }})
    print("printed")
    return Response.new(ctx.containerId .. " " .. ctx.className .. " " .. #ctx.requestId)
  end,
  -- stdlib and require.
  ["stdlib.test"] = function()
    local b64, hex, crypto = require("moat.base64"), require("moat.hex"), require("moat.crypto")
    local out = {{
      json.encode(json.decode('{{"a":[1,2,3]}}')) .. json.encode({{ 6 / 2, 0.5, -0.0, 2^53, 1e300 }}),
      b64.encode("hi?"), b64.decode("aGk/"), b64.urlEncode("hi?"),
      b64.decode("aGk") .. b64.decode("aGk=") .. b64.urlDecode("aGk_") .. b64.urlDecode("aGk="),
      hex.encode("\1\255"), hex.decode("4142"),
      hex.encode(crypto.sha256("abc")),
      hex.encode(crypto.hmac_sha256("key", "The quick brown fox jumps over the lazy dog")),
      tostring(#crypto.randomBytes(7)) .. " " .. tostring(tostring(select(2, pcall(crypto.randomBytes, 2^21))):match("1 MiB") ~= nil),
      tostring(crypto.randomUUID():match("^%x+%-%x+%-4%x+%-[89ab]%x+%-%x+$") ~= nil),
      helper.greet("lua"),
    }}
    return Response.new(table.concat(out, "\n"))
  end,
  -- The sandbox: no io, no os.execute, no debug, no binary chunks.
  ["sandbox.test"] = function()
    local bin = string.dump and "dump" or "nodump"
    local ok = pcall(load, "\27Lua")
    local f = load("\27LuaS")
    local forbidden = pcall(Request.new, "http://a.test/", {{ method = "connect" }}) or pcall(Request.new, "http://a.test/", {{ method = "TRACE" }})
    return Response.new(table.concat({{ tostring(io), tostring(os.execute), tostring(debug), bin, tostring(f), type(os.time()), tostring(forbidden) }}, " "))
  end,
}}
"#
    )
}

#[test]
fn every_api_type_is_observable() {
    let up = Upstream::start();
    // The module must exist before the policy loads: write it, then start.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "lib/helper.lua", "return { greet = function(n) return 'hello ' .. n end }");
    write(dir.path(), "policy.lua", &api_policy(up.addr.port()));
    let mut cmd = std::process::Command::new(MOAT);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(dir.path().join("policy.lua"))
        .env("MOAT_WORKERS", "2");
    let moat = Moat::spawn(cmd, dir);

    let r = curl(&moat, "http://request.test/", &["-d", r#"{"name":"ann"}"#]);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_else(|_| panic!("{}", r.body));
    assert_eq!(v, serde_json::json!({"method": "PUT", "from": "ann", "body": "copied", "orig": "POST"}));

    let r = curl(&moat, "http://forward.test/some/path?q=1", &["-d", "streamed body", "-U", "agent-9:"]);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = up.last().unwrap();
    assert_eq!((seen.method.as_str(), seen.uri.as_str(), seen.body.as_str()), ("POST", "/fwd", "streamed body"));
    assert_eq!(seen.headers["x-injected"], "yes");
    assert!(!seen.headers.contains_key("proxy-authorization"));

    let r = curl(&moat, "http://response.test/", &[]);
    assert_eq!((r.status, r.body.as_str(), r.headers["x-a"].as_str()), (418, "teapot", "1, 2"));
    let r = curl(&moat, "http://response.test/?kind=json", &[]);
    assert_eq!(
        (r.status, r.body.as_str(), r.headers["content-type"].as_str()),
        (201, r#"{"a":1}"#, "application/json")
    );
    let r = curl(&moat, "http://response.test/?kind=redirect", &[]);
    assert_eq!((r.status, r.headers["location"].as_str()), (307, "http://elsewhere.test/x"));
    // A statusText that could break out of a status line is refused (a handler error).
    let r = curl(&moat, "http://response.test/?kind=badtext", &[]);
    assert!(r.status == 500 && !r.headers.contains_key("x-injected"), "{} {}", r.status, r.body);
    assert!(moat.wait_log("statusText must not contain").contains("statusText must not contain control characters"));

    let r = curl(&moat, "http://headers.test/", &["-A", "curl-test"]);
    assert_eq!(r.body, "x-list=a, b;x-one=1, 2|1, 2|true|2|ua");

    let r = curl(&moat, "http://url.test/p?k=v", &[]);
    assert_eq!(
        r.body,
        "https://example.com:8443/b/c?x=9&y=2&z=a+b#frag example.com 8443 /b/c ?x=9&y=2&z=a+b #frag https://example.com:8443 http://url.test/p?k=v"
    );

    let r = curl(&moat, "http://fetch.test/", &[]);
    assert_eq!(r.body, format!("200 {} 302 /echo?redirected=1", up.url("/echo?redirected=1")));
    let r = curl(&moat, "http://fetch-manual.test/", &[]);
    assert_eq!((r.status, r.headers["location"].as_str()), (302, "/echo?redirected=1"));
    let r = curl(&moat, "http://get-body.test/", &["-X", "GET", "-d", "a body"]);
    assert!(r.body.starts_with("false: ") && r.body.contains("a GET or HEAD request cannot have a body"), "{}", r.body);

    let r = curl(&moat, "http://ctx.test/", &["-U", "agent-3:"]);
    assert_eq!(r.body, "agent-3 policy 16");
    let r = curl(&moat, "http://ctx-vararg.test/", &["-U", "agent-3:"]);
    assert_eq!(r.body, "3 agent-3 false unknown field 'nope'");
    let log = moat.wait_log("printed");
    assert!(log.contains(r#"hello from agent-3 {"n":1}"#), "{log}");
    assert!(log.contains("container=\"agent-3\""), "{log}");

    let r = curl(&moat, "http://stdlib.test/", &[]);
    let lines: Vec<&str> = r.body.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"a":[1,2,3]}[3,0.5,0,9007199254740992,1e+300]"#,
            "aGk/",
            "hi?",
            "aGk_",
            "hihihi?hi",
            "01ff",
            "AB",
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8",
            "7 true",
            "true",
            "hello lua"
        ]
    );

    let r = curl(&moat, "http://sandbox.test/", &[]);
    assert_eq!(r.body, "nil nil nil nodump nil number false");
}

#[test]
fn an_upstream_request_is_framed_by_its_body_not_by_copied_headers() {
    let up = Upstream::start();
    let policy = format!(
        r#"local UP = "http://127.0.0.1:{}"
outboundByHost = {{
  -- The classic credential-and-rewrite recipe: copy the container's request, swap the body.
  ["swap.test"] = function(request)
    return fetch(UP .. "/swap", Request.new(request, {{ body = "a longer body than before" }}))
  end,
  -- A handler that sets framing headers itself.
  ["lie.test"] = function(request)
    return fetch(UP .. "/lie", {{ method = "POST", body = "abc", headers = {{ ["content-length"] = "1", ["transfer-encoding"] = "chunked" }} }})
  end,
}}"#,
        up.addr.port()
    );
    let moat = Moat::start(&policy);
    for _ in 0..2 {
        // Twice: the second request reuses the pooled upstream connection, which a wrong
        // length would have left hanging or desynchronised.
        let r = curl(&moat, "http://swap.test/", &["-d", "short"]);
        assert_eq!(r.status, 200, "{}", r.body);
        let seen = up.last().unwrap();
        assert_eq!((seen.body.as_str(), seen.headers["content-length"].as_str()), ("a longer body than before", "25"));
        let r = curl(&moat, "http://lie.test/", &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let seen = up.last().unwrap();
        assert_eq!((seen.body.as_str(), seen.headers.get("content-length").map(String::as_str)), ("abc", Some("3")));
        assert!(!seen.headers.contains_key("transfer-encoding"));
    }
    assert_eq!(up.count(), 4);
}

#[test]
fn a_redirect_to_another_origin_does_not_carry_injected_secrets() {
    let (a, b) = (Upstream::start(), Upstream::start());
    let policy = format!(
        r#"outboundByHost = {{ ["inject.test"] = function(request, env)
  local to = URL.new(request.url).search:sub(2)
  return fetch("http://127.0.0.1:{}/goto?" .. to, {{ headers = {{
    ["x-api-key"] = env.API_KEY, ["x-plain"] = "kept", authorization = "Bearer " .. env.API_KEY }} }})
end }}"#,
        a.addr.port()
    );
    let moat = Moat::policy(&policy).secret("API_KEY", "key-0123456789").start();
    // Same origin: the injected headers follow.
    let r = curl(&moat, &format!("http://inject.test/?{}", a.url("/same")), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = a.last().unwrap();
    assert_eq!((seen.uri.as_str(), seen.headers["x-api-key"].as_str()), ("/same", "key-0123456789"));
    // Another origin: no header that carries the secret is sent there; others are.
    let r = curl(&moat, &format!("http://inject.test/?{}", b.url("/other")), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = b.last().unwrap();
    assert_eq!((seen.uri.as_str(), seen.headers["x-plain"].as_str()), ("/other", "kept"));
    assert!(!seen.headers.contains_key("x-api-key") && !seen.headers.contains_key("authorization"), "{seen:?}");
    let log = moat.wait_log("is not sent on the redirect");
    assert!(log.contains("header x-api-key carries a secret"), "{log}");
    assert!(!log.contains("key-0123456789"), "{log}");
}

#[test]
fn bodies_stream_from_request_to_response_and_a_fetched_response_can_be_rewrapped() {
    let up = Upstream::start();
    let policy = format!(
        r#"outboundByHost = {{
  -- The request body streams straight into the response: moat keeps reading the client
  -- while it writes.
  ["echo.test"] = function(request) return Response.new(request.body, {{ headers = {{ ["x-echo"] = "1" }} }}) end,
  -- The Workers idiom for a changeable copy of a fetched response.
  ["wrap.test"] = function(request)
    local r = fetch("http://127.0.0.1:{}/echo")
    local out = Response.new(r.body, r)
    out.headers:set("x-added", "1")
    return out
  end,
}}"#,
        up.addr.port()
    );
    let moat = Moat::start(&policy);
    let file = moat.dir.path().join("big.bin");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &big).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--noproxy", "", "-x", &moat.proxy_url(), "http://echo.test/"])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == big, "echoed {} of {} bytes", out.stdout.len(), big.len());

    let r = curl(&moat, "http://wrap.test/", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((r.headers["x-upstream"].as_str(), r.headers["x-added"].as_str()), ("echo", "1"));
    assert!(r.body.contains("\"uri\":\"/echo\""), "{}", r.body);
}

#[test]
fn a_fetched_body_left_unread_is_closed_when_the_handler_returns() {
    // The handler looks at a fetched answer's status and answers itself, leaving a 64 MiB body
    // unread. Nothing runs in moat afterwards (so Lua never collects the Response): the
    // upstream connection must still be closed, because the call that got the body ended.
    let (port, closed) = endless_upstream();
    let policy = format!(
        r#"local kept = {{}}
outboundByHost = {{
  ["peek.test"] = function(request)
    kept.answer = fetch("http://127.0.0.1:{port}/")
    return Response.new("upstream said " .. kept.answer.status)
  end,
  -- A later call finds the kept body closed, with an error that says why.
  ["later.test"] = function(request)
    local ok, err = pcall(function() return kept.answer:text() end)
    return Response.new(tostring(ok) .. ": " .. tostring(err))
  end,
}}"#
    );
    // One worker, so that the later call runs on the state that kept the answer.
    let moat = Moat::policy(&policy).workers(1).start();
    let r = curl(&moat, "http://peek.test/", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "upstream said 200"));
    assert!(
        closed.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the unread upstream body still holds its connection open"
    );
    let r = curl(&moat, "http://later.test/", &[]);
    assert!(r.body.starts_with("false: ") && r.body.contains("before its handler call ended"), "{}", r.body);
}

#[test]
fn what_a_container_sends_cannot_forge_log_lines() {
    // A policy that logs what the container sent: line breaks and terminal escapes in it stay
    // inside its own log line, escaped, in both log formats.
    let policy = r#"outboundByHost = { ["log.test"] = function(r)
        console.log("body:", r:text())
        error("failed on: " .. r.headers:get("x-note"))
      end }"#;
    let forged = "x\n2026-01-01T00:00:00.000000Z  INFO moat::access: access forged\r\n\x1b[2Jcleared";
    for format in ["human", "json"] {
        let moat = Moat::policy(policy).arg("--log-format").arg(format).start();
        let r = curl(&moat, "http://log.test/", &["--data-binary", forged, "-H", "x-note: tab\there"]);
        assert_eq!(r.status, 500);
        let logs = moat.wait_log("failed on");
        assert!(logs.contains("failed on"), "{logs}");
        for line in logs.lines() {
            assert!(!line.starts_with("2026-01-01"), "{format}: a forged line:\n{logs}");
            assert!(!line.starts_with("\r") && !line.contains('\u{1b}'), "{format}: raw control bytes:\n{logs:?}");
        }
        let body_line = logs.lines().find(|l| l.contains("body:")).unwrap();
        assert!(body_line.contains("access forged") && body_line.contains("cleared"), "{format}: {body_line}");
    }
}
