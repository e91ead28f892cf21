//! Containers under the daemon (SPEC 5.3, 7.3): `moat start|ps|kill|stop|wait|logs` and the
//! admin API's lifecycle endpoints, in real namespaces made by a running `moat serve`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::sandbox::sandbox_available;

const POLICY: &str = r#"
allowedHosts = { "a.test" }
outboundByHost = {
  ["a.test"] = function(request, env, ctx)
    return Response.new("hi " .. ctx.containerId .. " auth=" .. tostring(request.headers:get("proxy-authorization")) .. "\n")
  end,
}
"#;

/// `moat ARGS --data-dir DIR/data`: (exit code, stdout, stderr).
pub fn moat(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let data = dir.join("data");
    let mut all: Vec<&str> = args.to_vec();
    // Flags go before `--` (the command's own arguments come after it).
    let at = all.iter().position(|a| *a == "--").unwrap_or(all.len());
    all.splice(at..at, ["--data-dir", data.to_str().unwrap()]);
    moat_cmd(&all, dir)
}

/// A `moat serve` of `policy` in a fresh folder, for tests that need root and namespaces;
/// `None` (the test has nothing to check) where either is missing.
pub fn root_daemon(policy: &str) -> Option<(tempfile::TempDir, Moat)> {
    if !sandbox_available() || !rustix::process::geteuid().is_root() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), policy).unwrap();
    let serve = Moat::serve_folder(dir.path());
    Some((dir, serve))
}

/// Waits until `moat logs ID` contains `needle`; returns the log.
fn log_with(dir: &Path, id: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = moat(dir, &["logs", id]);
        if out.contains(needle) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemon_starts_its_containers_signals_destroys_and_remembers_them_across_a_restart() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), POLICY).unwrap();
    let mut serve = Moat::serve_folder(dir.path());
    let d = dir.path();
    // env and entrypoint honoured; its traffic is its own container's, whatever it claims.
    let script = r#"echo "hello $FOO home=${SECRET:-unset}"; curl -s -m 10 -H 'Proxy-Authorization: Basic b3RoZXI6eA==' http://a.test/; echo ready; sleep 4401"#;
    let (code, out, err) = moat(d, &["start", "--id", "c1", "--env", "FOO=bar", "--", "sh", "-c", script]);
    assert_eq!((code, out.as_str()), (0, "c1\n"), "{err}");
    let log = log_with(d, "c1", "ready");
    assert!(log.contains("hello bar home=unset\nhi c1 auth=nil\nready"), "{log}\n{}", serve.logs());
    let (_, ps, _) = moat(d, &["ps"]);
    assert!(ps.lines().any(|l| l.starts_with("c1 ") && l.contains(" running ")), "{ps}");
    let (_, one) = admin(&d.join("data/admin.sock"), "GET", "/v1/containers/c1", None);
    assert!(one.contains(r#""running":true"#), "{one}");

    // Bad input changes nothing, in one line.
    let (code, _, err) = moat(d, &["start", "--id", "c1", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("container c1 is already running"), "{err}");
    let (code, _, err) = moat(d, &["start", "--id", "c9", "--class", "nope", "--", "true"]);
    assert!(code == 2 && err.contains("no class \"nope\""), "{err}");
    let (code, _, err) = moat(d, &["start", "--id", "c9", "--", "/nonexistent/tool"]);
    assert!(code == 1 && err.contains("cannot run /nonexistent/tool: No such file or directory"), "{err}");
    let (code, _, err) = moat(d, &["kill", "-s", "99", "c1"]);
    assert!(code == 2 && err.contains("signal 99: not a signal number"), "{err}");
    let (_, ps, _) = moat(d, &["ps"]);
    assert!(!ps.contains("c9 ") || ps.lines().any(|l| l.starts_with("c9 ") && !l.contains("running")), "{ps}");

    // A signal reaches the command; wait gives its exit code.
    let (code, _, err) = moat(d, &["kill", "-s", "TERM", "c1"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = moat(d, &["wait", "c1"]);
    assert_eq!((code, out.as_str()), (143, "143\n"), "{err}");
    assert_eq!(processes_matching("sleep 4401"), 0);

    // destroy with a message: wait reports the message.
    let (code, _, err) = moat(d, &["start", "--id", "c2", "--", "sleep", "4402"]);
    assert_eq!(code, 0, "{err}");
    let (status, _) =
        admin(&d.join("data/admin.sock"), "DELETE", "/v1/containers/c2", Some(r#"{"error":"no longer needed"}"#));
    assert_eq!(status, 200);
    let (code, _, err) = moat(d, &["wait", "c2"]);
    assert!(code == 1 && err.contains("no longer needed"), "{err}");

    // A daemon that stops stops its containers; the next one has every record.
    let (code, _, err) = moat(d, &["start", "--id", "c3", "--", "sh", "-c", "trap 'exit 7' TERM; sleep 4403 & wait"]);
    assert_eq!(code, 0, "{err}");
    serve.signal("TERM");
    assert_eq!(serve.wait_exit(Duration::from_secs(20)), Some(0), "{}", serve.logs());
    assert_eq!(processes_matching("sleep 4403"), 0, "the daemon's stop ended its container");
    let _serve = Moat::serve_folder(dir.path());
    let (_, ps, _) = moat(d, &["ps"]);
    let row = |id: &str| ps.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_default().to_string();
    assert!(row("c1").contains(" exited ") && row("c1").contains(" 143 "), "{ps}");
    assert!(row("c2").contains(" destroyed "), "{ps}");
    assert!(row("c3").contains(" exited ") && row("c3").contains(" 7 "), "{ps}");
    let (code, _, err) = moat(d, &["wait", "c2"]);
    assert!(code == 1 && err.contains("no longer needed"), "the destroy message is kept: {err}");
}

/// Descriptors, mounts and processes of the host that a container could leave behind.
fn host_counts(pid: u32, dir: &Path) -> (usize, usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap().lines().count();
    // Only this test's sandboxes: other tests run theirs meanwhile.
    (fds, mounts, processes_matching(&format!("__sandbox-init {}", dir.display())))
}

#[test]
fn fifty_containers_started_and_stopped_leave_nothing_behind() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), POLICY).unwrap();
    let serve = Moat::serve_folder(dir.path());
    let d = dir.path();
    let one = |i: usize| {
        let id = format!("loop-{i}");
        let (code, _, err) =
            moat(d, &["start", "--id", &id, "--", "sh", "-c", "curl -s -m 5 http://a.test/ >/dev/null; sleep 30"]);
        assert_eq!(code, 0, "{err}");
        let (code, out, err) = moat(d, &["stop", &id]);
        assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");
    };
    // One first: what a first container allocates for good (caches, the database's pages).
    one(0);
    std::thread::sleep(Duration::from_millis(300));
    let before = host_counts(serve.pid(), d);
    let rss_before = memory_kib(serve.pid(), "VmRSS");
    for i in 1..=50 {
        one(i);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_counts(serve.pid(), d) != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(host_counts(serve.pid(), d), before, "(descriptors, mounts, init steps) before and after");
    let rss_after = memory_kib(serve.pid(), "VmRSS");
    assert!(rss_after * 10 <= rss_before * 11, "RSS {rss_before} kB before, {rss_after} kB after 50 containers");
}

/// A tiny HTTP server on 127.0.0.1:8080 (Python's sockets only): answers each request with
/// its request line and body.
const SERVER: &str = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080)); s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        data += c.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    n = next((int(l.split(":")[1]) for l in lines if l.lower().startswith("content-length:")), 0)
    while len(body) < n:
        body += c.recv(4096)
    out = ("echo " + lines[0].rsplit(" ", 1)[0] + " " + body.decode() + "\n").encode()
    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(out) + out)
    c.close()
"#;

#[test]
fn a_port_inside_a_container_is_reached_through_the_admin_api_and_moat_port() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), POLICY).unwrap();
    let _serve = Moat::serve_folder(dir.path());
    let d = dir.path();
    let (code, _, err) = moat(d, &["start", "--id", "web", "--", "python3", "-c", SERVER]);
    assert_eq!(code, 0, "{err}");
    log_with(d, "web", "listening");
    let (code, out, err) = moat(d, &["port", "web", "8080", "GET", "/hi?x=1"]);
    assert_eq!((code, out.as_str()), (0, "echo GET /hi?x=1 \n"), "{err}");
    let (status, body) =
        admin(&d.join("data/admin.sock"), "POST", "/v1/containers/web/ports/8080/submit", Some("a body"));
    assert_eq!((status, body.as_str()), (200, "echo POST /submit a body\n"));
    // The raw TCP variant: an upgrade on the admin socket, then bytes both ways.
    let mut raw = std::os::unix::net::UnixStream::connect(d.join("data/admin.sock")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let upgrade =
        "GET /v1/containers/web/ports/8080 HTTP/1.1\r\nHost: moat\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n";
    std::io::Write::write_all(&mut raw, upgrade.as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"\r\n\r\n") && std::io::Read::read(&mut raw, &mut byte).unwrap() == 1 {
        seen.push(byte[0]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&seen));
    std::io::Write::write_all(&mut raw, b"GET /raw HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut raw, &mut answer);
    assert!(answer.ends_with("echo GET /raw \n"), "{answer}");
    // Nobody on that port: a clear 502, not a hang.
    let (code, _, err) = moat(d, &["port", "web", "8081"]);
    assert!(code == 1 && err.contains("port 8081 of the container: Connection refused"), "{err}");
    let (status, body) = admin(&d.join("data/admin.sock"), "GET", "/v1/containers/web/ports/8081/", None);
    assert!(status == 502 && body.contains("connect_failed"), "{body}");
    let (code, out, err) = moat(d, &["stop", "web"]);
    assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");
    let (code, _, err) = moat(d, &["port", "web", "8080"]);
    assert!(code == 2 && err.contains("container web is not running"), "{err}");
}

/// A policy that routes a virtual host into a container (`getTcpPort`), and manages one.
const ROUTING_POLICY: &str = r#"
allowedHosts = { "tools.local", "ctl.test" }
outboundByHost = {
  ["tools.local"] = function(request, env, ctx)
    local url = URL.new(request.url)
    return moat.container("tool"):getTcpPort(8080):fetch("http://container" .. url.pathname .. url.search,
      { method = request.method, body = request.method == "POST" and request:text() or nil })
  end,
  ["ctl.test"] = function(request, env, ctx)
    local c = moat.container("lua-made")
    local path = URL.new(request.url).pathname
    if path == "/start" then
      c:start{ entrypoint = { "sh", "-c", "echo started by $WHO; sleep 4410" }, env = { WHO = "lua" } }
      return Response.new("running=" .. tostring(c.running) .. "\n")
    end
    c:destroy("stopped by the policy")
    local ok, err = pcall(function() return c:monitor() end)
    return Response.new("monitor " .. tostring(ok) .. " " .. tostring(err) .. " running=" .. tostring(c.running) .. "\n")
  end,
}
"#;

#[test]
fn a_handler_routes_requests_into_a_container_and_manages_containers_from_lua() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), ROUTING_POLICY).unwrap();
    let serve = Moat::serve_folder(dir.path());
    let d = dir.path();
    let (code, _, err) = moat(d, &["start", "--id", "tool", "--", "python3", "-c", SERVER]);
    assert_eq!(code, 0, "{err}");
    log_with(d, "tool", "listening");
    let r = curl(&serve, "http://tools.local/hello?q=1", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "echo GET /hello?q=1 \n"), "{}", serve.logs());
    let r = curl(&serve, "http://tools.local/in", &["--data", "piped in"]);
    assert_eq!((r.status, r.body.as_str()), (200, "echo POST /in piped in\n"), "{}", serve.logs());

    let r = curl(&serve, "http://ctl.test/start", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "running=true\n"), "{}", serve.logs());
    assert!(log_with(d, "lua-made", "started by lua").contains("started by lua"));
    let r = curl(&serve, "http://ctl.test/stop", &[]);
    assert_eq!(r.status, 200, "{}", serve.logs());
    // monitor() raised the destroy message; the container no longer runs.
    assert!(r.body.starts_with("monitor false ") && r.body.contains("stopped by the policy"), "{}", r.body);
    assert!(r.body.ends_with(" running=false\n"), "{}", r.body);
    assert_eq!(processes_matching("sleep 4410"), 0);
    let (code, out, err) = moat(d, &["stop", "tool"]);
    assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");
}

const INTERCEPT_POLICY: &str = r#"
allowedHosts = { "*.test" }
outboundByHost = {
  ["a.test"] = function() return Response.new("class a\n") end,
  ["ctl.test"] = function(request, env, ctx)
    moat.container(ctx.containerId):interceptAllOutboundHttp("mock", { tag = "lua" })
    return Response.new("intercepting all\n")
  end,
}
outboundHandlers = {
  mock = function(request, env, ctx)
    return Response.new("mock " .. ctx.containerId .. " " .. request.url .. " " .. tostring(ctx.params and ctx.params.tag) .. "\n")
  end,
}
"#;

/// One keep-alive connection to a.test: a request, then (once $SYNC/go exists) another.
const KEEPALIVE_CLIENT: &str = r#"
import os, socket, time
def get(s, host, path):
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, host)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    n = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(body) < n:
        body += s.recv(4096)
    return body.decode().strip()
s = socket.create_connection(("a.test", 80))
print("first", get(s, "a.test", "/1"), flush=True)
print("phase1", flush=True)
while not os.path.exists(os.environ["SYNC"] + "/go"):
    time.sleep(0.05)
print("again", get(s, "a.test", "/2"), flush=True)
"#;

#[test]
fn each_intercept_routes_the_containers_requests_to_its_handler_before_and_after_start() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), INTERCEPT_POLICY).unwrap();
    let serve = Moat::serve_folder(dir.path());
    let d = dir.path();
    let socket = d.join("data/admin.sock");
    let set = |body: &str| admin(&socket, "POST", "/v1/containers/ic/intercepts", Some(body));
    // Before it starts: plain HTTP to b.test, and HTTPS to c.test (the class does not intercept).
    assert_eq!(set(r#"{"kind":"http","target":"b.test","handler":"mock","props":{"tag":"before"}}"#).0, 200);
    assert_eq!(set(r#"{"kind":"https","target":"c.test","handler":"mock","props":{"tag":"tls"}}"#).0, 200);
    let (status, body) = set(r#"{"kind":"http","target":"d.test","handler":"nope"}"#);
    assert!(status == 400 && body.contains("Outbound handler method 'nope' not found"), "{body}");
    let sync = d.join("sync");
    std::fs::create_dir(&sync).unwrap();
    let script = r#"
curl -s -m 10 http://b.test/x
curl -s -m 10 https://c.test/y
echo "d before: $(curl -s -m 10 -o /dev/null -w '%{http_code}' http://d.test/)"
python3 -c "$CLIENT"
curl -s -m 10 http://ctl.test/
curl -s -m 10 http://d.test/z
"#;
    let (code, _, err) = moat(
        d,
        &[
            "start",
            "--id",
            "ic",
            "--env",
            &format!("SYNC={}", sync.display()),
            "--env",
            &format!("CLIENT={KEEPALIVE_CLIENT}"),
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    assert_eq!(code, 0, "{err}");
    log_with(d, "ic", "phase1");
    // After start, while its connection to a.test stays open: that connection's next request
    // goes to the handler.
    assert_eq!(set(r#"{"kind":"http","target":"a.test","handler":"mock","props":{"tag":"after"}}"#).0, 200);
    std::fs::write(sync.join("go"), "").unwrap();
    let (code, out, err) = moat(d, &["wait", "ic"]);
    assert_eq!((code, out.as_str()), (0, "0\n"), "{err}");
    let log = log_with(d, "ic", "mock ic http://d.test/z lua");
    let expected = "mock ic http://b.test/x before\nmock ic https://c.test/y tls\nd before: 502\nfirst class a\nphase1\n\
                    again mock ic http://a.test/2 after\nintercepting all\nmock ic http://d.test/z lua\n";
    assert_eq!(log, expected, "{}", serve.logs());
    // Its intercepts ended with it.
    let (_, now) = admin(&socket, "GET", "/v1/containers/ic/intercepts", None);
    assert!(now.contains(r#""http":[]"#) && now.contains(r#""all":null"#), "{now}");
}

#[test]
fn exec_runs_another_process_in_the_same_container_with_its_identity() {
    let Some((dir, _serve)) = root_daemon(POLICY) else { return };
    let d = dir.path();
    let (code, _, err) =
        moat(d, &["start", "--id", "ex", "--user", "nobody", "--env", "FOO=bar", "--", "sleep", "4430"]);
    assert_eq!(code, 0, "{err}");
    let script = "id -u; echo FOO=$FOO; curl -s -m 10 http://a.test/; grep CapEff /proc/self/status; \
                  ls \"$DATA\" | tr '\\n' ' '; echo; (sleep 4431 >/dev/null 2>&1 &); exit 4";
    let data = d.join("data");
    let (code, out, err) =
        moat(d, &["exec", "ex", "--", "env", &format!("DATA={}", data.display()), "sh", "-c", script]);
    assert_eq!(code, 4, "{out}\n{err}");
    assert_eq!(
        out, "65534\nFOO=bar\nhi ex auth=nil\nCapEff:\t0000000000000000\nca-bundle.pem ca.pem resolv.conf \n",
        "{err}"
    );
    let (code, out, err) = moat(d, &["stop", "ex"]);
    assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");
    // What exec started was in the container: it ended with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_matching("sleep 4431") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_matching("sleep 4431"), 0);
    let (code, _, err) = moat(d, &["exec", "ex", "--", "true"]);
    assert!(code == 2 && err.contains("container ex is not running"), "{err}");
}

#[test]
fn a_handler_pipes_a_request_body_through_a_raw_connection_into_a_container() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"
allowedHosts = { "pipe.local" }
outboundByHost = {
  ["pipe.local"] = function(request)
    return Response.new(moat.container("tcp"):getTcpPort(9000):connect(request.body))
  end,
}
"#;
    std::fs::write(dir.path().join("policy.lua"), policy).unwrap();
    let serve = Moat::serve_folder(dir.path());
    let d = dir.path();
    // Not HTTP: reads everything until the other side closes, answers it upper-cased.
    let server = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000)); s.listen(4)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    c.sendall(data.upper())
    c.close()
"#;
    let (code, _, err) = moat(d, &["start", "--id", "tcp", "--", "python3", "-c", server]);
    assert_eq!(code, 0, "{err}");
    log_with(d, "tcp", "listening");
    let r = curl(&serve, "http://pipe.local/", &["--data-binary", "hello through a pipe"]);
    assert_eq!((r.status, r.body.as_str()), (200, "HELLO THROUGH A PIPE"), "{}", serve.logs());
    let (code, out, err) = moat(d, &["stop", "tcp"]);
    assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");
}
