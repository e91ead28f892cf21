//! `moat run` (SPEC 5.2) in real namespaces: what CMD can reach, who it is, what it sees.
//! Every address CMD dials here is a documentation address (192.0.2.0/24) or a name a handler
//! answers: the policies deny everything else before any dial, so nothing leaves the machine.
//! Without user namespaces the tests are skipped, unless MOAT_REQUIRE_SANDBOX=1 (CI sets it).

use std::path::Path;
use std::process::Command;

use crate::harness::*;

fn policy(upstream: &Upstream) -> String {
    format!(
        r#"
interceptHttps = true
allowedHosts = {{ "a.test", "up.test" }}
outboundByHost = {{
  ["a.test"] = function(request, env, ctx)
    local auth = request.headers:get("proxy-authorization")
    return Response.new("hi " .. ctx.containerId .. " " .. request.url .. " auth=" .. tostring(auth) .. "\n")
  end,
  -- The host's loopback is reached only by moat, on the handler's behalf.
  ["up.test"] = function(request)
    local r = fetch("{}")
    return Response.new("upstream " .. r.status .. "\n")
  end,
}}
"#,
        upstream.url("/echo")
    )
}

/// Whether this machine can make the sandbox's namespaces; panics when it must.
pub fn sandbox_available() -> bool {
    let ok = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var("MOAT_REQUIRE_SANDBOX").is_ok_and(|v| v == "1") {
        panic!("MOAT_REQUIRE_SANDBOX=1 but this machine cannot make user and network namespaces");
    }
    if !ok {
        eprintln!("skipped: no user namespaces here");
    }
    ok
}

/// `moat run --policy P --data-dir D --id agent-1 [ARGS] -- sh -c SCRIPT` in `dir`.
pub struct SandboxRun<'a> {
    dir: &'a Path,
    policy: String,
    script: String,
    prefix: Vec<String>,
    moat: std::path::PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl<'a> SandboxRun<'a> {
    pub fn new(dir: &'a Path, policy: &str, script: &str) -> Self {
        Self {
            dir,
            policy: policy.to_string(),
            script: script.to_string(),
            prefix: Vec::new(),
            moat: MOAT.into(),
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Runs moat through another program (setpriv), with this binary as `moat`.
    pub fn through(mut self, prefix: &[&str], moat: &Path) -> Self {
        self.prefix = prefix.iter().map(|s| s.to_string()).collect();
        self.moat = moat.to_path_buf();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// A flag of `moat run` (before `--`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn command(&self) -> Command {
        std::fs::write(self.dir.join("policy.lua"), &self.policy).unwrap();
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.moat);
                c
            }
            None => Command::new(&self.moat),
        };
        cmd.args(["run", "--policy"]).arg(self.dir.join("policy.lua")).arg("--data-dir").arg(self.dir.join("data"));
        if !self.args.iter().any(|a| a == "--id") {
            cmd.args(["--id", "agent-1"]);
        }
        cmd.args(&self.args)
            .args(["--", "sh", "-c", &self.script])
            // Names without a --resolve entry are never looked up outside.
            .env("MOAT_NO_DNS", "1")
            // Who runs the test is who CMD runs as; no terminal to signal it.
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID")
            .stdin(std::process::Stdio::null())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir);
        cmd
    }

    /// (exit code, stdout, stderr).
    pub fn run(&self) -> (i32, String, String) {
        let out = self.command().output().unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    }
}

#[test]
fn a_sandbox_reaches_only_the_policy_on_ports_80_and_443_of_any_address_and_its_dns_as_its_own_container_and_passes_its_exit_code()
 {
    if !sandbox_available() {
        return;
    }
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
curl -s -m 10 --noproxy '*' --resolve a.test:80:192.0.2.1 -H 'Proxy-Authorization: Basic b3RoZXI6eA==' http://a.test/x
printf 'GET /raw HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n' | curl -s -m 10 telnet://192.0.2.77:80 | tail -1
curl -s -m 10 --resolve up.test:80:192.0.2.2 http://up.test/
echo "other host $(curl -s -m 10 -o /dev/null -w '%{http_code}' http://192.0.2.9/)"
curl -s -m 5 http://192.0.2.9:8080/ >/dev/null; echo "other port $?"
echo "data: $(ls -A "$DATA" | tr '\n' ' ')"
echo "secret: ${MOAT_SECRET_TOKEN:-none}"
umount "$DATA" 2>/dev/null; echo "umount rc=$?"
curl -s -m 10 http://a.test/dns
grep -c '^nameserver 127.0.0.1$' /etc/resolv.conf
bash -c "echo query > /dev/udp/127.0.0.1/$UDP_PORT" 2>/dev/null; bash -c "echo query > /dev/udp/192.0.2.5/$UDP_PORT" 2>/dev/null
curl -s -m 10 https://a.test/tls
echo "https other $(curl -s -m 10 -o /dev/null -w '%{http_code}' https://denied.example/)"
echo "host is not sni $(curl -s --http1.1 -m 10 -o /dev/null -w '%{http_code}' -H 'Host: up.test' https://a.test/)"
python3 -c "$PY_LITERAL_IP"
python3 -c "$PY_DNS_TCP"
echo "host loopback $(curl -s -m 5 -o /dev/null -w '%{http_code}' http://127.0.0.1:$UP_PORT/)"
if command -v node >/dev/null; then node -e 'fetch("http://a.test/node").then(r => r.text()).then(t => process.stdout.write(t))'; else echo "no node"; fi
echo "ipv6 $(curl -s -m 5 -o /dev/null -w '%{http_code}' -g 'http://[2001:db8::1]/') $(curl -s -m 5 -o /dev/null -w '%{http_code}' -g 'http://[::1]/')"
exit 3
"#;
    // A program with sockets of its own, to a literal address on port 80: no proxy, no name.
    let py_literal_ip = r#"
import socket
s = socket.create_connection(("203.0.113.80", 80), timeout=10)
s.sendall(b"GET /py HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
print(s.recv(4096).decode().splitlines()[-1])
"#;
    // DNS over TCP to an outside server's address: moat's responder answers.
    let py_dns_tcp = r#"
import socket, struct
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03tcp\x04test\x00\x00\x01\x00\x01"
s = socket.create_connection(("192.0.2.53", 53), timeout=10)
s.sendall(struct.pack("!H", len(q)) + q)
n = struct.unpack("!H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
print("dns tcp", ".".join(str(b) for b in r[-4:]))
"#;
    let data = dir.path().join("data");
    // A UDP server on the host's loopback standing in for an outside resolver.
    let outside = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    outside.set_read_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
    let udp_port = outside.local_addr().unwrap().port().to_string();
    let (code, out, err) = SandboxRun::new(dir.path(), &policy(&up), script)
        .env("MOAT_SECRET_TOKEN", "tok-0123456789")
        .env("DATA", data.to_str().unwrap())
        .env("UDP_PORT", &udp_port)
        .env("UP_PORT", &up.addr.port().to_string())
        .env("PY_LITERAL_IP", py_literal_ip)
        .env("PY_DNS_TCP", py_dns_tcp)
        .run();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(code, 3, "CMD's exit code passes through\n{out}\n{err}");
    // The kernel's identity, whatever the program claims; the forged credentials go no further.
    assert_eq!(lines[0], "hi agent-1 http://a.test/x auth=nil", "{out}\n{err}");
    // A program that ignores proxies and dials a literal address is captured just the same.
    assert_eq!(lines[1], "hi agent-1 http://a.test/raw auth=nil", "{out}\n{err}");
    assert_eq!(lines[2], "upstream 200", "{out}\n{err}");
    assert_eq!(lines[3], "other host 520", "{out}\n{err}");
    // Any other port is relayed (the class's enableInternet is on), and denied like a request.
    assert_ne!(lines[4], "other port 0", "{out}");
    assert!(
        err.contains(r#"method="TCP" scheme="tunnel" host="192.0.2.9" port=8080"#)
            && err.contains(r#"decision="deny" detail="not-allowed""#),
        "{err}"
    );
    assert_eq!(lines[5], "data: ca-bundle.pem ca.pem resolv.conf ", "moat's data folder shows only its CA: {out}");
    assert_eq!(lines[6], "secret: none", "moat's variables never reach CMD: {out}");
    assert_ne!(lines[7], "umount rc=0", "CMD cannot unhide the data folder: {out}");
    // A name with no --resolve: moat's DNS answered it (every server address is moat's inside).
    assert_eq!(lines[8], "hi agent-1 http://a.test/dns auth=nil", "{out}\n{err}");
    assert!(err.contains("dns A a.test.: 198.18.0.1 container=agent-1"), "{err}");
    assert!(outside.recv(&mut [0u8; 64]).is_err(), "a datagram left the sandbox");
    assert_eq!(lines[9], "1", "resolv.conf names moat's DNS: {out}");
    // HTTPS to any address: decided on the server name, intercepted with moat's CA, which
    // the sandbox trusts through the bundle and variables moat put there (no curl flag).
    assert_eq!(lines[10], "hi agent-1 https://a.test/tls auth=nil", "{out}\n{err}");
    assert_eq!(lines[11], "https other 000", "a denied name gets no TLS at all: {out}");
    assert_eq!(lines[12], "host is not sni 400", "{out}\n{err}");
    assert_eq!(lines[13], "hi agent-1 http://a.test/py auth=nil", "{out}\n{err}");
    assert!(lines[14].starts_with("dns tcp 198.18."), "a sandbox address: {out}\n{err}");
    assert!(err.contains("dns A tcp.test.: 198.18."), "{err}");
    // The sandbox's loopback is its own: the host's services are not on it.
    assert_eq!(lines[15], "host loopback 000", "{out}");
    // Node's fetch ignores proxy variables altogether: captured all the same (where node is).
    if lines[16] != "no node" {
        assert_eq!(lines[16], "hi agent-1 http://a.test/node auth=nil", "{out}\n{err}");
    }
    assert_eq!(lines[17], "ipv6 000 000", "IPv6 goes nowhere: {out}");
    assert!(err.contains(r#"container="agent-1""#) && err.contains(r#"host="a.test""#), "{err}");
    assert!(up.count() == 1, "only the handler's fetch reached the upstream");
    // Nothing of the run is left in the data folder but moat's own files.
    assert!(
        !std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".sock") && e.file_name() != "admin.sock")
    );
}

#[test]
fn an_ordinary_user_gets_the_same_sandbox_where_user_namespaces_are_enabled() {
    if !sandbox_available() || !rustix::process::geteuid().is_root() {
        return;
    }
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    // The unprivileged user writes its data folder in a folder of its own.
    Command::new("chown").args(["65534:65534"]).arg(dir.path()).status().unwrap();
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
    // The build may live where that user cannot read (a root-only checkout): a copy it can.
    let bin = dir.path().join("moat");
    std::fs::hard_link(MOAT, &bin).or_else(|_| std::fs::copy(MOAT, &bin).map(drop)).unwrap();
    let script = "curl -s -m 10 --resolve a.test:80:192.0.2.1 http://a.test/u; id -u; grep CapEff /proc/self/status; \
                  echo \"relay $(curl -s -m 5 -o /dev/null -w '%{http_code}' http://192.0.2.9:8080/)\"; exit 5";
    let (code, out, err) = SandboxRun::new(dir.path(), &policy(&up), script)
        .through(&nobody, &bin)
        .env("HOME", "/nonexistent")
        .arg("--internet")
        .run();
    assert_eq!(code, 5, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hi agent-1 http://a.test/u auth=nil", "{out}\n{err}");
    // The user it is outside, without a capability.
    assert_eq!(lines[1], "65534", "{out}");
    assert_eq!(lines[2], "CapEff:\t0000000000000000", "{out}");
    // The relay's firewall works in an ordinary user's namespace too.
    assert_eq!(lines[3], "relay 000", "{out}");
    assert!(err.contains(r#"method="TCP" scheme="tunnel" host="192.0.2.9" port=8080"#), "{err}");
}

/// Starts `moat run -- sh -c SCRIPT` on `dir/policy.lua` and waits for SCRIPT's first line,
/// `ready`; returns the process and the rest of its output.
pub fn start_ready(run: SandboxRun<'_>) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>) {
    let mut child =
        run.command().stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    (child, stdout)
}

/// Whether a process whose command line contains `needle` is running on the host.
fn running(needle: &str) -> bool {
    processes_matching(needle) > 0
}

#[test]
fn nothing_the_command_started_outlives_the_run_not_even_a_killed_moat_and_sigterm_reaches_the_command() {
    if !sandbox_available() {
        return;
    }
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    // The host's links, routes and mounts, which a sandbox must leave as it found them.
    let host_state = || {
        let ip = |args: &[&str]| String::from_utf8(Command::new("ip").args(args).output().unwrap().stdout).unwrap();
        // Only mounts at this test's folder: other tests mount a tmpfs of their own meanwhile.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let ours: Vec<String> =
            mounts.lines().filter(|l| l.contains(&*dir.path().to_string_lossy())).map(str::to_string).collect();
        let nft = Command::new("nft").args(["list", "ruleset"]).output().map(|o| o.stdout).unwrap_or_default();
        (ip(&["-o", "link"]), ip(&["route"]), ip(&["netns", "list"]), ours, nft)
    };
    let before = host_state();
    // A background process left running when the command exits; an orphan that ended
    // meanwhile is reaped (no zombie in the sandbox).
    let script = "(sh -c 'sleep 0.1 &'); sleep 1; \
                  echo zombies $(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l); \
                  sleep 4321 & echo started; exit 0";
    let (code, out, err) = SandboxRun::new(dir.path(), &policy(&up), script).run();
    assert_eq!((code, out.as_str()), (0, "zombies 0\nstarted\n"), "{err}");
    assert!(!running("sleep 4321"), "a process of the sandbox outlived it");
    assert!(before == host_state(), "the run changed the host's links, routes, mounts or firewall");

    // SIGTERM and SIGINT (not from a terminal) to moat run: the command sees them, and its
    // exit code is the run's.
    for (signal, name, code) in [(rustix::process::Signal::TERM, "TERM", 9), (rustix::process::Signal::INT, "INT", 8)] {
        let script = format!("trap 'echo got-{name}; exit {code}' {name}; echo ready; sleep 4322 & wait");
        let (mut child, mut stdout) = start_ready(SandboxRun::new(dir.path(), &policy(&up), &script));
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
        let status = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert_eq!((status.code(), rest.as_str()), (Some(code), format!("got-{name}\n").as_str()));
        assert!(!running("sleep 4322"), "the command's child outlived the run");
    }
    assert!(before == host_state(), "a signalled run changed the host");

    // moat itself killed: the sandbox ends with it, leaving nothing.
    let (mut child, _stdout) = start_ready(SandboxRun::new(dir.path(), &policy(&up), "echo ready; sleep 4323"));
    assert!(running("sleep 4323"));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let init = format!("__sandbox-init {}", dir.path().join("data").display());
    while (running("sleep 4323") || running(&init)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!running("sleep 4323"), "the sandbox outlived moat");
    assert!(!running(&init), "the init step outlived moat");
    assert!(before == host_state(), "a killed moat left something on the host");
}
