//! Several moat nodes on one shared PostgreSQL database (`[kv] … backend = "postgres"`,
//! `[cluster] store`): what one node writes, another reads; an override set on one holds on
//! the others within 1 s; a store that dies gives clear answers, never a hang, and traffic
//! recovers when it returns; a node killed with SIGKILL loses no acknowledged write.

use std::time::{Duration, Instant};

use crate::harness::*;

const POLICY: &str = r#"
outboundByHost = {
  ["kv.test"] = function(request, env, ctx)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then
      env.KV:put(key, request:text())
      return Response.new("stored")
    end
    local v = env.KV:get(key)
    if v == nil then return Response.new("missing", { status = 404 }) end
    return Response.new(v)
  end,
  ["notes.test"] = function(request, env, ctx)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then ctx.storage:put(key, request:text()) return Response.new("ok") end
    return Response.new(ctx.storage:get(key) or "none")
  end,
  ["a.test"] = function() return Response.new("class") end,
  ["blob.test"] = function(request, env, ctx)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then
      local o = env.BUCKET:put(key, request.body, { customMetadata = { via = request.headers:get("x-node") } })
      return Response.new(tostring(o.size))
    end
    local o = env.BUCKET:get(key)
    if o == nil then return Response.new("missing", { status = 404 }) end
    return Response.new(o.body, { headers = { ["x-via"] = o.customMetadata.via } })
  end,
}
outboundHandlers = {
  other = function() return Response.new("override") end,
}
"#;

fn config(node: &str) -> String {
    format!(
        r#"
[kv]
KV = {{ backend = "postgres", url_env = "MOAT_PG_URL" }}
[cluster]
node = "{node}"
store = {{ backend = "postgres", url_env = "MOAT_PG_URL" }}
"#
    )
}

fn node(name: &str, url: &str) -> Moat {
    Moat::policy(POLICY).config(&config(name)).env("MOAT_PG_URL", url).start()
}

/// A node that reads the database URL from a file (a mounted secret) instead.
fn node_with_url_file(name: &str, url: &str, folder: &std::path::Path) -> Moat {
    let file = write(folder, &format!("{name}.url"), &format!("{url}\n"));
    let toml =
        config(name).replace(r#"url_env = "MOAT_PG_URL""#, &format!("url_file = {:?}", file.display().to_string()));
    Moat::policy(POLICY).config(&toml).start()
}

/// A node whose bucket is on the S3-compatible server at `endpoint`.
fn s3_node(name: &str, url: &str, endpoint: &str) -> Moat {
    let toml = format!(
        "{}[blob]\nBUCKET = {{ backend = \"s3\", bucket = \"shared\", endpoint = \"{endpoint}\", access_key_env = \"S3_KEY\", secret_key_env = \"S3_SECRET\" }}\n",
        config(name)
    );
    Moat::policy(POLICY)
        .config(&toml)
        .env("MOAT_PG_URL", url)
        .env("S3_KEY", S3_ACCESS_KEY)
        .env("S3_SECRET", S3_SECRET_KEY)
        .start()
}

/// curl through `moat` for a large transfer: uploads `upload` (PUT) or saves the answer to
/// `save`; returns the status.
fn transfer(moat: &Moat, url: &str, upload: Option<&std::path::Path>, save: &std::path::Path) -> String {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "120", "--noproxy", "", "-x", &moat.proxy_url(), "-U", "agent-1:x"]);
    cmd.args(["-H", &format!("x-node: {}", moat.addr), "-w", "%{http_code}", "-o"]).arg(save);
    if let Some(file) = upload {
        cmd.arg("-T").arg(file);
    }
    let out = cmd.arg(url).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn put(moat: &Moat, url: &str, body: &str) -> CurlOut {
    curl(moat, url, &["-X", "PUT", "--data-binary", body, "-U", "agent-1:x"])
}

fn get(moat: &Moat, url: &str) -> CurlOut {
    curl(moat, url, &["-U", "agent-1:x", "--max-time", "10"])
}

#[test]
fn two_nodes_share_kv_ctx_storage_and_overrides() {
    let Some(pg) = shared_pg() else { return };
    let url = pg.fresh_database();
    let secrets = tempfile::tempdir().unwrap();
    let (a, b) = (node("node-a", &url), node_with_url_file("node-b", &url, secrets.path()));

    // A KV put through A's handler is read through B's; so is ctx.storage.
    assert_eq!(get(&b, "http://kv.test/k1").status, 404);
    assert_eq!(put(&a, "http://kv.test/k1", "from-a").body, "stored");
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let r = get(&b, "http://kv.test/k1");
        if r.body == "from-a" {
            break;
        }
        assert!(Instant::now() < deadline, "B still answers {:?} 1 s after A's write", r.body);
    }
    assert_eq!(put(&b, "http://notes.test/n", "note").body, "ok");
    assert_eq!(get(&a, "http://notes.test/n").body, "note");

    // An override set through A's admin API holds on B's next request within 1 s.
    assert_eq!(get(&b, "http://a.test/").body, "class");
    let socket = a.dir.path().join("data/admin.sock");
    let (code, body) = admin(&socket, "PUT", "/v1/containers/agent-1/outbound-by-host/a.test", Some(r#""other""#));
    assert_eq!(code, 200, "{body}");
    let set = Instant::now();
    while get(&b, "http://a.test/").body != "override" {
        assert!(set.elapsed() < Duration::from_secs(1), "B did not follow A's override within 1 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    // B's admin API shows it too, and B clearing it holds on A.
    let socket_b = b.dir.path().join("data/admin.sock");
    let (_, shown) = admin(&socket_b, "GET", "/v1/containers/agent-1", None);
    assert!(shown.contains("other"), "{shown}");
    assert_eq!(admin(&socket_b, "DELETE", "/v1/containers/agent-1/overrides", None).0, 200);
    let cleared = Instant::now();
    while get(&a, "http://a.test/").body != "class" {
        assert!(cleared.elapsed() < Duration::from_secs(1), "A did not follow B's clear within 1 s");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Each node names itself in its status and metrics.
    let (_, status) = admin(&socket, "GET", "/v1/status", None);
    assert!(status.contains(r#""node":"node-a""#), "{status}");
    let (_, metrics) = admin(&socket_b, "GET", "/metrics", None);
    assert!(metrics.contains(r#"moat_node_info{node="node-b"} 1"#), "{metrics}");
}

#[test]
fn a_blob_uploaded_through_one_node_streams_from_another_without_buffering() {
    let Some(pg) = shared_pg() else { return };
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("shared");
    let url = pg.fresh_database();
    let (a, b) = (s3_node("node-a", &url, &s3.endpoint()), s3_node("node-b", &url, &s3.endpoint()));
    let dir = tempfile::tempdir().unwrap();
    let (file, back) = (dir.path().join("100MiB.bin"), dir.path().join("back.bin"));
    let data: Vec<u8> = (0..(100u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    drop(data);
    let answer = dir.path().join("answer.txt");
    assert_eq!(transfer(&a, "http://blob.test/big", Some(&file), &answer), "200");
    assert_eq!(std::fs::read_to_string(&answer).unwrap(), (100u64 << 20).to_string());
    assert_eq!(transfer(&b, "http://blob.test/big", None, &back), "200");
    let same = std::process::Command::new("cmp").arg("-s").arg(&file).arg(&back).status().unwrap();
    assert!(same.success(), "the object B streamed differs from what A received");
    // Neither node held the object: each one's peak resident memory stays far below 100 MiB.
    for (name, n) in [("A", &a), ("B", &b)] {
        let peak = memory_kib(n.pid(), "VmHWM");
        eprintln!("node {name}: peak RSS {} MiB", peak / 1024);
        assert!(peak < 90 << 10, "node {name} peaked at {peak} KiB: did it buffer the object?");
    }
    // Metadata set through A is seen through B.
    let r = curl(&b, "http://blob.test/big", &["-U", "agent-1:x", "-r", "0-3"]);
    assert_eq!(r.headers.get("x-via").map(String::as_str), Some(a.addr.to_string().as_str()));
    drop(s3);
    // The bucket's service gone: a clear 503 within seconds, never a hang.
    let t = Instant::now();
    let r = get(&a, "http://blob.test/big");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.starts_with("moat: blob storage failed: s3 bucket shared at http://127.0.0.1:"), "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(12), "answered after {:?}", t.elapsed());
    assert!(!a.logs().contains(S3_SECRET_KEY), "the bucket's secret key leaked into the log");
}

#[test]
fn a_store_that_dies_gives_503_with_its_reason_and_traffic_recovers_without_a_restart() {
    let Some(mut pg) = PgServer::start() else { return };
    let url = pg.fresh_database();
    let a = std::sync::Arc::new(node("node-a", &url));
    let b = node("node-b", &url);
    assert_eq!(put(&a, "http://kv.test/k", "v").body, "stored");
    // B reads k until its cache holds it (once B's notification connection is up).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&b, "http://kv.test/k").body, "v");
    // Load all along: writes, and reads of keys never cached, each timed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let t = Instant::now();
                let r = if i % 2 == 0 {
                    put(&a, &format!("http://kv.test/w{i}"), "x")
                } else {
                    get(&a, &format!("http://kv.test/r{i}"))
                };
                seen.push((r.status, r.body, t.elapsed()));
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    pg.kill();
    std::thread::sleep(Duration::from_secs(4));
    pg.run();
    let deadline = Instant::now() + Duration::from_secs(10);
    while put(&a, "http://kv.test/after", "back").status != 200 {
        assert!(Instant::now() < deadline, "no recovery 10 s after the database returned");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = load.join().unwrap();
    let failed: Vec<_> = seen.iter().filter(|(status, _, _)| *status == 503).collect();
    assert!(!failed.is_empty(), "no request saw the store down");
    for (status, body, took) in &seen {
        assert!([200, 404, 503].contains(status), "{status} {body}");
        assert!(*took < Duration::from_secs(6), "a request took {took:?}: {status} {body}");
    }
    for (_, body, _) in failed {
        assert!(body.starts_with("moat: KV storage failed: postgres 127.0.0.1:"), "{body}");
        assert_eq!(body.trim_end().lines().count(), 1, "one line: {body}");
    }
    assert!(matches!(seen.last().map(|s| s.0), Some(200 | 404)), "traffic did not recover: {:?}", seen.last());
    assert_eq!(get(&a, "http://kv.test/after").body, "back");
    assert_eq!(get(&a, "http://kv.test/k").body, "v");
    // What B cached before the outage is not served after it: a change made once the
    // database is back reaches B within 1 s (its cache was emptied when it lost the
    // notification connection, and follows the notifications again once reconnected).
    assert_eq!(put(&a, "http://kv.test/k", "v2").body, "stored");
    let changed = Instant::now();
    while get(&b, "http://kv.test/k").body != "v2" {
        assert!(changed.elapsed() < Duration::from_secs(1), "B still serves the value from before the outage");
        std::thread::sleep(Duration::from_millis(10));
    }
    let logs = a.logs();
    assert!(!logs.contains(PG_PASSWORD), "the database password leaked into the log:\n{logs}");
}

#[test]
fn sigkill_of_a_node_loses_no_acknowledged_write() {
    let Some(pg) = shared_pg() else { return };
    let url = pg.fresh_database();
    let (mut a, b) = (node("node-a", &url), node("node-b", &url));
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        let r = put(&a, &format!("http://kv.test/w{i}"), &format!("value {i}"));
        assert_eq!(r.status, 200, "{}", r.body);
        acknowledged.push(i);
    }
    a.signal("KILL");
    assert!(a.wait_exit(Duration::from_secs(5)).is_some());
    for i in acknowledged {
        assert_eq!(get(&b, &format!("http://kv.test/w{i}")).body, format!("value {i}"));
    }
}

#[test]
fn a_missing_url_or_an_unknown_backend_is_a_check_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", "allowedHosts = {}\n");
    write(dir.path(), "bad.url", "mysql://nope\n");
    for (toml, expect) in [
        (
            "[kv]\nKV = { backend = \"dynamo\" }\n",
            "kv.KV.backend \"dynamo\" is not one moat knows: use one of redb, postgres",
        ),
        (
            "[kv]\nKV = { backend = \"postgres\", url_env = \"MOAT_TEST_UNSET_URL\" }\n",
            "kv.KV: environment variable MOAT_TEST_UNSET_URL is not set (export it before moat starts, or use url_file)",
        ),
        ("[cluster]\nstore = { backend = \"postgres\" }\n", "cluster.store: backend \"postgres\" needs url_env"),
        (
            "[cluster]\nstore = { backend = \"postgres\", url_file = \"missing.url\" }\n",
            "cluster.store.url_file: cannot read",
        ),
        ("[kv]\nKV = { backend = \"postgres\", url_file = \"bad.url\" }\n", "kv.KV: "),
        (
            "[blob]\nB = { backend = \"s3\", access_key_env = \"K\", secret_key_env = \"K\" }\n",
            "blob.B: backend \"s3\" needs bucket",
        ),
        ("[blob]\nBUCKET = { backend = \"gcs\" }\n", "blob.BUCKET.backend \"gcs\""),
    ] {
        write(dir.path(), "moat.toml", &format!("[[class]]\npolicy = \"policy.lua\"\n{toml}"));
        let (code, out, err) = moat_cmd(&["check", "--config", "moat.toml"], dir.path());
        assert_eq!(code, 2, "{toml}: {out}{err}");
        assert!(err.contains(expect), "{toml}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// Starts container `id` (`sleep`) through `moat`'s admin API: (status, body).
fn start_container(moat: &Moat, id: &str) -> (u16, String) {
    let body = format!(r#"{{"id":"{id}","entrypoint":["sleep","4401"],"env":{{}},"workdir":"/"}}"#);
    admin(&moat.dir.path().join("data/admin.sock"), "POST", "/v1/containers", Some(&body))
}

#[test]
fn nodes_sharing_a_registry_list_each_others_containers_and_keep_an_id_to_one_node() {
    if !crate::sandbox::sandbox_available() || !rustix::process::geteuid().is_root() {
        return;
    }
    let Some(pg) = shared_pg() else { return };
    let url = pg.fresh_database();
    let (a, b) = (node("node-a", &url), node("node-b", &url));
    let (code, body) = start_container(&a, "c1");
    assert_eq!(code, 201, "{body}");
    // B lists A's container, with its node; A lists it as its own.
    let socket_b = b.dir.path().join("data/admin.sock");
    let (_, list) = admin(&socket_b, "GET", "/v1/containers", None);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let c1 = v["records"].as_array().unwrap().iter().find(|r| r["id"] == "c1").unwrap_or_else(|| panic!("{list}"));
    assert_eq!((c1["node"].as_str(), c1["running"].as_bool()), (Some("node-a"), Some(true)), "{list}");
    // The id is node A's while it runs there.
    let (code, body) = start_container(&b, "c1");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("container c1 is running on node node-a"), "{body}");
    // Once it ended on A, B may run it.
    let (code, _) = admin(&a.dir.path().join("data/admin.sock"), "DELETE", "/v1/containers/c1", Some("{}"));
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = start_container(&b, "c1");
        if code == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "B never got c1: {code} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, list) = admin(&a.dir.path().join("data/admin.sock"), "GET", "/v1/containers", None);
    assert!(list.contains(r#""node":"node-b""#), "{list}");
    let _ = admin(&socket_b, "DELETE", "/v1/containers/c1", Some("{}"));
}

#[test]
fn moat_kv_without_a_running_moat_reads_and_writes_the_shared_namespace() {
    let Some(pg) = shared_pg() else { return };
    let url = pg.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "moat.toml", &format!("[[class]]\npolicy = \"policy.lua\"\n{}", config("cli")));
    write(dir.path(), "policy.lua", "allowedHosts = {}\n");
    let kv = |args: &[&str]| {
        let out = std::process::Command::new(MOAT)
            .arg("kv")
            .args(args)
            .args(["--config", "moat.toml"])
            .current_dir(dir.path())
            .env("MOAT_PG_URL", &url)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = kv(&["put", "KV", "from-cli", "hello"]);
    assert_eq!(code, Some(0), "{err}");
    // A node on the same database reads it through its handler, and its write is the CLI's.
    let a = node("node-a", &url);
    assert_eq!(get(&a, "http://kv.test/from-cli").body, "hello");
    assert_eq!(put(&a, "http://kv.test/from-node", "hi").body, "stored");
    drop(a);
    assert_eq!(kv(&["get", "KV", "from-node"]).1, "hi");
    assert_eq!(kv(&["list", "KV"]).1, "from-cli\nfrom-node\n");
}

/// `moat check` on a node reads the overrides from the `[cluster]` store: an override that
/// another node set, naming a handler this node's policy no longer defines, is found even
/// where moat never ran (no local database at all).
#[test]
fn check_finds_a_stale_override_in_the_cluster_store() {
    let Some(pg) = shared_pg() else { return };
    let url = pg.fresh_database();
    let a = node("node-a", &url);
    let socket = a.dir.path().join("data/admin.sock");
    let (code, body) = admin(&socket, "PUT", "/v1/containers/agent-1/outbound-by-host/a.test", Some(r#""other""#));
    assert_eq!(code, 200, "{body}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("policy.lua"),
        "outboundByHost = { [\"a.test\"] = function() return Response.new(\"x\") end }\n",
    )
    .unwrap();
    std::fs::write(d.join("moat.toml"), format!("data_dir = \"data\"\n{}", config("node-b"))).unwrap();
    let check_with = |url: &str| {
        let out = std::process::Command::new(MOAT)
            .args(["check", "--config", "moat.toml", "--policy", "policy.lua"])
            .env("MOAT_PG_URL", url)
            .current_dir(d)
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let check = || check_with(&url);
    let finding = "container agent-1: its override setOutboundByHost a.test names \"other\", which outboundHandlers does not define (define it, or moat policy agent-1 clearOverrides)";
    let (code, err) = check();
    assert_eq!((code, err.lines().next().unwrap_or_default()), (2, finding), "{err}");
    // explain reads the same store: the override is there, and ignored as naming no handler.
    let explain = |url: &str| {
        let out = std::process::Command::new(MOAT)
            .args(["explain", "--config", "moat.toml", "--policy", "policy.lua", "--id", "agent-1", "GET"])
            .arg("http://a.test/")
            .env("MOAT_PG_URL", url)
            .current_dir(d)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = explain(&url);
    assert!(shown.contains("runtime overrides: {") && shown.contains("\"other\""), "{shown}");
    assert!(shown.contains("note: override names handler \"other\""), "{shown}");
    let unreachable = explain(&format!("postgres://moat:{PG_PASSWORD}@127.0.0.1:1/moat"));
    assert_eq!(
        unreachable.lines().nth(1),
        Some("  container: agent-1 (class policy, no runtime overrides)"),
        "{unreachable}"
    );
    assert!(
        unreachable.lines().nth(2).is_some_and(|l| l.starts_with("  note: the [cluster] store cannot be read")),
        "{unreachable}"
    );
    assert!(!d.join("data/moat.redb").exists(), "check or explain made a local database");
    assert!(!err.contains(PG_PASSWORD), "{err}");
    // Cleared on node A, it is no longer found.
    assert_eq!(admin(&socket, "DELETE", "/v1/containers/agent-1/overrides", None).0, 200);
    let (code, err) = check();
    assert_eq!(code, 0, "{err}");
    // Where the store is out of reach (a CI job), check says so and does not fail.
    let (code, err) = check_with(&format!("postgres://moat:{PG_PASSWORD}@127.0.0.1:1/moat"));
    assert_eq!(code, 0, "{err}");
    assert!(err.starts_with("cluster.store: warning: $MOAT_PG_URL: postgres 127.0.0.1:1/moat is unreachable"), "{err}");
    assert!(err.contains("its overrides were not checked"), "{err}");
    assert!(!err.contains(PG_PASSWORD), "{err}");
}
