//! Per-container limits (cgroups): `--memory` and `--pids` on `moat start` and `moat run`,
//! `memory`/`pids` in the admin API and in Lua's `start{}`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::containers::{moat, root_daemon};
use crate::harness::*;
use crate::sandbox::{SandboxRun, sandbox_available};

const POLICY: &str = r#"
allowedHosts = { "ctl.local" }
outboundByHost = {
  ["ctl.local"] = function(request)
    local c = moat.container("from-lua")
    local ok, err = pcall(function() return c:start{ entrypoint = { "true" }, memroy = "16MiB" } end)
    c:start{ entrypoint = { "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1" }, memory = "16MiB" }
    return Response.new("misspelled: " .. tostring(err):match("unknown option[^(]*") .. "\nexit " .. tostring(c:monitor()) .. "\n")
  end,
}
"#;

/// Folders named `name` below /sys/fs/cgroup (any hierarchy, any depth up to 8).
fn cgroups_named(name: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &Path, name: &str, depth: usize, out: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            } else if depth < 8 {
                walk(&e.path(), name, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 0, &mut out);
    out
}

/// 64 MiB that dd reads into its buffer: more than a 16 MiB limit allows.
const DD: [&str; 5] = ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"];

#[test]
fn memory_and_process_limits_hold_for_the_whole_container_and_leave_no_cgroup() {
    let Some((dir, serve)) = root_daemon(POLICY) else { return };
    let d = dir.path();

    // Without a limit dd runs; with one (the admin API's size text) the kernel ends it.
    let (code, _, err) = moat(d, &["start", "--id", "free", "--", DD[0], DD[1], DD[2], DD[3], DD[4]]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(moat(d, &["wait", "free"]).1, "0\n");
    let body = format!(r#"{{"id": "mem", "entrypoint": {DD:?}, "memory": "16MiB"}}"#);
    let (status, text) = admin(&d.join("data/admin.sock"), "POST", "/v1/containers", Some(&body));
    assert_eq!(status, 201, "{text}");
    assert!(text.contains(r#""memory":16777216"#), "the record shows the limit: {text}");
    assert_eq!(moat(d, &["wait", "mem"]).1, "137\n", "SIGKILLed by the OOM killer\n{}", moat(d, &["logs", "mem"]).1);

    // Processes: the command and whatever it forks count together (dash gives up at the
    // first fork refused; with room for all of them it runs on).
    let script = "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 4501 & done; echo ready; sleep 4502";
    let (code, _, err) = moat(d, &["start", "--id", "few", "--pids", "6", "--", "sh", "-c", script]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = moat(d, &["wait", "few"]);
    let log = moat(d, &["logs", "few"]).1;
    assert!(code != 0 && log.contains("Cannot fork") && !log.contains("ready"), "{out} {log}");
    let (code, _, err) = moat(d, &["start", "--id", "enough", "--pids", "20", "--", "sh", "-c", script]);
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !moat(d, &["logs", "enough"]).1.contains("ready") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let sleeps = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x004501\x00"))
        .count();
    assert_eq!(sleeps, 12, "{}", moat(d, &["logs", "enough"]).1);
    assert_eq!(cgroups_named("moat.enough").len(), 1, "one pids cgroup while it runs");
    let (code, out, err) = moat(d, &["stop", "enough"]);
    assert_eq!((code, out.as_str()), (0, "143\n"), "{err}");

    // From Lua, with an option it does not know refused (nothing is started by that call).
    let out = curl_via(&serve.proxy_url(), "http://ctl.local/", &[]);
    assert_eq!(out.body, "misspelled: unknown option \"memroy\" \nexit 137\n", "{}", serve.logs());

    // Bad values: one line each, nothing started.
    let (code, _, err) = moat(d, &["start", "--id", "bad", "--memory", "lots", "--", "true"]);
    assert!(code == 2 && err.contains("\"lots\" is no size"), "{err}");
    let (code, _, err) = moat(d, &["start", "--id", "bad", "--memory", "1MiB", "--", "true"]);
    assert!(code == 2 && err.contains("memory limit: at least 4 MiB"), "{err}");
    assert!(!moat(d, &["ps"]).1.contains("bad "));

    // moat run takes the same flags.
    let (code, _, err) = SandboxRun::new(d, POLICY, &DD.join(" ")).arg("--memory").arg("16MiB").run();
    assert_eq!(code, 137, "{err}");

    // Every container has ended: no cgroup of theirs is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    let left = || {
        ["free", "mem", "few", "enough", "from-lua", "agent-1"]
            .iter()
            .flat_map(|id| cgroups_named(&format!("moat.{id}")))
            .collect::<Vec<_>>()
    };
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(left(), Vec::<std::path::PathBuf>::new());
}

#[test]
fn a_containers_log_keeps_its_newest_output_within_a_mebibyte() {
    if !sandbox_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.lua"), POLICY).unwrap();
    let _serve = Moat::serve_folder(dir.path());
    let d = dir.path();
    // 3 MiB of output, then a last line.
    let script = "head -c 3145728 /dev/zero | tr '\\0' x; echo; echo last-line";
    let (code, _, err) = moat(d, &["start", "--id", "chatty", "--", "sh", "-c", script]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(moat(d, &["wait", "chatty"]).1, "0\n");
    let file = d.join("data/containers/chatty.log");
    // The copy into the log may finish just after the command's end.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&file).unwrap_or_default().ends_with("last-line\n") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 0 && size <= 1 << 20, "{size} bytes kept");
    let (code, out, _) = moat(d, &["logs", "chatty"]);
    assert_eq!(code, 0);
    assert!(out.ends_with("xxxx\nlast-line\n") && out.len() as u64 == size, "{} bytes shown", out.len());
}
