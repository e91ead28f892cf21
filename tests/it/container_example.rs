//! docs/containers.md's worked example, run as written (its policy is read from the page),
//! and the daemon of an ordinary user: its containers, `moat exec` into one.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::sandbox::sandbox_available;

/// The first ```lua block after `heading` in docs/containers.md.
fn lua_block_after(heading: &str) -> String {
    let page = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/containers.md")).unwrap();
    let section = &page[page.find(heading).expect("the heading is on the page")..];
    let start = section.find("```lua\n").unwrap() + "```lua\n".len();
    section[start..start + section[start..].find("```").unwrap()].to_string()
}

/// `moat ARGS --data-dir DIR/data` as `prefix` (none: this user): (exit code, stdout, stderr).
fn moat_as(prefix: &[&str], bin: &Path, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let at = all.iter().position(|a| a == "--").unwrap_or(all.len());
    all.splice(at..at, ["--data-dir".to_string(), dir.join("data").display().to_string()]);
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd.args(&all).current_dir(dir).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Retries `f` for up to 10 s until it gives `Some`.
fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_worked_example_serves_a_tool_container_behind_a_virtual_host() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("policy.lua"), lua_block_after("## A worked example")).unwrap();
    let serve = Moat::serve_folder(d);
    let moat = |args: &[&str]| moat_as(&[], Path::new(MOAT), d, args);
    let (code, out, err) =
        moat(&["start", "--id", "tool", "--", "python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"]);
    assert_eq!((code, out.as_str()), (0, "tool\n"), "{err}");
    // Straight into it: a directory listing (of the folder `moat start` ran in).
    let listing = eventually(|| {
        let (code, out, _) = moat(&["port", "tool", "8080", "GET", "/"]);
        (code == 0).then_some(out)
    });
    let listing = listing.unwrap_or_else(|| panic!("no answer on port 8080\n{}", moat(&["logs", "tool"]).1));
    assert!(listing.contains("Directory listing for /") && listing.contains("policy.lua"), "{listing}");
    // Through the policy's handler.
    let out = curl_via(&serve.proxy_url().replace("http://", "http://agent-1:x@"), "http://tools.local/", &[]);
    assert_eq!(out.status, 200, "{}", serve.logs());
    assert!(out.body.contains("Directory listing for /"), "{}", out.body);
    // The server's own log lines.
    let log =
        eventually(|| Some(moat(&["logs", "tool"]).1).filter(|l| l.matches("\"GET / HTTP/1.1\" 200").count() == 2));
    assert!(log.is_some(), "{}", moat(&["logs", "tool"]).1);
    let (code, out, err) = moat(&["stop", "tool"]);
    assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");
}

#[test]
fn an_ordinary_users_daemon_runs_containers_and_moat_exec_enters_them() {
    if !sandbox_available() || !rustix::process::geteuid().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    Command::new("chown").args(["65534:65534"]).arg(d).status().unwrap();
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
    // The build may live where that user cannot read (a root-only checkout): a copy it can.
    let bin = d.join("moat");
    std::fs::hard_link(MOAT, &bin).or_else(|_| std::fs::copy(MOAT, &bin).map(drop)).unwrap();
    let policy = r#"
allowedHosts = { "a.test" }
outboundByHost = { ["a.test"] = function(request, env, ctx) return Response.new("hi " .. ctx.containerId .. "\n") end }
"#;
    std::fs::write(d.join("policy.lua"), policy).unwrap();
    let mut cmd = Command::new(nobody[0]);
    cmd.args(&nobody[1..]).arg(&bin).args(["serve", "--listen", "127.0.0.1:0", "--policy"]);
    cmd.arg(d.join("policy.lua")).arg("--data-dir").arg(d.join("data")).env("HOME", "/nonexistent");
    let serve = Moat::spawn(cmd, tempfile::tempdir().unwrap());
    let moat = |args: &[&str]| moat_as(&nobody, &bin, d, args);

    let (code, _, err) = moat(&["start", "--id", "u1", "--env", "FOO=bar", "--", "sleep", "4520"]);
    assert_eq!(code, 0, "{err}\n{}", serve.logs());
    let script = "id -u; echo FOO=$FOO; curl -s -m 10 http://a.test/; grep CapEff /proc/self/status; \
                  (sleep 4521 >/dev/null 2>&1 &); exit 4";
    let (code, out, err) = moat(&["exec", "u1", "--", "sh", "-c", script]);
    assert_eq!(code, 4, "{out}\n{err}");
    assert_eq!(out, "65534\nFOO=bar\nhi u1\nCapEff:\t0000000000000000\n", "{err}");
    // Another user cannot enter it (root's daemon is not theirs either: its socket is 0600).
    let other = ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups"];
    let pid = moat(&["ps"])
        .1
        .lines()
        .find(|l| l.starts_with("u1 "))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    let out = Command::new(other[0])
        .args(&other[1..])
        .arg(&bin)
        .args(["__sandbox-exec", &pid, "/nonexistent", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot enter the container's") || err.contains("container's"),
        "{err}"
    );
    let (code, out, err) = moat(&["stop", "u1"]);
    assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");
    let gone = eventually(|| (processes_matching("sleep 4521") == 0).then_some(()));
    assert!(gone.is_some(), "what exec started ended with the container");
}
