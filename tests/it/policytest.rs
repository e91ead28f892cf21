//! `moat test`: policy tests run against the real engine with fixtures for the network; the
//! reload gate of a class that names its tests.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

const POLICY: &str = r#"
interceptHttps = true
redactSecrets = false
allowedHosts = { "api.github.com", "files.test", "meta.test" }
outboundByHost = {
  ["api.github.com"] = function(request, env)
    request.headers:set("authorization", "Bearer " .. env.GITHUB_TOKEN)
    return fetch(request)
  end,
  ["files.test"] = function(request, env, ctx)
    env.KV:put(ctx.containerId, request:text())
    return Response.new("stored", { status = 201 })
  end,
}
"#;

/// Passing tests: HTTPS interception with injection, what reached the fixture, KV state,
/// egress over plain HTTP, a denial and a blocked address.
const PASSING: &str = r#"
secrets = { GITHUB_TOKEN = "ghp_0123456789abcdef" }
hosts = { ["meta.test"] = "169.254.169.254" }

test("the token reaches GitHub, not the container", function(t)
  t.upstream("api.github.com", function(req) return { status = 200, headers = { ["x-seen"] = req.path }, body = "hello" } end)
  local r = t.send{ url = "https://api.github.com/user?page=2", headers = { authorization = "Bearer fake" } }
  t.eq(r.status, 200)
  t.eq(r.body, "hello")
  t.eq(r.headers["x-seen"], "/user?page=2")
  t.eq(r.decision, "handler")
  t.eq(r.detail, 'outboundByHost["api.github.com"]')
  t.eq(#t.sent, 1)
  t.eq(t.sent[1].url, "https://api.github.com/user?page=2")
  t.eq(t.sent[1].headers.authorization, "Bearer ghp_0123456789abcdef")
end)

test("a handler's KV writes are there after, per container", function(t)
  t.eq(t.env.KV:get("agent-7"), nil)
  local r = t.send{ method = "PUT", url = "http://files.test/x", body = "payload", container = "agent-7" }
  t.eq(r.status, 201)
  t.eq(t.env.KV:get("agent-7"), "payload")
  t.eq(#t.sent, 0)
end)

test("hosts outside allowedHosts are denied before anything is sent", function(t)
  local r = t.send{ url = "https://elsewhere.test/" }
  t.eq(r.status, 520)
  t.eq(r.decision, "deny")
  t.eq(r.detail, "not-allowed")
  t.eq(#t.sent, 0)
end)

test("an allowed name that resolves to a metadata address is refused at dial time", function(t)
  local r = t.send{ url = "http://meta.test/latest" }
  t.eq(r.status, 520)
  t.contains(r.detail, '169.254.169.254 is link-local; an allowedHosts entry "169.254.169.254" or a CIDR around it would allow it')
  t.eq(#t.sent, 0)
end)

test("an override for one container changes only its decisions", function(t)
  t.override("agent-9", { allowedHosts = { "extra.test" } })
  t.upstream("extra.test", "extra")
  t.eq(t.send{ url = "http://extra.test/", container = "agent-9" }.body, "extra")
  t.eq(t.send{ url = "http://extra.test/", container = "agent-1" }.detail, "not-allowed")
  t.eq(#t.sent, 1)
end)
"#;

/// Failing tests: a wrong expectation (which names a secret), a response carrying the
/// secret, and a request no fixture answers.
const FAILING: &str = r#"
policy = "agent.lua"
secrets = { GITHUB_TOKEN = "ghp_0123456789abcdef" }

test("passes", function(t)
  t.upstream("api.github.com", "ok")
  t.eq(t.send{ url = "https://api.github.com/" }.body, "ok")
end)

test("wrong expectation", function(t)
  t.upstream("api.github.com", "ok")
  t.send{ url = "https://api.github.com/" }
  t.eq(t.sent[1].headers.authorization, "token ghp_0123456789abcdef")
end)

test("echoes the secret", function(t)
  t.upstream("api.github.com", function(req) return req.headers.authorization end)
  t.send{ url = "https://api.github.com/" }
end)

test("no fixture", function(t)
  t.send{ url = "https://api.github.com/repos" }
end)
"#;

#[test]
fn passing_tests_print_one_line_each_and_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "agent.lua", POLICY);
    write(dir.path(), "agent_test.lua", PASSING);
    let (code, out, err) = moat_cmd(&["test", "agent_test.lua"], dir.path());
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "ok    agent_test.lua: the token reaches GitHub, not the container\n\
         ok    agent_test.lua: a handler's KV writes are there after, per container\n\
         ok    agent_test.lua: hosts outside allowedHosts are denied before anything is sent\n\
         ok    agent_test.lua: an allowed name that resolves to a metadata address is refused at dial time\n\
         ok    agent_test.lua: an override for one container changes only its decisions\n\
         5 passed, 0 failed\n"
    );
    // Found without naming it: POLICY_test.lua beside the policy.
    let (code, out, _) = moat_cmd(&["test", "--policy", "agent.lua"], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("5 passed, 0 failed\n"), "{out}");
    // Each test had a database of its own, in a folder that is gone.
    assert!(!dir.path().join(".moat").exists());
}

#[test]
fn failing_tests_say_why_exit_1_and_never_print_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "agent.lua", POLICY);
    write(dir.path(), "failing.lua", FAILING);
    let (code, out, err) = moat_cmd(&["test", "failing.lua"], dir.path());
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        out,
        "ok    failing.lua: passes\n\
         FAIL  failing.lua: wrong expectation\n      \
         failing.lua:13: expected \"token [secret GITHUB_TOKEN]\", got \"Bearer [secret GITHUB_TOKEN]\"\n\
         FAIL  failing.lua: echoes the secret\n      \
         the response to GET https://api.github.com/ carries the value of secret GITHUB_TOKEN (set redactSecrets = true, or do not echo it)\n\
         FAIL  failing.lua: no fixture\n      \
         GET https://api.github.com/repos reached the network and no fixture answers it (add t.upstream(\"api.github.com\", ...))\n\
         1 passed, 3 failed\n"
    );
    assert!(!out.contains("ghp_") && !err.contains("ghp_"), "{out}{err}");
    assert_eq!(err, "moat: some tests failed\n");
}

#[test]
fn a_test_file_that_does_not_load_or_finds_no_policy_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "broken_test.lua", "test(\"x\", function(t) end\n");
    let (code, out, _) = moat_cmd(&["test", "broken_test.lua"], dir.path());
    assert_eq!(code, 1);
    assert!(out.starts_with("FAIL  broken_test.lua: "), "{out}");
    write(dir.path(), "orphan_test.lua", "test(\"x\", function(t) end)\n");
    let (code, out, _) = moat_cmd(&["test", "orphan_test.lua"], dir.path());
    assert_eq!(code, 1);
    assert!(out.contains("orphan.lua") && out.contains("No such file"), "{out}");
    let (code, _, err) = moat_cmd(&["test", "--policy", "nothing.lua"], dir.path());
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "moat: no test files: write POLICY_test.lua beside the policy, or name files (moat test FILE...)\n"
    );
}

/// A version of the policy, and tests that pass only for the good versions.
fn versioned(v: &str) -> String {
    format!("outboundByHost = {{ [\"v.test\"] = function() return Response.new(\"{v}\") end }}\n")
}

const GATE_TESTS: &str = r#"
test("answers with a good version", function(t)
  t.contains(t.send{ url = "http://v.test/" }.body, "good")
end)
"#;

#[test]
fn a_class_with_tests_serves_a_new_generation_only_if_they_pass() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "agent.lua", &versioned("good-1"));
    write(dir.path(), "agent_test.lua", GATE_TESTS);
    write(
        dir.path(),
        "moat.toml",
        "[[class]]\npolicy = \"agent.lua\"\nlisten = \"127.0.0.1:0\"\ntests = \"agent_test.lua\"\n",
    );
    let mut cmd = Command::new(MOAT);
    cmd.args(["serve", "--config", "moat.toml", "--data-dir", "data"]).current_dir(dir.path());
    let moat = Moat::spawn(cmd, tempfile::tempdir().unwrap());
    assert_eq!(curl(&moat, "http://v.test/", &[]).body, "good-1");
    // A save that fails the tests is not served.
    std::fs::write(&policy, versioned("bad")).unwrap();
    let log = moat.wait_log("fails its tests");
    assert!(
        log.contains("serving generation 1")
            && log.contains("1 of 1 test(s) in")
            && log.contains("answers with a good version"),
        "{log}"
    );
    for _ in 0..3 {
        assert_eq!(curl(&moat, "http://v.test/", &[]).body, "good-1");
    }
    // One that passes is.
    std::fs::write(&policy, versioned("good-2")).unwrap();
    let start = Instant::now();
    while curl(&moat, "http://v.test/", &[]).body != "good-2" {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", moat.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_bundled_policys_tests_pass() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut ran = 0;
    for entry in std::fs::read_dir(root.join("scripts")).unwrap().flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with("_test.lua") {
            let (code, out, err) = moat_cmd(&["test", path.to_str().unwrap()], root);
            assert_eq!(code, 0, "{}:\n{out}{err}", path.display());
            assert!(out.ends_with(" 0 failed\n") && !out.contains("FAIL"), "{out}");
            ran += 1;
        }
    }
    assert!(ran >= 1);
}

#[test]
fn init_writes_each_recipe_with_tests_that_pass_where_it_is_written() {
    for name in [
        None,
        Some("agent-sandbox"),
        Some("github"),
        Some("llm-keys"),
        Some("registries"),
        Some("aws"),
        Some("bridges"),
        Some("audit-log"),
        Some("budgets"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["init"];
        args.extend(name.map(|n| ["--recipe", n]).iter().flatten());
        args.push(dir.path().to_str().unwrap());
        let (code, out, err) = moat_cmd(&args, dir.path());
        assert_eq!(code, 0, "{name:?}: {out}{err}");
        for file in [".luarc.json", "types/moat.lua", "types/moat/auth.lua", "types/env.lua", "moat.toml"] {
            assert!(dir.path().join(file).exists(), "{name:?}: {file}");
        }
        // Its tests pass where it was written, found through the moat.toml it wrote.
        let (code, out, err) = moat_cmd(&["test"], dir.path());
        assert_eq!(code, 0, "{name:?}: {out}{err}");
        assert!(out.ends_with(" 0 failed\n"), "{out}");
        // And it checks clean once its secrets are set.
        let secrets = std::fs::read_to_string(dir.path().join("moat.toml")).unwrap();
        let mut check = std::process::Command::new(MOAT);
        check.args(["check", "--strict"]).current_dir(dir.path());
        for line in secrets.lines().filter(|l| l.contains("= { env = ")) {
            check.env(line.split_whitespace().next().unwrap(), "set-for-the-check");
        }
        let out = check.output().unwrap();
        assert!(out.status.success(), "{name:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Never over what is there.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "moat.toml", "");
    let (code, _, err) = moat_cmd(&["init", "--recipe", "github", "."], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("moat.toml already exists; not overwriting"), "{err}");
}
