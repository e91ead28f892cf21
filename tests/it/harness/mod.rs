//! Test harness: a real moat process, a real upstream server on loopback, real clients.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod postgres;
mod s3;
pub use s3::*;
mod upstreams;
pub use postgres::*;
pub use upstreams::*;

pub const MOAT: &str = env!("CARGO_BIN_EXE_moat");

/// How a test's `moat serve` is started: `Moat::policy(p).limit("lua_cpu", "1s").start()`.
#[derive(Default)]
pub struct MoatBuilder {
    policy: String,
    config: Option<String>,
    limits: Vec<(String, String)>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl MoatBuilder {
    /// A moat.toml (passed with `--config`).
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// One `[limits]` key; a number stays a number, anything else is written as a string.
    pub fn limit(mut self, key: &str, value: &str) -> Self {
        let value = if value.parse::<u64>().is_ok() { value.to_string() } else { format!("{value:?}") };
        self.limits.push((key.to_string(), value));
        self
    }

    /// `--resolve host=ip`: moat's resolver answers `host` with `ip`.
    pub fn resolve(self, host: &str, ip: &str) -> Self {
        self.arg("--resolve").arg(&format!("{host}={ip}"))
    }

    /// A secret `name` with `value` (from the environment, `MOAT_SECRET_<name>`).
    pub fn secret(self, name: &str, value: &str) -> Self {
        self.env(&format!("MOAT_SECRET_{name}"), value)
    }

    /// The number of worker threads (two unless a test asks otherwise).
    pub fn workers(self, n: usize) -> Self {
        self.env("MOAT_WORKERS", &n.to_string())
    }

    /// An environment variable of the moat process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// One more command-line argument of `moat serve`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Starts it in a fresh temporary folder and waits until it serves.
    pub fn start(self) -> Moat {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.lua"), &self.policy).unwrap();
        let mut cmd = Command::new(MOAT);
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0");
        cmd.arg("--policy").arg(dir.path().join("policy.lua"));
        cmd.arg("--data-dir").arg(dir.path().join("data"));
        let mut toml = self.config.unwrap_or_default();
        if !self.limits.is_empty() {
            assert!(!toml.contains("[limits]"), "set limits with .limit() or in .config(), not both");
            toml.push_str("\n[limits]\n");
            for (key, value) in &self.limits {
                toml.push_str(&format!("{key} = {value}\n"));
            }
        }
        if !toml.is_empty() {
            std::fs::write(dir.path().join("moat.toml"), toml).unwrap();
            cmd.arg("--config").arg(dir.path().join("moat.toml"));
        }
        cmd.args(&self.args).env("MOAT_WORKERS", "2").envs(self.env).current_dir(dir.path());
        Moat::spawn(cmd, dir)
    }
}

/// A running `moat serve`, killed on drop.
pub struct Moat {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    #[allow(dead_code)] // owns the temp folder for as long as moat runs
    pub dir: tempfile::TempDir,
}

impl Moat {
    /// Serves `policy` (Lua source) with no config.
    pub fn start(policy: &str) -> Moat {
        Self::policy(policy).start()
    }

    /// A moat that will serve `policy` (Lua source): say how, then [`MoatBuilder::start`].
    pub fn policy(policy: &str) -> MoatBuilder {
        MoatBuilder { policy: policy.to_string(), ..Default::default() }
    }

    /// Serves `folder/policy.lua` with its data in `folder/data`, for tests that restart moat
    /// on the same data or use the CLI beside it. The folder outlives the process.
    pub fn serve_folder(folder: &Path) -> Moat {
        let mut cmd = Command::new(MOAT);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--policy"])
            .arg(folder.join("policy.lua"))
            .arg("--data-dir")
            .arg(folder.join("data"));
        Moat::spawn(cmd, tempfile::tempdir().unwrap())
    }

    pub fn spawn(cmd: Command, dir: tempfile::TempDir) -> Moat {
        Self::spawn_then(cmd, dir, || {})
    }

    /// Starts `cmd`, runs `meanwhile` as soon as the process exists (before it is ready), then
    /// waits until it listens.
    pub fn spawn_then(mut cmd: Command, dir: tempfile::TempDir, meanwhile: impl FnOnce()) -> Moat {
        // Tests talk only to loopback: moat may answer names from --resolve, never from DNS.
        cmd.env("MOAT_NO_DNS", "1");
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start moat");
        meanwhile();
        let logs = Arc::new(Mutex::new(String::new()));
        let sink = logs.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let printed = Arc::new(Mutex::new(String::new()));
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
                std::thread::sleep(Duration::from_millis(100));
                panic!("moat did not start; logs:\n{}", logs.lock().unwrap());
            }
            printed.lock().unwrap().push_str(&line);
            if let Some(rest) = line.strip_prefix("moat: listening on ") {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        let sink = printed.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Moat { child, addr, logs, stdout: printed, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a `kill` name: "TERM", "HUP", ...) to moat.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().unwrap();
        assert!(ok.success(), "kill -{signal} failed");
    }

    /// Waits up to `limit` for moat to exit; its exit code, or None if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything moat wrote to stdout so far (startup lines: listeners, CA).
    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Everything moat wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` (log lines are written after the response).
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let l = self.logs();
            if l.contains(needle) || Instant::now() > deadline {
                return l;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Moat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What curl got.
pub struct CurlOut {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// Runs curl through the proxy; `extra` are more curl arguments.
pub fn curl(moat: &Moat, url: &str, extra: &[&str]) -> CurlOut {
    curl_via(&moat.proxy_url(), url, extra)
}

pub fn curl_via(proxy: &str, url: &str, extra: &[&str]) -> CurlOut {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "--noproxy", "", "-x", proxy])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl runs");
    parse_response(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("curl gave no response: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Parses `HTTP/1.1 200 OK\r\nh: v\r\n\r\nbody` (skipping 100 Continue blocks).
pub fn parse_response(text: &str) -> Option<CurlOut> {
    let mut rest = text;
    loop {
        let (head, body) = rest.split_once("\r\n\r\n")?;
        let mut lines = head.lines();
        let first = lines.next()?;
        let status: u16 = first.split_whitespace().nth(1)?.parse().ok()?;
        // Skip interim answers: 100 Continue, and the proxy's 200 to a CONNECT.
        if status == 100 || first.to_ascii_lowercase().contains("connection established") {
            rest = body;
            continue;
        }
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in lines.filter_map(|l| l.split_once(':')) {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            headers.entry(k).and_modify(|e| *e = format!("{e}, {v}")).or_insert(v);
        }
        return Some(CurlOut { status, headers, body: body.to_string() });
    }
}

/// Sends raw bytes to moat and returns whatever it answers until it closes (or 5 s).
pub fn raw(moat: &Moat, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(moat.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes a file into the moat's temp dir.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs a moat subcommand to completion: (exit code, stdout, stderr).
pub fn moat_cmd(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(MOAT).args(args).current_dir(cwd).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Calls the admin API with curl over the Unix socket: (status, body).
pub fn admin(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"]).arg(socket).args(["-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = cmd.arg(format!("http://moat{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// A memory figure of process `pid` in KiB, from /proc/PID/status (`VmRSS`, `VmHWM`, …).
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).unwrap();
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// How many host processes have `needle` in their command line.
pub fn processes_matching(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
        })
        .count()
}
