//! Per-container overrides (SPEC 7.2) through the admin API, the CLI and Lua; persistence;
//! `moat status`; `GET /metrics` (SPEC 7.3, 11).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

const POLICY: &str = r#"
allowedHosts = { "a.test", "x.test", "lua.test", "err.test" }
outboundByHost = {
  ["a.test"] = function() return Response.new("class-a") end,
  ["err.test"] = function() error("deliberate") end,
}
outboundHandlers = {
  h1 = function(r, env, ctx) return Response.new("h1 " .. (ctx.params and ctx.params.tag or "-")) end,
  h2 = function() return Response.new("h2") end,
  grant = function(r, env, ctx)
    moat.container(ctx.containerId):allowHost("granted.test")
    local ok, err = pcall(function() moat.container(ctx.containerId):setOutboundHandler("nope") end)
    return Response.new(tostring(err))
  end,
}
function outbound() return Response.new("class-catch-all") end
"#;

fn get(moat: &Moat, id: &str, host: &str) -> (u16, String) {
    let r = curl(moat, &format!("http://{host}/"), &["-U", &format!("{id}:")]);
    (r.status, r.body)
}

fn socket(moat: &Moat) -> PathBuf {
    moat.dir.path().join("data/admin.sock")
}

#[test]
fn every_setter_through_the_admin_api_follows_the_decision_order() {
    let moat = Moat::start(POLICY);
    let s = socket(&moat);
    let c = "/v1/containers/c1";
    // Step 3 beats step 4: an instance per-host override beats the class's exact key.
    let (code, _) =
        admin(&s, "PUT", &format!("{c}/outbound-by-host/a.test"), Some(r#"{"method":"h1","params":{"tag":"p"}}"#));
    assert_eq!(code, 200);
    assert_eq!(get(&moat, "c1", "a.test"), (200, "h1 p".into()));
    assert_eq!(get(&moat, "c2", "a.test"), (200, "class-a".into()), "other containers keep the class policy");
    // Step 5 beats step 6; per-host (3) still beats the runtime catch-all (5).
    assert_eq!(admin(&s, "PUT", &format!("{c}/outbound-handler"), Some(r#"{"method":"h2"}"#)).0, 200);
    assert_eq!(get(&moat, "c1", "x.test"), (200, "h2".into()));
    assert_eq!(get(&moat, "c1", "a.test"), (200, "h1 p".into()));
    // An unknown handler changes nothing, with Cloudflare's message.
    let (code, body) = admin(&s, "PUT", &format!("{c}/outbound-handler"), Some(r#"{"method":"nope"}"#));
    assert_eq!(code, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "Outbound handler method 'nope' not found in outboundHandlers for policy");
    assert_eq!(v["code"], "unknown_handler");
    assert_eq!(get(&moat, "c1", "x.test"), (200, "h2".into()));
    // setOutboundByHosts validates everything first, then replaces the whole map.
    let (code, _) = admin(&s, "PUT", &format!("{c}/outbound-by-hosts"), Some(r#"{"x.test":"h1","a.test":"missing"}"#));
    assert_eq!(code, 400);
    assert_eq!(get(&moat, "c1", "a.test"), (200, "h1 p".into()));
    assert_eq!(
        admin(&s, "PUT", &format!("{c}/outbound-by-hosts"), Some(r#"{"x.test":{"method":"h1","params":{"tag":"m"}}}"#))
            .0,
        200
    );
    assert_eq!(get(&moat, "c1", "x.test"), (200, "h1 m".into()));
    assert_eq!(get(&moat, "c1", "a.test"), (200, "class-a".into()), "a.test left the replaced map");
    assert_eq!(admin(&s, "DELETE", &format!("{c}/outbound-by-host/x.test"), None).0, 200);
    assert_eq!(get(&moat, "c1", "x.test"), (200, "h2".into()));
    assert_eq!(admin(&s, "DELETE", &format!("{c}/outbound-handler"), None).0, 200);
    assert_eq!(get(&moat, "c1", "x.test"), (200, "class-catch-all".into()));
    // Deny beats all.
    assert_eq!(admin(&s, "PUT", &format!("{c}/outbound-by-host/a.test"), Some(r#""h2""#)).0, 200);
    assert_eq!(admin(&s, "POST", &format!("{c}/denied-hosts/a.test"), None).0, 200);
    let r = curl(&moat, "http://a.test/", &["-U", "c1:"]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "denied-host"));
    assert_eq!(admin(&s, "DELETE", &format!("{c}/denied-hosts/a.test"), None).0, 200);
    assert_eq!(get(&moat, "c1", "a.test"), (200, "h2".into()));
    assert_eq!(admin(&s, "PUT", &format!("{c}/denied-hosts"), Some(r#"["*.test"]"#)).0, 200);
    assert_eq!(get(&moat, "c1", "x.test").0, 520);
    assert_eq!(admin(&s, "PUT", &format!("{c}/denied-hosts"), Some("[]")).0, 200);
    // allowedHosts: replace, add, remove (exact string), and the empty-list trap.
    assert_eq!(admin(&s, "PUT", &format!("{c}/allowed-hosts"), Some(r#"["x.test"]"#)).0, 200);
    assert_eq!(get(&moat, "c1", "a.test").0, 520);
    assert_eq!(admin(&s, "POST", &format!("{c}/allowed-hosts/%2A.test"), None).0, 200);
    assert_eq!(get(&moat, "c1", "new.test"), (200, "class-catch-all".into()));
    assert_eq!(admin(&s, "DELETE", &format!("{c}/allowed-hosts/*.test"), None).0, 200);
    assert_eq!(admin(&s, "DELETE", &format!("{c}/allowed-hosts/x.test"), None).0, 200);
    let r = curl(&moat, "http://x.test/", &["-U", "c1:"]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "not-allowed"), "an emptied list denies all");
    // The container's view, then clearOverrides restores the class policy.
    let (_, body) = admin(&s, "GET", c, None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["overrides"]["allowedHosts"], serde_json::json!([]));
    // The effective policy: the container's lists and per-host handlers where set, in the
    // order the decision order tries them, else the class's.
    let e = &v["effective"]["policy"];
    assert_eq!(e["allowedHosts"], serde_json::json!([]));
    assert_eq!(e["deniedHosts"], serde_json::json!([]));
    assert_eq!(
        e["outboundByHost"][0],
        serde_json::json!({"host": "a.test", "handler": "outboundHandlers.h2", "from": "container"})
    );
    assert_eq!(e["outboundByHost"][1]["handler"], "outboundByHost[\"a.test\"]");
    assert_eq!(e["outbound"], serde_json::json!({"handler": "outbound"}));
    assert_eq!((e["generation"].as_u64(), e["enableInternet"].as_bool()), (Some(1), Some(true)));
    assert_eq!(admin(&s, "DELETE", &format!("{c}/overrides"), None).0, 200);
    let (_, body) = admin(&s, "GET", c, None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["effective"]["policy"]["allowedHosts"],
        serde_json::json!(["a.test", "x.test", "lua.test", "err.test"])
    );
    assert_eq!(get(&moat, "c1", "a.test"), (200, "class-a".into()));
    assert_eq!(admin(&s, "GET", "/v1/nothing", None).0, 404);
}

#[test]
fn overrides_survive_a_restart_and_the_cli_sets_them() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", POLICY);
    let data = dir.path().join("data");
    let start = || Moat::serve_folder(dir.path());
    let data_s = data.to_str().unwrap();
    let moat = start();
    let (code, out, err) = moat_cmd(
        &["policy", "--data-dir", data_s, "agent-1", "setOutboundByHost", "a.test", "h1", r#"{"tag":"cli"}"#],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(get(&moat, "agent-1", "a.test"), (200, "h1 cli".into()));
    let (code, _, err) =
        moat_cmd(&["policy", "--data-dir", data_s, "agent-1", "setOutboundHandler", "nope"], dir.path());
    assert_eq!(code, 2);
    assert_eq!(err.trim(), "moat: Outbound handler method 'nope' not found in outboundHandlers for policy");
    let (code, out, _) = moat_cmd(&["policy", "--data-dir", data_s, "agent-1", "denyHost", "x.test"], dir.path());
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = moat_cmd(&["status", "--data-dir", data_s], dir.path());
    assert_eq!(code, 0);
    assert!(out.contains("class policy") && out.contains("generation 1"), "{out}");
    drop(moat);

    // A new process on the same data folder restores them.
    let moat = start();
    assert_eq!(get(&moat, "agent-1", "a.test"), (200, "h1 cli".into()));
    assert_eq!(get(&moat, "agent-1", "x.test").0, 520);
    let (code, _, _) = moat_cmd(&["policy", "--data-dir", data_s, "agent-1", "clearOverrides"], dir.path());
    assert_eq!(code, 0);
    assert_eq!(get(&moat, "agent-1", "a.test"), (200, "class-a".into()));
    drop(moat);

    let (code, _, err) = moat_cmd(&["status", "--data-dir", data_s], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("no running moat answers on") && err.lines().count() == 1, "{err}");
}

#[test]
fn lua_sets_overrides_from_a_handler() {
    let moat = Moat::start(POLICY);
    let s = socket(&moat);
    assert_eq!(admin(&s, "PUT", "/v1/containers/c9/outbound-by-host/lua.test", Some(r#""grant""#)).0, 200);
    let (code, body) = get(&moat, "c9", "lua.test");
    assert_eq!(code, 200);
    assert!(body.contains("Outbound handler method 'nope' not found in outboundHandlers for policy"), "{body}");
    // allowHost on a class with allowedHosts extends a copy of the class's list.
    assert_eq!(get(&moat, "c9", "granted.test"), (200, "class-catch-all".into()));
    assert_eq!(get(&moat, "c9", "a.test"), (200, "class-a".into()));
    assert_eq!(get(&moat, "other", "granted.test").0, 520);
}

#[test]
fn status_and_metrics_tell_what_happened() {
    let moat = Moat::start(POLICY);
    let s = socket(&moat);
    for _ in 0..3 {
        assert_eq!(get(&moat, "m", "a.test").0, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(&moat, "m", "denied.test").0, 520);
    }
    assert_eq!(get(&moat, "m", "err.test").0, 500);
    std::fs::write(moat.dir.path().join("policy.lua"), "allowedHosts = 7").unwrap();
    moat.wait_log("policy load failed");
    let (code, body) = admin(&s, "GET", "/v1/status", None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["classes"][0]["generation"], 1);
    assert!(
        v["classes"][0]["lastError"].as_str().unwrap().contains("policy.lua:1: allowedHosts must be a list"),
        "{body}"
    );
    let data = moat.dir.path().join("data");
    let (code, out, err) = moat_cmd(&["status", "--data-dir", data.to_str().unwrap()], moat.dir.path());
    assert_eq!(code, 1, "a class whose last reload failed: {err}");
    assert_eq!(
        err,
        "moat: 1 class(es) not serving their policy file as saved: fix it (moat check; moat test if it has tests)\n"
    );
    assert!(
        out.contains("generation 1") && out.contains("last reload failed") && out.contains("policy.lua:1:"),
        "{out}"
    );

    let (code, text) = admin(&s, "GET", "/metrics", None);
    assert_eq!(code, 200);
    let has = |line: &str| text.lines().any(|l| l == line);
    assert!(has(r#"moat_requests_total{class="policy",decision="handler",status="200"} 3"#), "{text}");
    assert!(has(r#"moat_requests_total{class="policy",decision="deny",status="520"} 2"#), "{text}");
    assert!(has(r#"moat_policy_generation{class="policy"} 1"#), "{text}");
    assert!(has(r#"moat_policy_reload_failures_total{class="policy"} 1"#), "{text}");
    assert!(has(r#"moat_requests_total{class="policy",decision="handler",status="500"} 1"#), "{text}");
    assert!(has(r#"moat_handler_errors_total{class="policy"} 1"#), "{text}");
    assert!(has("moat_request_duration_seconds_count 6"), "{text}");
    assert!(text.contains("moat_open_connections"), "{text}");
    let meta = std::fs::metadata(&s).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn tcp_admin_needs_the_token_and_is_never_a_proxy_destination() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let toml = format!(
        "[admin]\ntcp = \"127.0.0.1:{port}\"\ntoken_env = \"ADMIN_TOKEN\"\n[limits]\nrequest_head_timeout = \"1s\"\n"
    );
    let token = "0123456789abcdef-admin";
    let moat = Moat::policy(r#"allowedHosts = { "127.0.0.1" }"#).config(&toml).env("ADMIN_TOKEN", token).start();
    let url = format!("http://127.0.0.1:{port}/v1/status");
    let out = |args: &[&str]| {
        let o = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*"])
            .args(args)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(out(&[]), "401");
    assert_eq!(out(&["-H", "Authorization: Bearer wrong-token-xxxxxxx"]), "401");
    assert_eq!(out(&["-H", &format!("Authorization: Bearer {token}")]), "200");
    // Through the proxy, the admin address is refused even though 127.0.0.1 is allowed.
    let r = curl(&moat, &url, &["-H", &format!("Authorization: Bearer {token}")]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "blocked-address"));
    // Anyone can connect: one who never finishes a request head, or idles, is let go after
    // request_head_timeout, as on the proxy listener.
    for start in [&b"GET /v1/status HTTP/1.1\r\nHost: x\r\n"[..], b""] {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(15))).unwrap();
        c.write_all(start).unwrap();
        let mut rest = Vec::new();
        let closed = c.read_to_end(&mut rest);
        assert!(closed.is_ok(), "connection still open after 15 s (sent {:?}): {closed:?}", start.len());
    }
}

/// The overrides of `id` as the admin API reports them.
fn spec(s: &Path, id: &str) -> serde_json::Value {
    let (code, body) = admin(s, "GET", &format!("/v1/containers/{id}"), None);
    assert_eq!(code, 200);
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["overrides"].clone()
}

#[test]
fn every_setter_through_the_cli_and_lua() {
    use serde_json::json;
    let policy = format!(
        "{POLICY}\n{}",
        r#"
outboundByHost["drive.test"] = function(request, env, ctx)
  -- Runs every setter on the container named by the path, in order; returns after each step.
  local step = tonumber(URL.new(request.url).searchParams:get("step"))
  local c = moat.container("lua-target")
  local steps = {
    function() c:setOutboundHandler("h1", { tag = "lua" }) end,
    function() c:setOutboundByHost("a.test", "h2") end,
    function() c:setOutboundByHosts({ ["x.test"] = "h1", ["*.test"] = { method = "h2", params = { p = 1 } } }) end,
    function() c:removeOutboundByHost("x.test") end,
    function() c:setAllowedHosts({ "a.test", "b.test" }) end,
    function() c:allowHost("c.test") end,
    function() c:removeAllowedHost("a.test") end,
    function() c:setDeniedHosts({ "d.test" }) end,
    function() c:denyHost("e.test") end,
    function() c:removeDeniedHost("d.test") end,
    function() c:removeOutboundHandler() end,
    function() c:clearOverrides() end,
  }
  steps[step]()
  return Response.new("step " .. step)
end
allowedHosts[#allowedHosts + 1] = "drive.test"
"#
    );
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", &policy);
    let data = dir.path().join("data");
    let moat = Moat::serve_folder(dir.path());
    let s = data.join("admin.sock");
    // The same sequence of setters, with the state expected after each.
    let expected = [
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"a.test": {"method": "h2"}}}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"x.test": {"method": "h1"}, "*.test": {"method": "h2", "params": {"p": 1}}}}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}, "allowedHosts": ["a.test", "b.test"]}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}, "allowedHosts": ["a.test", "b.test", "c.test"]}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}, "allowedHosts": ["b.test", "c.test"]}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}, "allowedHosts": ["b.test", "c.test"], "deniedHosts": ["d.test"]}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}, "allowedHosts": ["b.test", "c.test"], "deniedHosts": ["d.test", "e.test"]}),
        json!({"outboundHandler": {"method": "h1", "params": {"tag": "lua"}}, "outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}, "allowedHosts": ["b.test", "c.test"], "deniedHosts": ["e.test"]}),
        json!({"outboundByHost": {"*.test": {"method": "h2", "params": {"p": 1}}}, "allowedHosts": ["b.test", "c.test"], "deniedHosts": ["e.test"]}),
        json!({}),
    ];
    let d = data.to_str().unwrap();
    let cli_steps: [&[&str]; 12] = [
        &["setOutboundHandler", "h1", r#"{"tag":"lua"}"#],
        &["setOutboundByHost", "a.test", "h2"],
        &["setOutboundByHosts", r#"{"x.test":"h1","*.test":{"method":"h2","params":{"p":1}}}"#],
        &["removeOutboundByHost", "x.test"],
        &["setAllowedHosts", "a.test", "b.test"],
        &["allowHost", "c.test"],
        &["removeAllowedHost", "a.test"],
        &["setDeniedHosts", "d.test"],
        &["denyHost", "e.test"],
        &["removeDeniedHost", "d.test"],
        &["removeOutboundHandler"],
        &["clearOverrides"],
    ];
    for (i, (args, want)) in cli_steps.iter().zip(&expected).enumerate() {
        let mut full = vec!["policy", "--data-dir", d, "cli-target"];
        full.extend_from_slice(args);
        let (code, out, err) = moat_cmd(&full, dir.path());
        assert_eq!(code, 0, "CLI step {i}: {out}{err}");
        assert_eq!(&spec(&s, "cli-target"), want, "after CLI step {i} ({args:?})");
        let r = curl(&moat, &format!("http://drive.test/?step={}", i + 1), &[]);
        assert_eq!(r.status, 200, "Lua step {i}: {}", r.body);
        assert_eq!(&spec(&s, "lua-target"), want, "after Lua step {i}");
    }
}
