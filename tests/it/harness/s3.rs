//! A real S3-compatible server for the shared-bucket tests: moto's server (PyPI
//! `moto[server]`), on 127.0.0.1, in memory, stopped on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test server's credentials (moto accepts any; moat must still sign with them).
pub const S3_ACCESS_KEY: &str = "AKIDMOATTEST00000000";
pub const S3_SECRET_KEY: &str = "s3-test-secret-9b7c2e0f1a";

pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    /// A fresh server, or `None` when moto's server is not installed (a test then skips, but
    /// not where `MOAT_REQUIRE_S3` is set: CI installs it).
    pub fn start() -> Option<S3Server> {
        let installed = Command::new("python3")
            .args(["-c", "import moto.server, flask"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var_os("MOAT_REQUIRE_S3").is_none(),
                "moto's S3 server is required (pip install 'moto[server]')"
            );
            eprintln!("skipped: python3 has no moto server");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = S3Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates bucket `name` (moto takes an unsigned request).
    pub fn create_bucket(&self, name: &str) {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
            .arg(format!("{}/{name}", self.endpoint()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "creating bucket {name}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
