//! `moat check`, `moat explain`, `moat init`, and config errors (SPEC 10).

use crate::harness::*;

const POLICY: &str = r#"
enableInternet = false
allowedHosts = { "api.github.com", "*.npmjs.org", "hello.moat" }
deniedHosts = { "169.254.169.254" }
outboundByHost = {
  ["hello.moat"] = function() return Response.new("hi") end,
}
outboundHandlers = { readOnly = function(r) return fetch(r) end }
"#;

#[test]
fn check_prints_a_summary_and_fails_with_file_line() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "agent.lua", POLICY);
    let (code, out, _) = moat_cmd(&["check", "--policy", "agent.lua"], dir.path());
    assert_eq!(code, 0);
    assert!(out.contains("class agent (agent.lua)"), "{out}");
    assert!(out.contains("allowedHosts = [api.github.com, *.npmjs.org, hello.moat]"), "{out}");
    assert!(out.contains("outboundByHost = [hello.moat]"), "{out}");
    assert!(out.contains("outboundHandlers = [readOnly]"), "{out}");

    let broken = [
        ("syntax.lua", "allowedHosts = {\n  \"a\",\n  oops oops\n}\n", "syntax.lua:3:"),
        ("type.lua", "enableInternet = false\nallowedHosts = \"x\"\n", "type.lua:2: allowedHosts must be a list"),
        (
            "handler.lua",
            "outboundByHost = {\n  [\"a.test\"] = 42,\n}\n",
            "handler.lua:2: outboundByHost[\"a.test\"] must be a function",
        ),
        ("pattern.lua", "deniedHosts = { \"a b\" }\n", "pattern.lua:1: deniedHosts: invalid host pattern"),
        ("runtime.lua", "local x = nil\nlocal y = x.field\n", "runtime.lua:2: attempt to index"),
        (
            "typo.lua",
            "allowedHosts = { \"a.test\" }\ndeniedhosts = { \"b.test\" }\n",
            "typo.lua:2: global deniedhosts is not a policy setting; did you mean deniedHosts?",
        ),
    ];
    for (file, text, want) in broken {
        write(dir.path(), file, text);
        let (code, _, err) = moat_cmd(&["check", "--policy", file], dir.path());
        assert_eq!(code, 2, "{file}");
        assert!(err.starts_with(&format!("moat: {want}")), "{file}: {err}");
        assert_eq!(err.lines().count(), 1, "{file}: one line: {err}");
    }
}

#[test]
fn explain_names_the_deciding_step() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "agent.lua", POLICY);
    let explain = |url: &str| moat_cmd(&["explain", "--policy", "agent.lua", "GET", url], dir.path());
    let (code, out, _) = explain("http://hello.moat/x");
    assert_eq!(code, 0);
    assert!(out.contains("step 4: class outboundByHost[\"hello.moat\"]"), "{out}");
    let (_, out, _) = explain("http://169.254.169.254/latest");
    assert!(out.contains("step 1") && out.contains("moat-denied: denied-host"), "{out}");
    let (_, out, _) = explain("http://evil.test/");
    assert!(out.contains("step 2") && out.contains("not-allowed"), "{out}");
    let (_, out, _) = explain("http://registry.npmjs.org/x");
    assert!(out.contains("step 7") && out.contains("egress"), "{out}");
    let (_, out, _) = explain("http://0x7f.1/");
    assert!(out.contains("canonical host: 127.0.0.1, port 80"), "{out}");
    let (_, out, _) = explain("https://api.github.com/user");
    assert!(out.contains("interceptHttps is false") && out.contains("allowed (spliced"), "{out}");
    let (code, _, err) = explain("not a url");
    assert_eq!(code, 2, "{err}");
}

#[test]
fn init_writes_a_policy_that_checks_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = moat_cmd(&["init", "site"], dir.path());
    assert_eq!(code, 0, "{out}");
    let site = dir.path().join("site");
    let (code, out, err) = moat_cmd(&["check"], &site);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("class policy (policy.lua)"), "{out}");
    let (code, _, err) = moat_cmd(&["init", "site"], dir.path());
    assert_eq!(code, 2, "refuses to overwrite: {err}");
    // The starter serves its virtual host.
    let mut cmd = std::process::Command::new(MOAT);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]).current_dir(&site).env("MOAT_WORKERS", "1");
    let moat = Moat::spawn(cmd, tempfile::tempdir().unwrap());
    let r = curl(&moat, "http://hello.moat/", &["-U", "me:"]);
    assert_eq!(r.body, "hello me\n");
}

#[test]
fn config_errors_name_key_and_file_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.lua", "");
    write(dir.path(), "moat.toml", "data_dir = \".moat\"\n[limits]\nlua_cpuu = \"1s\"\n");
    let (code, _, err) = moat_cmd(&["check", "--policy", "p.lua"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("moat.toml:3") && err.contains("lua_cpuu"), "{err}");
    write(dir.path(), "moat.toml", "[limits]\nidle_timeout = \"forever\"\n");
    let (code, _, err) = moat_cmd(&["check", "--policy", "p.lua"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("limits.idle_timeout"), "{err}");
    // A section moat does not act on yet is refused, not silently ignored.
    write(dir.path(), "moat.toml", "[sandbox]\nsubnet = \"10.0.0.0/24\"\n");
    let (code, _, err) = moat_cmd(&["check", "--policy", "p.lua"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("moat.toml:1") && err.contains("sandbox"), "{err}");
    // A missing policy file is a one-line error too.
    let (code, _, err) = moat_cmd(&["check", "--policy", "nope.lua"], dir.path());
    assert_eq!((code, err.lines().count()), (2, 1), "{err}");
}

#[test]
fn explain_reads_a_containers_overrides_from_the_running_moat_or_the_database() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", POLICY);
    write(dir.path(), "moat.toml", "data_dir = \"data\"\n");
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "--policy", "policy.lua"];
        all.extend_from_slice(args);
        moat_cmd(&all, dir.path())
    };
    let moat = Moat::serve_folder(dir.path());
    let (code, _, err) = moat_cmd(
        &["policy", "--data-dir", "data", "agent-1", "setOutboundByHost", "hello.moat", "readOnly"],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    // The running moat holds the database: explain asks it.
    let (code, out, err) = explain(&["--id", "agent-1", "GET", "http://hello.moat/x"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("step 3: container override") && out.contains("outboundHandlers.readOnly"), "{out}");
    let (_, out, _) = explain(&["GET", "http://hello.moat/x"]);
    assert!(out.contains("no runtime overrides") && out.contains("step 4"), "other containers: {out}");
    drop(moat);
    // Stopped: explain reads the database itself.
    let (code, out, err) = explain(&["--id", "agent-1", "GET", "http://hello.moat/x"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("step 3: container override"), "{out}");
    // CONNECT takes host:port, as a client sends it.
    let (code, out, err) = explain(&["CONNECT", "registry.npmjs.org:443"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("CONNECT registry.npmjs.org:443") && out.contains("tunnel is allowed"), "{out}");
}

#[test]
fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    // Started with a soft limit of 256 (a shell sets it, then becomes moat).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), "enableInternet = false").unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg("ulimit -S -n 256 && exec \"$0\" \"$@\"").arg(MOAT);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--policy"]).arg(dir.path().join("policy.lua"));
    cmd.arg("--data-dir").arg(dir.path().join("data"));
    let moat = Moat::spawn(cmd, dir);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", moat.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_ne!(soft, "256", "{line}");
    if hard != "unlimited" {
        assert_eq!(soft, hard, "{line}");
    }
}

#[test]
fn admin_api_outlives_running_out_of_open_files() {
    // moat gets 64 descriptors; a container holding more connections than that makes every
    // accept fail until some close. The admin socket must still answer afterwards.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), "enableInternet = false").unwrap();
    let socket = dir.path().join("data").join("admin.sock");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg("ulimit -n 64 && exec \"$0\" \"$@\"").arg(MOAT);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--policy"]).arg(dir.path().join("policy.lua"));
    cmd.arg("--data-dir").arg(dir.path().join("data"));
    let moat = Moat::spawn(cmd, dir);
    assert_eq!(admin(&socket, "GET", "/v1/status", None).0, 200);

    let clients: Vec<std::net::TcpStream> =
        (0..100).map(|_| std::net::TcpStream::connect(moat.addr).unwrap()).collect();
    moat.wait_log("Too many open files");
    // An admin call while no descriptor is left waits in the socket's backlog ...
    let waiting = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let out = std::process::Command::new("curl")
                .args(["-sS", "-m", "30", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"])
                .arg(&socket)
                .arg("http://moat/v1/status")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    // ... and is answered once the container lets go.
    drop(clients);
    assert_eq!(waiting.join().unwrap(), "200", "logs:\n{}", moat.logs());
    assert_eq!(admin(&socket, "GET", "/v1/status", None).0, 200, "logs:\n{}", moat.logs());
    let warnings = moat.logs().matches("Too many open files").count();
    assert!(warnings <= 4, "one line per listener and run of failures, not one per retry:\n{}", moat.logs());
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_closes_idle_connections() {
    use std::io::{Read, Write};
    let (port, arrived) = slow_upstream(std::time::Duration::from_millis(1500));
    let mut moat = Moat::start(
        r#"allowedHosts = { "127.0.0.1", "const.test" }
           outboundByHost = { ["const.test"] = function() return Response.new("const") end }"#,
    );
    // A kept-alive connection that has had its answer and now waits.
    let mut idle = std::net::TcpStream::connect(moat.addr).unwrap();
    idle.write_all(b"GET http://const.test/ HTTP/1.1\r\nHost: const.test\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("const"));
    // A request in flight when the signal comes.
    let proxy = moat.proxy_url();
    let url = format!("http://127.0.0.1:{port}/");
    let in_flight = std::thread::spawn(move || curl_via(&proxy, &url, &[]));
    arrived.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    moat.signal("TERM");
    let logs = moat.wait_log("shutting down: waiting up to 30s");
    assert!(logs.contains("shutting down: waiting up to 30s"), "{logs}");
    // Nothing new is accepted, the idle connection is closed, the request in flight is
    // answered in full (and told that the connection closes), then moat exits.
    assert!(std::net::TcpStream::connect(moat.addr).is_err(), "the listener is closed");
    idle.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    assert_eq!(idle.read(&mut buf).unwrap(), 0, "the idle connection is closed");
    let answer = in_flight.join().unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "slow answer"));
    assert_eq!(answer.headers.get("connection").map(String::as_str), Some("close"));
    assert_eq!(moat.wait_exit(std::time::Duration::from_secs(10)), Some(0), "{}", moat.logs());
    assert!(moat.logs().contains("shut down\n"), "{}", moat.logs());
}

#[test]
fn shutdown_timeout_bounds_the_wait_and_a_second_signal_ends_it() {
    let (port, arrived) = slow_upstream(std::time::Duration::from_secs(3600));
    for (second_signal, limit) in [(false, "1s"), (true, "1h")] {
        let mut moat = Moat::policy(r#"allowedHosts = { "127.0.0.1" }"#).limit("shutdown_timeout", limit).start();
        let proxy = moat.proxy_url();
        let url = format!("http://127.0.0.1:{port}/");
        let _never = std::thread::spawn(move || curl_via(&proxy, &url, &["-m", "30"]));
        arrived.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        moat.signal("INT");
        let logs = moat.wait_log("shutting down: waiting up to");
        assert!(logs.contains("shutting down: waiting up to"), "{logs}");
        if second_signal {
            moat.signal("INT");
        }
        assert_eq!(moat.wait_exit(std::time::Duration::from_secs(15)), Some(0), "{}", moat.logs());
        assert!(moat.logs().contains("shut down with 1 connection(s) still open"), "{}", moat.logs());
    }
}
