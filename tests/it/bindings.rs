//! env bindings (SPEC 6): KV namespaces on redb, ctx.storage, secrets; the quickstart.

use std::process::Command;

use crate::harness::*;

const KV_POLICY: &str = r#"
local json = require("moat.json")
outboundByHost = {
  ["kv.test"] = function(request, env, ctx)
    local u = URL.new(request.url)
    local op, key = u.searchParams:get("op"), u.pathname:sub(2)
    if op == "put" then
      local ttl = u.searchParams:get("ttl")
      env.KV:put(key, request:text(), { expirationTtl = ttl and tonumber(ttl), metadata = { n = 1 } })
      return Response.new("ok")
    elseif op == "delete" then
      env.KV:delete(key)
      return Response.new("deleted")
    elseif op == "json" then
      return Response.new(tostring(env.KV:get(key, { type = "json" }).a))
    elseif op == "meta" then
      local v, m = env.KV:getWithMetadata(key)
      return Response.new(v .. " " .. json.encode(m))
    elseif op == "list" then
      local out, cursor = {}, nil
      repeat
        local page = env.KV:list({ prefix = u.searchParams:get("prefix"), limit = 2, cursor = cursor })
        for _, k in ipairs(page.keys) do out[#out + 1] = k.name end
        cursor = page.cursor
      until page.list_complete
      return Response.new(table.concat(out, ","))
    elseif op == "bad" then
      local ok, err = pcall(function() env.KV:put(string.rep("k", 513), "v") end)
      return Response.new(tostring(err))
    end
    local v = env.KV:get(key)
    if v == nil then return Response.new("missing", { status = 404 }) end
    return Response.new(v)
  end,
  ["blob.test"] = function(request, env, ctx)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then env.BUCKET:put(key, request.body) return Response.new("ok") end
    local obj = env.BUCKET:get(key)
    if obj == nil then return Response.new("missing", { status = 404 }) end
    return Response.new(obj.body)
  end,
  ["notes.test"] = function(request, env, ctx)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then ctx.storage:put(key, request:text()) return Response.new("ok") end
    return Response.new(ctx.storage:get(key) or "none")
  end,
  ["secret.test"] = function(request, env, ctx)
    console.log("token is", env.API_TOKEN)
    local r = Request.new("http://127.0.0.1:" .. request.headers:get("x-port") .. "/echo")
    r.headers:set("authorization", "Bearer " .. env.API_TOKEN)
    local up = fetch(r):json()
    if up.headers.authorization ~= "Bearer " .. env.API_TOKEN then error("not injected") end
    error("failing on purpose with " .. env.API_TOKEN)
  end,
}
"#;

fn kv(moat: &Moat, path: &str, extra: &[&str]) -> (u16, String) {
    let r = curl(moat, &format!("http://kv.test/{path}"), extra);
    (r.status, r.body)
}

#[test]
fn kv_calls_and_edge_cases() {
    let moat = Moat::start(KV_POLICY);
    assert_eq!(kv(&moat, "nothing", &[]), (404, "missing".into()), "a missing key is nil");
    assert_eq!(kv(&moat, "k1?op=put", &["--data", "v1"]).0, 200);
    assert_eq!(kv(&moat, "k1", &[]), (200, "v1".into()));
    assert_eq!(kv(&moat, "k1?op=meta", &[]), (200, r#"v1 {"n":1}"#.into()));
    assert_eq!(kv(&moat, "k1?op=put", &["--data", "v2"]).0, 200);
    assert_eq!(kv(&moat, "k1", &[]).1, "v2", "put overwrites");
    assert_eq!(kv(&moat, "doc?op=put", &["--data", r#"{"a":42}"#]).0, 200);
    assert_eq!(kv(&moat, "doc?op=json", &[]).1, "42");
    for k in ["p/1", "p/2", "p/3", "p/4", "p/5", "q/1"] {
        kv(&moat, &format!("{k}?op=put"), &["--data", "x"]);
    }
    assert_eq!(kv(&moat, "?op=list&prefix=p/", &[]).1, "p/1,p/2,p/3,p/4,p/5", "pagination with limit 2");
    assert_eq!(kv(&moat, "k1?op=delete", &[]).0, 200);
    assert_eq!(kv(&moat, "k1", &[]).0, 404);
    assert!(kv(&moat, "?op=bad", &[]).1.contains("the limit is 512"));
    // TTL: gone after it expires.
    assert_eq!(kv(&moat, "short?op=put&ttl=1", &["--data", "brief"]).0, 200);
    assert_eq!(kv(&moat, "short", &[]).1, "brief");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(kv(&moat, "short", &[]).0, 404, "expired");
}

#[test]
fn storage_is_private_per_container_and_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", KV_POLICY);
    let start = || Moat::serve_folder(dir.path());
    let moat = start();
    assert_eq!(curl(&moat, "http://notes.test/n", &["-U", "alice:", "-X", "PUT", "--data", "alice's"]).body, "ok");
    assert_eq!(curl(&moat, "http://notes.test/n", &["-U", "bob:"]).body, "none", "bob cannot read alice's storage");
    assert_eq!(curl(&moat, "http://notes.test/n", &["-U", "alice:"]).body, "alice's");
    assert_eq!(kv(&moat, "kept?op=put", &["--data", "durable"]).0, 200);
    drop(moat);
    let moat = start();
    assert_eq!(kv(&moat, "kept", &[]).1, "durable");
    assert_eq!(curl(&moat, "http://notes.test/n", &["-U", "alice:"]).body, "alice's");
}

#[test]
fn secrets_reach_the_upstream_but_never_the_log_or_an_error_body() {
    let up = Upstream::start();
    let secret = "sk-live-5f1e2d3c4b5a69788796";
    let moat = Moat::policy(KV_POLICY).secret("API_TOKEN", secret).start();
    let r = curl(&moat, "http://secret.test/", &["-H", &format!("x-port: {}", up.addr.port())]);
    assert_eq!(r.status, 500);
    assert!(!r.body.contains(secret), "{}", r.body);
    assert_eq!(up.last().unwrap().headers["authorization"], format!("Bearer {secret}"));
    let log = moat.wait_log("failing on purpose");
    assert!(!log.contains(secret), "{log}");
    assert!(log.contains("token is [secret API_TOKEN]"), "{log}");
    assert!(log.contains("failing on purpose with [secret API_TOKEN]"), "{log}");
}

#[test]
fn the_readme_quickstart_answers_from_kv() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(MOAT);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/quickstart.lua"))
        .current_dir(dir.path());
    let moat = Moat::spawn(cmd, dir);
    let r = curl(&moat, "http://my.kv/greeting", &["-U", "agent-1:", "-X", "PUT", "--data", "hello from KV"]);
    assert_eq!(r.status, 201);
    let r = curl(&moat, "http://my.kv/greeting", &["-U", "agent-1:"]);
    assert_eq!((r.status, r.body.as_str(), r.headers["x-written-by"].as_str()), (200, "hello from KV\n", "agent-1"));
    assert_eq!(curl(&moat, "http://my.kv/", &[]).body, r#"{"complete":true,"keys":["greeting"]}"#);
    curl(&moat, "http://my.notes/n", &["-U", "agent-1:", "-X", "PUT", "--data", "mine"]);
    assert_eq!(curl(&moat, "http://my.notes/n", &["-U", "agent-2:"]).status, 404);
    let r = curl(&moat, "http://example.com/", &[]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "internet-disabled"));
}

#[test]
fn acknowledged_kv_puts_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", KV_POLICY);
    let start = || Moat::serve_folder(dir.path());
    let moat = start();
    let pid = moat.pid();
    let proxy = moat.proxy_url();
    // Writers acknowledge each put only after moat answered it: even ones write KV, odd ones
    // write blobs.
    let writers: Vec<_> = (0..4u32)
        .map(|w| {
            let proxy = proxy.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..10_000 {
                    let key = format!("w{w}-{i}");
                    let (method, url) = if w.is_multiple_of(2) {
                        ("POST", format!("http://kv.test/{key}?op=put"))
                    } else {
                        ("PUT", format!("http://blob.test/{key}"))
                    };
                    let out = Command::new("curl")
                        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--noproxy", ""])
                        .args(["-x", &proxy, "-X", method, "--data", &format!("value-{key}"), &url])
                        .output()
                        .unwrap();
                    if String::from_utf8_lossy(&out.stdout) != "200" {
                        break; // moat is gone
                    }
                    acked.push(key);
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let acked: Vec<String> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(acked.len() > 10, "the writers made progress before the kill ({})", acked.len());
    drop(moat);
    let moat = start();
    for key in &acked {
        let writer: u32 = key[1..2].parse().unwrap();
        let url =
            if writer.is_multiple_of(2) { format!("http://kv.test/{key}") } else { format!("http://blob.test/{key}") };
        let r = curl(&moat, &url, &[]);
        assert_eq!((r.status, r.body), (200, format!("value-{key}")), "acknowledged put {key} lost");
    }
    let writers_acked = acked.iter().map(|k| &k[..2]).collect::<std::collections::BTreeSet<_>>();
    assert_eq!(writers_acked.len(), 4, "every writer got puts acknowledged: {writers_acked:?}");
}

#[test]
fn kv_cli_works_with_and_without_a_running_moat() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", KV_POLICY);
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    // No moat running: the CLI opens the database itself.
    assert_eq!(moat_cmd(&["kv", "--data-dir", d, "put", "KV", "offline", "written without moat"], dir.path()).0, 0);
    let (code, out, _) = moat_cmd(&["kv", "--data-dir", d, "get", "KV", "offline"], dir.path());
    assert_eq!((code, out.as_str()), (0, "written without moat"));
    let (code, _, err) = moat_cmd(&["kv", "--data-dir", d, "get", "NOPE", "x"], dir.path());
    assert_eq!(code, 2, "{err}");

    // With moat running, the same commands go through its admin API, on the same data.
    let moat = Moat::serve_folder(dir.path());
    assert_eq!(kv(&moat, "offline", &[]).1, "written without moat");
    assert_eq!(moat_cmd(&["kv", "--data-dir", d, "put", "KV", "online", "via admin"], dir.path()).0, 0);
    assert_eq!(kv(&moat, "online", &[]).1, "via admin", "the policy sees what the CLI wrote");
    assert_eq!(kv(&moat, "fromlua?op=put", &["--data", "lua value"]).0, 200);
    let (code, out, _) = moat_cmd(&["kv", "--data-dir", d, "get", "KV", "fromlua"], dir.path());
    assert_eq!((code, out.as_str()), (0, "lua value"));
    let (_, out, _) = moat_cmd(&["kv", "--data-dir", d, "list", "KV"], dir.path());
    assert_eq!(out, "fromlua\noffline\nonline\n");
    assert_eq!(moat_cmd(&["kv", "--data-dir", d, "delete", "KV", "online"], dir.path()).0, 0);
    let (code, _, err) = moat_cmd(&["kv", "--data-dir", d, "get", "KV", "online"], dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no key"), "{err}");
}

/// An upstream that answers once with a chunked body whose chunks split `text` in two.
fn split_upstream(text: String) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let (a, b) = text.split_at(text.len() / 2);
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{a}\r\n",
            a.len()
        );
        let _ = s.flush();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _ = write!(s, "{:x}\r\n{b}\r\n0\r\n\r\n", b.len());
    });
    addr
}

#[test]
fn redact_secrets_cleans_what_an_upstream_reflects() {
    let up = Upstream::start();
    let secret = "ghp_0123456789abcdefABCDEF";
    let policy = r#"
redactSecrets = true
allowedHosts = { "127.0.0.1", "gh.test" }
outboundByHost = {
  ["gh.test"] = function(request, env)
    local r = Request.new("http://127.0.0.1:" .. request.headers:get("x-port") .. "/reflect-secret")
    r.headers:set("authorization", "Bearer " .. env.GITHUB_TOKEN)
    r.headers:set("accept-encoding", "gzip, br")
    return fetch(r)
  end,
}"#;
    let moat = Moat::policy(policy).secret("GITHUB_TOKEN", secret).start();
    let r = curl(&moat, "http://gh.test/", &["-H", &format!("x-port: {}", up.addr.port())]);
    assert_eq!(
        up.last().unwrap().headers["authorization"],
        format!("Bearer {secret}"),
        "the upstream got the real token"
    );
    assert_eq!(r.body, "you sent Bearer [secret GITHUB_TOKEN]");
    assert_eq!(r.headers["x-reflected"], "Bearer [secret GITHUB_TOKEN]");
    // Compressed bodies would hide a reflection: moat asks for uncompressed ones (fetch and
    // egress), and refuses a compressed one it gets anyway.
    assert!(!up.last().unwrap().headers.contains_key("accept-encoding"), "fetch");
    curl(&moat, &up.url("/plain"), &["-H", "Accept-Encoding: gzip"]);
    assert!(!up.last().unwrap().headers.contains_key("accept-encoding"), "egress");
    let gz =
        raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n\x1f\x8b\x08\x00", false);
    let r = curl(&moat, &format!("http://127.0.0.1:{gz}/"), &[]);
    assert_eq!(r.status, 502);
    assert!(r.body.contains("gzip-encoded body, which moat cannot inspect"), "{}", r.body);
    // A value split across two body chunks is still caught (egress path).
    let split = split_upstream(format!("before {secret} after"));
    let r = curl(&moat, &format!("http://{split}/"), &[]);
    assert_eq!(r.body, "before [secret GITHUB_TOKEN] after");
    // Without redactSecrets, the reflection passes (the policy author chose so).
    let plain = Moat::policy(&policy.replace("redactSecrets = true", "")).secret("GITHUB_TOKEN", secret).start();
    let r = curl(&plain, "http://gh.test/", &["-H", &format!("x-port: {}", up.addr.port())]);
    assert!(r.body.contains(secret));
}

#[test]
fn secrets_are_read_again_at_reload() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "token.txt", "first-secret-value\n");
    write(dir.path(), "moat.toml", "[secrets]\nTOKEN = { file = \"token.txt\" }\n");
    write(
        dir.path(),
        "policy.lua",
        r#"outboundByHost = { ["t.test"] = function(r, env) return Response.new(#env.TOKEN .. ":" .. env.TOKEN:sub(1, 5)) end }"#,
    );
    let mut cmd = Command::new(MOAT);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.path().join("moat.toml"))
        .arg("--policy")
        .arg(dir.path().join("policy.lua"))
        .arg("--data-dir")
        .arg(dir.path().join("data"));
    let moat = Moat::spawn(cmd, tempfile::tempdir().unwrap());
    assert_eq!(curl(&moat, "http://t.test/", &[]).body, "18:first");
    write(dir.path(), "token.txt", "second-secret-value-longer\n");
    assert!(Command::new("kill").args(["-HUP", &moat.pid().to_string()]).status().unwrap().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let body = curl(&moat, "http://t.test/", &[]).body;
        if body == "26:secon" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {body}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!moat.logs().contains("second-secret-value-longer"));
}

#[test]
fn the_quickstart_scopes_files_per_container_and_injects_credentials() {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "moat.toml", &format!("[vars]\nDEMO_UPSTREAM = \"{}\"\n", up.addr));
    let mut cmd = Command::new(MOAT);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config", "moat.toml", "--policy"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/quickstart.lua"))
        .env("MOAT_SECRET_DEMO_TOKEN", "demo-token-123456")
        .current_dir(dir.path());
    let moat = Moat::spawn(cmd, dir);
    let r = curl(
        &moat,
        "http://my.r2/notes/a.txt",
        &["-U", "agent-1:", "-X", "PUT", "-H", "content-type: text/plain", "--data-binary", "file body"],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = curl(&moat, "http://my.r2/notes/a.txt", &["-U", "agent-1:"]);
    assert_eq!((r.status, r.body.as_str(), r.headers["content-type"].as_str()), (200, "file body", "text/plain"));
    assert_eq!(curl(&moat, "http://my.r2/notes/a.txt", &["-U", "agent-2:"]).status, 404, "per-container folders");
    let r = curl(&moat, "http://api.local/v1/things?x=1", &["-U", "agent-1:"]);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = up.last().unwrap();
    assert_eq!(
        (seen.uri.as_str(), seen.headers["authorization"].as_str()),
        ("/v1/things?x=1", "Bearer demo-token-123456")
    );
    assert!(r.body.contains("Bearer [secret DEMO_TOKEN]"), "the echo is redacted: {}", r.body);
    assert!(!moat.logs().contains("demo-token-123456"));
}
