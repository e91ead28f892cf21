//! Writing a policy safely: `moat check` finds what `serve` or the first request would hit,
//! and errors a handler meets say what to do.

use crate::harness::*;

/// `moat check ARGS` in `dir`: (exit code, stdout, stderr).
fn check(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["check"];
    all.extend(args);
    moat_cmd(&all, dir)
}

#[test]
fn check_finds_missing_secrets_unusable_extra_ca_and_globals_nothing_defines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "policy.lua",
        r#"allowedHosts = { "github.local" }
outboundByHost = {
  ["github.local"] = function(request, env, ctx)
    local r = Request.new("https://api.github.com/user", request)
    return fetch(auth.bearer(r, env.GITHUB_TOKEN))
  end,
  ["tools.local"] = function(request) return Reponse.new("x") end,
}
"#,
    );
    write(
        d,
        "moat.toml",
        r#"[[class]]
policy = "policy.lua"
[secrets]
GITHUB_TOKEN = { env = "MOAT_TEST_UNSET_VARIABLE" }
KEY = { file = "missing-key.txt" }
[tls]
extra_ca = ["empty.pem"]
"#,
    );
    write(d, "empty.pem", "");
    let (code, out, err) = check(d, &[]);
    assert_eq!(code, 2, "{out}{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[..5],
        [
            "secrets.GITHUB_TOKEN: environment variable MOAT_TEST_UNSET_VARIABLE is not set (export it before moat starts)",
            &format!(
                "secrets.KEY: cannot read {}: No such file or directory (os error 2) (create it, or point file at the right place)",
                "missing-key.txt"
            ),
            &format!(
                "tls.extra_ca: {} has no PEM certificate (list PEM files with at least one certificate)",
                "empty.pem"
            ),
            &format!("{}:5: auth is not defined: add `local auth = require(\"moat.auth\")` at the top", "policy.lua"),
            &format!(
                "{}:7: Reponse is not defined: not moat's API, Lua's library or set by the script (a typo, or a missing `local`?)",
                "policy.lua"
            ),
        ],
        "{err}"
    );
    // The trap of step 2 coming before step 4: a warning, an error under --strict.
    let warning = |line: u32| {
        format!(
            "policy.lua:{line}: warning: outboundByHost[\"tools.local\"] never runs: allowedHosts does not include it and is checked first (add \"tools.local\" to allowedHosts)"
        )
    };
    assert_eq!(lines[5], warning(7), "{err}");
    assert_eq!(lines[6], "moat: 5 problem(s), 1 warning(s): moat serve or the first request would meet them");

    // Fixed as the lines say: no problem; the warning alone exits 0, but not under --strict.
    std::fs::remove_file(d.join("moat.toml")).unwrap();
    write(
        d,
        "policy.lua",
        r#"local auth = require("moat.auth")
local helpers = require("helpers")
allowedHosts = { "github.local" }
outboundByHost = {
  ["github.local"] = function(request, env, ctx)
    local r = Request.new("https://api.github.com/user", request)
    return fetch(auth.bearer(r, shared_token(env)))
  end,
  ["tools.local"] = function(request) return Response.new(helpers.greeting()) end,
}
"#,
    );
    // A module's globals count as defined for the policy, and its reads are checked too.
    write(
        d,
        "helpers.lua",
        "function shared_token(env) return env.GITHUB_TOKEN end\nreturn { greeting = function() return greting end }\n",
    );
    let (code, _, err) = check(d, &["--policy", "policy.lua"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with(&format!("{}:2: greting is not defined", "helpers.lua")), "{err}");
    write(
        d,
        "helpers.lua",
        "function shared_token(env) return env.GITHUB_TOKEN end\nreturn { greeting = function() return 'hi' end }\n",
    );
    let (code, _, err) = check(d, &["--policy", "policy.lua"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, format!("{}\n1 warning(s); --strict makes them errors\n", warning(9)));
    let (code, _, err) = check(d, &["--policy", "policy.lua", "--strict"]);
    assert_eq!(code, 2, "{err}");
    write(
        d,
        "policy.lua",
        &std::fs::read_to_string(d.join("policy.lua"))
            .unwrap()
            .replace("allowedHosts = { \"github.local\" }", "allowedHosts = { \"github.local\", \"tools.local\" }"),
    );
    let (code, _, err) = check(d, &["--policy", "policy.lua", "--strict"]);
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn every_bundled_policy_passes_check_strictly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("scripts")).unwrap().flatten() {
        let path = entry.path();
        // Policies, not their tests (which `moat test` runs, see policytest.rs).
        if path.extension().is_some_and(|x| x == "lua") && !path.to_string_lossy().ends_with("_test.lua") {
            let (code, _, err) = check(root, &["--policy", path.to_str().unwrap(), "--strict"]);
            assert_eq!((code, err.as_str()), (0, ""), "{}", path.display());
        }
    }
}

#[test]
fn a_binding_nothing_declares_is_named_in_the_handlers_error() {
    let moat = Moat::start(
        r#"
allowedHosts = { "a.test" }
outboundByHost = { ["a.test"] = function(request, env) return Response.new("token " .. env.GITHUB_TOKEN) end }
"#,
    );
    let out = curl(&moat, "http://a.test/", &[]);
    assert_eq!(out.status, 500);
    let log = moat.wait_log("env has no binding");
    assert!(
        log.contains(
            "env has no binding GITHUB_TOKEN (declare it in moat.toml: [secrets] GITHUB_TOKEN = { env = \"...\" }, [vars], [kv] or [blob]; or set MOAT_SECRET_GITHUB_TOKEN)"
        ),
        "{log}"
    );
}

#[test]
fn explain_and_serve_agree_on_a_handler_host_that_resolves_to_loopback() {
    let policy = r#"
interceptHttps = true
outboundByHost = { ["h.test"] = function() return Response.new("answered here") end }
"#;
    let moat = Moat::policy(policy).resolve("h.test", "127.0.0.1").start();
    let (code, out, err) = moat_cmd(&["explain", "--policy", "policy.lua", "CONNECT", "h.test:443"], moat.dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("step 4: class outboundByHost[\"h.test\"]"), "{out}");
    // Nothing is dialled for a host a handler answers: no address check refuses its tunnel.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(moat.addr).unwrap();
    s.write_all(b"CONNECT h.test:443 HTTP/1.1\r\nHost: h.test:443\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "{}", moat.logs());
    let out = curl(&moat, "https://h.test/", &["-k"]);
    assert_eq!((out.status, out.body.as_str()), (200, "answered here"));
}

#[test]
fn check_warns_of_a_tunnelled_handler_and_finds_overrides_naming_a_handler_that_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "policy.lua",
        "outboundByHost = {\n  [\"api.test:443\"] = function() return Response.new(\"x\") end,\n}\noutboundHandlers = {\n  readOnly = function() return Response.new(\"ro\") end,\n}\n",
    );
    let (code, _, err) = check(d, &["--policy", "policy.lua"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err,
        "policy.lua:2: warning: outboundByHost[\"api.test:443\"] never runs: that port is HTTPS and interceptHttps is false, so moat only tunnels it (set interceptHttps = true)\n\
         1 warning(s); --strict makes them errors\n"
    );
    // An override set while readOnly existed (kept in the database)...
    write(d, "moat.toml", "data_dir = \"data\"\n[[class]]\npolicy = \"policy.lua\"\nlisten = \"127.0.0.1:0\"\n");
    let mut serve = std::process::Command::new(MOAT);
    serve.args(["serve", "--config", "moat.toml"]).current_dir(d);
    let moat = Moat::spawn(serve, tempfile::tempdir().unwrap());
    let (code, out, err) = moat_cmd(&["policy", "agent-1", "setOutboundHandler", "readOnly"], d);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = check(d, &[]);
    assert_eq!(code, 0, "{err}");
    // ...then an edit removes readOnly: that container's requests would fail. Found through
    // the running moat's admin API, and in the database once it has stopped.
    write(
        d,
        "policy.lua",
        "interceptHttps = true\noutboundByHost = { [\"api.test:443\"] = function() return Response.new(\"x\") end }\n",
    );
    let finding = "container agent-1: its override setOutboundHandler names \"readOnly\", which outboundHandlers does not define (define it, or moat policy agent-1 clearOverrides)";
    let (code, _, err) = check(d, &[]);
    assert_eq!((code, err.lines().next().unwrap_or_default()), (2, finding), "running: {err}");
    drop(moat);
    let (code, _, err) = check(d, &[]);
    assert_eq!((code, err.lines().next().unwrap_or_default()), (2, finding), "stopped: {err}");
}
