//! Faults (SPEC 8, 9): upstreams that break mid-exchange, a full disk under the stores,
//! SIGKILL in the middle of writes, and a class whose policy fails on every request. What must
//! hold is in each test's name.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A loopback upstream that answers every request on a connection with `each(n, stream)`,
/// where n counts the requests of that connection from 0; `each` returns false to stop.
fn scripted_upstream(each: fn(usize, &mut TcpStream) -> bool) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                for n in 0.. {
                    // One read per request: the test's requests are small and bodiless.
                    match c.read(&mut buf) {
                        Ok(k) if k > 0 => {}
                        _ => return,
                    }
                    if !each(n, &mut c) {
                        return;
                    }
                }
            });
        }
    });
    port
}

const POLICY: &str = r#"
allowedHosts = { "127.0.0.1", "via.test", "ok.test" }
outboundByHost = {
  ["via.test"] = function(request)
    local url = URL.new(request.url)
    local ok, res = pcall(function()
      local r = fetch("http://127.0.0.1:" .. url.port .. url.pathname)
      return r.status .. " " .. r:text()
    end)
    return Response.new(ok and res or ("fetch failed: " .. tostring(res)), { status = ok and 200 or 502 })
  end,
  ["ok.test"] = function() return Response.new("fine") end,
}
"#;

#[test]
fn an_upstream_that_resets_mid_body_stalls_mid_head_or_sends_a_broken_head_is_a_clear_failure_and_moat_serves_on() {
    let reset = scripted_upstream(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nfirst hundred bytes");
        std::thread::sleep(Duration::from_millis(100));
        // Closing with SO_LINGER 0 sends a reset instead of a FIN.
        let _ = rustix::net::sockopt::set_socket_linger(&*c, Some(Duration::ZERO));
        false
    });
    let stall = scripted_upstream(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-le");
        std::thread::sleep(Duration::from_secs(30));
        false
    });
    let broken = scripted_upstream(|_, c| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nno colon in this line\r\n\r\n");
        false
    });
    let toml = "[limits]\nresponse_head_timeout = \"1s\"\n";
    let moat = Moat::start_with(POLICY, Some(toml), &[], &[]);

    // Egress: the head went out before the reset, so the client sees its connection cut
    // (never a complete answer); a stalled head is a 504, a broken one a 502.
    let r = curl(&moat, &format!("http://127.0.0.1:{reset}/reset"), &[]);
    assert!(r.status == 200 && r.body.len() < 1000, "a cut body is never complete: {} {}", r.status, r.body);
    let r = curl(&moat, &format!("http://127.0.0.1:{stall}/stall"), &[]);
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.body.contains("response_head_timeout"), "{}", r.body);
    let r = curl(&moat, &format!("http://127.0.0.1:{broken}/broken"), &[]);
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.body.lines().count(), 1, "one line: {}", r.body);

    // Through a handler's fetch: each is an error the handler can catch.
    for (port, path) in [(reset, "/reset"), (stall, "/stall"), (broken, "/broken")] {
        let r = curl(&moat, &format!("http://via.test:{port}{path}"), &[]);
        assert_eq!(r.status, 502, "{path}: {}", r.body);
        assert!(r.body.starts_with("fetch failed: "), "{path}: {}", r.body);
    }
    let log = moat.logs();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(curl(&moat, "http://ok.test/", &[]).body, "fine");
}

#[test]
fn a_pooled_connection_the_upstream_closes_as_it_is_reused_is_retried_for_a_get_and_a_clear_502_for_a_post() {
    // Answers the first request of each connection and keeps it alive; reads the second and
    // closes without a byte, as a server does whose keep-alive timer fired as the request came.
    let port =
        scripted_upstream(|n, c| n == 0 && c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst").is_ok());
    let moat = Moat::start_with(POLICY, None, &[], &[("MOAT_WORKERS", "1")]);
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(curl(&moat, &url, &[]).body, "first");
    // Idle long enough for a server's keep-alive timer to matter.
    std::thread::sleep(Duration::from_millis(1200));
    let again = curl(&moat, &url, &[]);
    assert_eq!((again.status, again.body.as_str()), (200, "first"), "a GET is sent again on a new connection");
    std::thread::sleep(Duration::from_millis(1200));
    let post = curl(&moat, &url, &["--data", "once only"]);
    assert_eq!(post.status, 502, "a POST is never sent twice: {}", post.body);
    assert_eq!(post.body.lines().count(), 1, "{}", post.body);
    assert!(post.body.contains("closed"), "{}", post.body);
    let next = curl(&moat, &url, &[]);
    assert_eq!((next.status, next.body.as_str()), (200, "first"), "a new connection is dialled");
}

const STORE_POLICY: &str = r#"
outboundByHost = {
  ["kv.test"] = function(request, env)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then
      local ok, err = pcall(function() env.KV:put(key, string.rep("v", tonumber(request.headers:get("x-size")))) end)
      return Response.new(ok and "stored" or ("put failed: " .. tostring(err)), { status = ok and 200 or 507 })
    end
    local v = env.KV:get(key)
    return Response.new(v and ("len " .. #v) or "missing")
  end,
  ["blob.test"] = function(request, env)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then
      local ok, err = pcall(function() return env.BUCKET:put(key, request.body) end)
      return Response.new(ok and "stored" or ("put failed: " .. tostring(err)), { status = ok and 200 or 507 })
    end
    local obj = env.BUCKET:get(key)
    local listed = #env.BUCKET:list({ prefix = key }).objects
    return Response.new((obj and ("size " .. obj.size) or "missing") .. ", listed " .. listed)
  end,
}
"#;

/// Bytes in the files below `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// A tmpfs of `size` mounted on `dir` for as long as it lives (the test runs as root, as CI).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).status().unwrap();
        assert!(ok.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_kv_and_blob_writes_clearly_leaves_nothing_half_written_and_the_database_reopens() {
    let folder = tempfile::tempdir().unwrap();
    write(folder.path(), "policy.lua", STORE_POLICY);
    let disk = Tmpfs::mount(&folder.path().join("data"), "6m");
    let mut moat = Moat::serve_folder(folder.path());
    // KV: 512 KiB values until the disk is full.
    let mut stored = Vec::new();
    let failed = (0..40).find_map(|i| {
        let r = curl(&moat, &format!("http://kv.test/k{i}"), &["-X", "PUT", "-H", "x-size: 524288"]);
        if r.status == 200 {
            stored.push(i);
            None
        } else {
            Some((i, r))
        }
    });
    let (full_at, r) = failed.expect("a 6 MiB disk fills up");
    assert_eq!(r.status, 507, "{}", r.body);
    assert!(r.body.starts_with("put failed: ") && r.body.to_lowercase().contains("space"), "{}", r.body);
    assert!(!stored.is_empty(), "some values fit before the disk was full");
    assert_eq!(curl(&moat, &format!("http://kv.test/k{full_at}"), &[]).body, "missing", "nothing half-written");
    assert_eq!(curl(&moat, &format!("http://kv.test/k{}", stored[0]), &[]).body, "len 524288");

    // Blobs: a 4 MiB upload that cannot fit is refused and leaves no object.
    let big = folder.path().join("big.bin");
    std::fs::write(&big, vec![b'b'; 4 << 20]).unwrap();
    let up = curl(&moat, "http://blob.test/big", &["-T", big.to_str().unwrap()]);
    assert_eq!(up.status, 507, "{}", up.body);
    assert!(up.body.to_lowercase().contains("space"), "{}", up.body);
    assert_eq!(curl(&moat, "http://blob.test/big", &[]).body, "missing, listed 0");
    assert_eq!(bytes_under(&folder.path().join("data/blobs")), 0, "the cut-off upload's file is gone");

    // With room again: redb takes no write after a failed one until the database is reopened,
    // and both stores say so; after a restart writes work again, and every acknowledged value
    // is there.
    disk.resize("64m");
    let r = curl(&moat, &format!("http://kv.test/k{full_at}"), &["-X", "PUT", "-H", "x-size: 524288"]);
    assert!(r.body.contains("free space, then restart moat"), "{}", r.body);
    let r = curl(&moat, "http://blob.test/big", &["-T", big.to_str().unwrap()]);
    assert!(r.body.contains("free space, then restart moat"), "{}", r.body);
    moat.signal("TERM");
    assert_eq!(moat.wait_exit(Duration::from_secs(20)), Some(0));
    let moat = Moat::serve_folder(folder.path());
    let r = curl(&moat, &format!("http://kv.test/k{full_at}"), &["-X", "PUT", "-H", "x-size: 524288"]);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = curl(&moat, "http://blob.test/big", &["-T", big.to_str().unwrap()]);
    assert_eq!(r.status, 200, "{}", r.body);
    for i in stored.iter().chain([&full_at]) {
        assert_eq!(curl(&moat, &format!("http://kv.test/k{i}"), &[]).body, "len 524288", "k{i}");
    }
    assert_eq!(curl(&moat, "http://blob.test/big", &[]).body, format!("size {}, listed 1", 4 << 20));
    let log = moat.logs();
    assert!(!log.contains("panicked"), "{log}");
    drop(moat);
}
