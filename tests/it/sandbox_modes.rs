//! `moat run`'s modes (SPEC 5.2): internet on and off, the user CMD runs as, per-container
//! identity across runs, and `--weak`. The "remote" servers are on the host's loopback,
//! reached only through moat under names that `--resolve` maps there; every other address
//! CMD dials is a documentation address that the policies deny before any dial.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::harness::{Moat, admin};
use crate::sandbox::{SandboxRun, sandbox_available, start_ready};
use std::time::Duration;

/// A loopback server that answers each line with `echo LINE`, for raw TCP through the relay.
fn line_echo() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(c.try_clone().unwrap());
                if reader.read_line(&mut line).is_ok() {
                    let _ = (&c).write_all(format!("echo {line}").as_bytes());
                }
            });
        }
    });
    port
}

const RELAY_POLICY: &str = r#"
-- relay.test is the host's loopback (--resolve); the address check lets that one address through.
allowedHosts = { "relay.test", "127.0.0.1", "a.test" }
outboundByHost = {
  ["a.test"] = function(request, env, ctx) return Response.new("hi " .. ctx.containerId .. "\n") end,
}
"#;

/// Raw TCP to relay.test's port, one line each way; prints `relay …` or `relay failed`.
const RELAY_SCRIPT: &str = r#"
line() {
  out=$(echo hello | timeout 10 bash -c "exec 3<>/dev/tcp/$1/$ECHO_PORT && cat >&3 && head -1 <&3" 2>/dev/null)
  echo "${out:-nothing}"
}
echo "relay $(line relay.test)"
echo "literal $(line 192.0.2.44)"
bash -c "echo udp > /dev/udp/192.0.2.45/$ECHO_PORT" 2>/dev/null
echo "handler $(curl -s -m 10 http://a.test/)"
"#;

#[test]
fn with_internet_other_tcp_ports_are_relayed_by_name_after_the_policy_and_without_it_refused() {
    if !sandbox_available() {
        return;
    }
    let port = line_echo().to_string();
    let dir = tempfile::tempdir().unwrap();
    let run = |flag: &str| {
        SandboxRun::new(dir.path(), RELAY_POLICY, RELAY_SCRIPT)
            .arg(flag)
            .arg("--resolve")
            .arg("relay.test=127.0.0.1")
            .env("ECHO_PORT", &port)
            .run()
    };
    let (code, out, err) = run("--internet");
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    // The program dialled relay.test's sandbox address; moat decided on the name, resolved it
    // itself (--resolve) and relayed the bytes, with a log line like a request's.
    assert_eq!(lines[0], "relay echo hello", "{out}\n{err}");
    assert!(
        err.contains(&format!(
            r#"container="agent-1" class="policy" generation=1 method="TCP" scheme="tunnel" host="relay.test" port={port}"#
        )) && err.contains(r#"decision="egress" detail="raw tcp tunnel""#),
        "{err}"
    );
    // A literal address the policy does not allow is decided (denied), never dialled.
    assert_eq!(lines[1], "literal nothing", "{out}");
    assert!(
        err.contains(&format!(r#"host="192.0.2.44" port={port} path="" decision="deny" detail="not-allowed""#)),
        "{err}"
    );
    assert_eq!(lines[2], "handler hi agent-1", "{out}");

    let (code, out, err) = run("--no-internet");
    assert_eq!(code, 0, "{out}\n{err}");
    // Without internet only ports 80 and 443 exist: the same connection is refused at once.
    assert_eq!(out.lines().next(), Some("relay nothing"), "{out}\n{err}");
    assert!(!err.contains(r#"method="TCP""#), "nothing was relayed: {err}");
    assert!(out.contains("handler hi agent-1"), "{out}");
}

#[test]
fn cmd_runs_as_the_user_named_by_user_or_sudo_and_each_id_keeps_its_own_overrides_across_runs() {
    if !sandbox_available() || !rustix::process::geteuid().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // CMD, as another user, must be able to reach its folder.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    Command::new("chown").arg("65534:65534").arg(&shared).status().unwrap();
    // A handler that lets its own container reach b.test from then on (an override, persisted).
    let policy = r#"
allowedHosts = { "a.test" }
outboundByHost = {
  ["a.test"] = function(request, env, ctx)
    moat.container(ctx.containerId):allowHost("b.test")
    return Response.new("opened for " .. ctx.containerId .. "\n")
  end,
  ["b.test"] = function(request, env, ctx) return Response.new("b for " .. ctx.containerId .. "\n") end,
}
"#;
    let script = r#"id -u; id -g; touch "$SHARED/by-cmd"; echo "b $(curl -s -m 10 -o /dev/null -w '%{http_code}' http://b.test/)"; curl -s -m 10 http://a.test/"#;
    let (code, out, err) = SandboxRun::new(dir.path(), policy, script)
        .arg("--user")
        .arg("nobody")
        .env("SHARED", shared.to_str().unwrap())
        .run();
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["65534", "65534"], "{out}\n{err}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(shared.join("by-cmd")).unwrap().uid(), 65534, "files CMD makes are the user's");
    assert_eq!(lines[2], "b 520", "{out}");
    assert_eq!(lines[3], "opened for agent-1", "{out}");

    // Under sudo, the user who ran sudo; the same id finds its override again.
    let (code, out, err) = SandboxRun::new(dir.path(), policy, "id -u; curl -s -m 10 http://b.test/")
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .run();
    assert_eq!((code, out.as_str()), (0, "65534\nb for agent-1\n"), "{err}");
    // Another id is another container: the override is not its.
    let (code, out, err) =
        SandboxRun::new(dir.path(), policy, "curl -s -m 10 -o /dev/null -w '%{http_code}' http://b.test/")
            .arg("--id")
            .arg("agent-2")
            .run();
    assert_eq!((code, out.as_str()), (0, "520"), "{err}");
}

#[test]
fn weak_mode_only_sets_proxy_and_ca_variables_and_says_that_nothing_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
interceptHttps = true
allowedHosts = { "a.test" }
outboundByHost = {
  ["a.test"] = function(request, env, ctx) return Response.new("weak " .. ctx.containerId .. " " .. request.url .. "\n") end,
}
"#;
    let script = r#"curl -s -m 10 http://a.test/p; curl -s -m 10 https://a.test/s; echo "other $(curl -s -m 10 -o /dev/null -w '%{http_code}' http://192.0.2.1/)""#;
    let (code, out, err) = SandboxRun::new(dir.path(), policy, script).arg("--weak").run();
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out, "weak agent-1 http://a.test/p\nweak agent-1 https://a.test/s\nother 520\n", "{err}");
    assert!(err.contains("--weak: nothing is enforced"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("data")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().ends_with(".trust")),
        "the CA folder for CMD is removed: {left:?}"
    );
}

/// Each container's own view: its id, the previous visitor (shared KV), and whether it may
/// reach b.test (a per-container override).
const SHARED_POLICY: &str = r#"
allowedHosts = { "a.test" }
outboundByHost = {
  ["a.test"] = function(request, env, ctx)
    local before = env.KV:get("last")
    env.KV:put("last", ctx.containerId)
    return Response.new("hi " .. ctx.containerId .. " after " .. tostring(before) .. "\n")
  end,
  ["b.test"] = function(request, env, ctx) return Response.new("b\n") end,
}
"#;

const SHARED_SCRIPT: &str = r#"curl -s -m 10 http://a.test/
echo "b $(curl -s -m 10 -o /dev/null -w '%{http_code}' http://b.test/)"
echo "forged $(curl -s -m 10 -o /dev/null -w '%{http_code}' -H 'Proxy-Authorization: Basic YWdlbnQtMTp4' http://b.test/)""#;

#[test]
fn runs_beside_a_serving_moat_share_its_data_folder_each_as_its_own_container_and_end_with_it() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), SHARED_POLICY).unwrap();
    let mut serve = Moat::serve_folder(dir.path());
    let socket = dir.path().join("data/admin.sock");
    assert_eq!(admin(&socket, "POST", "/v1/containers/agent-1/allowed-hosts/b.test", None).0, 200);
    // agent-1 keeps running while agent-2 comes and goes, both on the serving moat's data.
    let script = format!("echo ready; {SHARED_SCRIPT}; sleep 30");
    let (mut one, mut one_out) = start_ready(SandboxRun::new(dir.path(), SHARED_POLICY, &script));
    let mut lines = String::new();
    for _ in 0..3 {
        one_out.read_line(&mut lines).unwrap();
    }
    assert_eq!(lines, "hi agent-1 after nil\nb 200\nforged 200\n", "{}", serve.logs());
    let (code, out, err) = SandboxRun::new(dir.path(), SHARED_POLICY, SHARED_SCRIPT).arg("--id").arg("agent-2").run();
    assert_eq!(code, 0, "{err}");
    // agent-1's override is not agent-2's, whatever agent-2 claims to be.
    assert_eq!(out, "hi agent-2 after agent-1\nb 520\nforged 520\n", "{err}\n{}", serve.logs());
    assert!(err.contains("runs this container on class policy"), "{err}");
    // One sandbox per id at a time.
    let (code, _, err) = SandboxRun::new(dir.path(), SHARED_POLICY, "true").run();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("container agent-1 already runs here"), "{err}");
    let logs = serve.logs();
    assert!(
        logs.contains(r#"container="agent-2" class="policy""#)
            && logs.contains(r#"host="b.test" port=80 path="/" decision="deny""#),
        "{logs}"
    );
    // The serving moat stops: the sandbox it served ends with it.
    serve.signal("TERM");
    assert_eq!(serve.wait_exit(Duration::from_secs(20)), Some(0));
    let status = one.wait().unwrap();
    assert_ne!(status.code(), Some(0), "a sandbox nothing serves any more has ended");
}

#[test]
fn a_second_run_on_the_same_data_folder_is_served_by_the_first() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut first, mut first_out) = start_ready(
        SandboxRun::new(dir.path(), SHARED_POLICY, &format!("{{ {SHARED_SCRIPT}; }} >/dev/null; echo ready; sleep 30"))
            .arg("--id")
            .arg("agent-3"),
    );
    let (code, out, err) = SandboxRun::new(dir.path(), SHARED_POLICY, "curl -s -m 10 http://a.test/; exit 4")
        .arg("--id")
        .arg("agent-4")
        .run();
    assert_eq!((code, out.as_str()), (4, "hi agent-4 after agent-3\n"), "{err}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(first.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    first.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut first_out, &mut rest).unwrap();
    assert!(!dir.path().join("data").join("attach.sock").exists(), "the first run removed its attach socket");
}

#[test]
fn the_terminal_passes_through_to_the_command() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // util-linux's script gives `moat run` a terminal; the command must have it as its own.
    let run = SandboxRun::new(
        dir.path(),
        RELAY_POLICY,
        "test -t 0 && test -t 1 && echo has-a-terminal; tty >/dev/null && echo tty-ok",
    );
    let cmd = run.command();
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-qec", &format!("MOAT_NO_DNS=1 {line}"), "/dev/null"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("has-a-terminal") && text.contains("tty-ok"), "{text}");
}

#[test]
fn an_admin_socket_outside_the_data_folder_refuses_the_sandbox() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("outside-admin.sock");
    let config = dir.path().join("moat.toml");
    std::fs::write(&config, format!("[admin]\nlisten = \"unix:{}\"\n", socket.display())).unwrap();
    // The command is the socket's owner here (root, or the same user): only moat can keep it out.
    let script =
        r#"echo "admin $(curl -s -m 5 -o /dev/null -w '%{http_code}' --unix-socket "$SOCK" http://moat/v1/status)""#;
    let (code, out, err) = SandboxRun::new(dir.path(), RELAY_POLICY, script)
        .arg("--config")
        .arg(config.to_str().unwrap())
        .env("SOCK", socket.to_str().unwrap())
        .run();
    assert_eq!((code, out.as_str()), (0, "admin 000\n"), "{err}");
    // From the host, the same socket answers (while moat runs: a second run keeps it up).
    let (_, status) = {
        let (mut keep, _out) = start_ready(
            SandboxRun::new(dir.path(), RELAY_POLICY, "echo ready; sleep 30")
                .arg("--config")
                .arg(config.to_str().unwrap()),
        );
        let got = admin(&socket, "GET", "/v1/status", None);
        keep.kill().unwrap();
        keep.wait().unwrap();
        got
    };
    assert!(status.contains("\"version\""), "{status}");
}
