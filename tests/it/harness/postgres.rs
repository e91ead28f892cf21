//! A real PostgreSQL server for the shared-store tests: Debian's server binaries, a cluster in
//! a temporary folder, listening on 127.0.0.1 only, with a password (so that tests can check
//! it never shows). Root cannot run postgres: as root the cluster belongs to `postgres`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The password of the test clusters' user `moat`.
pub const PG_PASSWORD: &str = "pg-test-pass-4d1f9a";

/// A running test cluster; stopped (and its folder removed) on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
    next_db: AtomicUsize,
}

/// Debian's server binaries (`/usr/lib/postgresql/N/bin`), newest first.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// `program` as the cluster's owner.
fn owner_cmd(program: &Path) -> Command {
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PgServer {
    /// A fresh cluster, or `None` when PostgreSQL is not installed (a test then skips, but
    /// not where `MOAT_REQUIRE_POSTGRES` is set: CI installs it).
    pub fn start() -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var_os("MOAT_REQUIRE_POSTGRES").is_none(),
                "PostgreSQL is required (apt-get install postgresql)"
            );
            eprintln!("skipped: no PostgreSQL server under /usr/lib/postgresql");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::write(dir.path().join("pw"), PG_PASSWORD).unwrap();
        if as_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(ok.success());
        }
        let out = owner_cmd(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "moat", "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"])
            .arg(format!("--pwfile={}", dir.path().join("pw").display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // The shared cluster lives in a static, which is never dropped: a watcher stops it (and
        // removes its folder) once this test process is gone, however it ended.
        let watch = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -KILL $(head -1 '{d}/data/postmaster.pid' 2>/dev/null) 2>/dev/null; sleep 1; rm -rf '{d}'",
            me = std::process::id(),
            d = dir.path().display()
        );
        let mut watcher = Command::new("sh")
            .args(["-c", &watch])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::spawn(move || watcher.wait());
        let mut server = PgServer { dir, port, bin, child: None, next_db: AtomicUsize::new(0) };
        server.run();
        Some(server)
    }

    /// Starts the server (again) on the same folder and port, and waits until it answers.
    pub fn run(&mut self) {
        let data = self.dir.path().join("data");
        let child = owner_cmd(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
            .arg("-k")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.psql("postgres", "SELECT 1").0 {
            assert!(Instant::now() < deadline, "PostgreSQL did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server at once (SIGKILL to the postmaster; its backends exit with it).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // As root the child is runuser; the postmaster's pid is in its pid file.
            if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")) {
                let pid = pid.lines().next().unwrap_or("").trim().to_string();
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            let _ = c.kill();
            let _ = c.wait();
            // Its backends notice the postmaster is gone; wait until the port is free.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_file(self.dir.path().join("data/postmaster.pid"));
        }
    }

    /// `sql` through psql on database `db`: (succeeded, output).
    pub fn psql(&self, db: &str, sql: &str) -> (bool, String) {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "moat", "-d", db, "-At", "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "2")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The URL of a fresh, empty database of its own.
    pub fn fresh_database(&self) -> String {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::SeqCst));
        let (ok, _) = self.psql("postgres", &format!("CREATE DATABASE {name}"));
        assert!(ok, "CREATE DATABASE {name} failed");
        format!("postgres://moat:{PG_PASSWORD}@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One cluster shared by the tests of this process that need no server of their own (each
/// takes a fresh database); `None` when PostgreSQL is not installed.
pub fn shared_pg() -> Option<&'static PgServer> {
    static SERVER: std::sync::OnceLock<Option<PgServer>> = std::sync::OnceLock::new();
    SERVER.get_or_init(PgServer::start).as_ref()
}
