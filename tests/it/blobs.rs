//! Blob buckets (SPEC 6): the R2-shaped API through a handler, streaming both ways, atomic
//! overwrite, key validation, bounded memory for large objects.

use std::process::Command;

use crate::harness::*;

const POLICY: &str = r#"
local json = require("moat.json")
outboundByHost = {
  -- http://my.r2/KEY: each container sees its own folder of the bucket.
  ["my.r2"] = function(request, env, ctx)
    local u = URL.new(request.url)
    local key = ctx.containerId .. "/" .. u.pathname:sub(2)
    local op = u.searchParams:get("op")
    if request.method == "PUT" then
      local obj = env.BUCKET:put(key, request.body, {
        httpMetadata = { contentType = request.headers:get("content-type") },
        customMetadata = { by = ctx.containerId },
      })
      return Response.json({ key = obj.key, size = obj.size, etag = obj.etag })
    elseif request.method == "DELETE" then
      env.BUCKET:delete(key)
      return Response.new(nil, { status = 204 })
    elseif op == "list" then
      local prefix = ctx.containerId .. "/" .. (u.searchParams:get("prefix") or "")
      local out, cursor = { objects = {}, prefixes = {} }, nil
      repeat
        local page = env.BUCKET:list({ prefix = prefix, delimiter = u.searchParams:get("delimiter"), limit = 2, cursor = cursor })
        for _, o in ipairs(page.objects) do out.objects[#out.objects + 1] = o.key end
        for _, p in ipairs(page.delimitedPrefixes) do out.prefixes[#out.prefixes + 1] = p end
        cursor = page.cursor
      until not page.truncated
      return Response.new(table.concat(out.objects, ",") .. "|" .. table.concat(out.prefixes, ","))
    elseif op == "head" then
      local h = env.BUCKET:head(key)
      if h == nil then return Response.new("none", { status = 404 }) end
      return Response.new(h.size .. " " .. h.httpMetadata.contentType .. " " .. h.customMetadata.by .. " " .. tostring(h.uploaded > 0))
    elseif op == "bad" then
      local results = {}
      for _, k in ipairs({ "../escape", "/abs", "a/../b", "nul\0byte", "" }) do
        local ok, err = pcall(function() env.BUCKET:put(k, "x") end)
        results[#results + 1] = ok and "accepted" or "refused"
      end
      return Response.new(table.concat(results, ","))
    elseif op == "size" then
      -- Looks at the object without reading its body.
      return Response.new(tostring(env.BUCKET:get(key).size))
    elseif op == "text" then
      local obj = env.BUCKET:get(key)
      return Response.new(obj:text())
    end
    local range = nil
    local off, len = u.searchParams:get("offset"), u.searchParams:get("length")
    if off then range = { offset = tonumber(off), length = len and tonumber(len) } end
    local obj = env.BUCKET:get(key, { range = range })
    if obj == nil then return Response.new("no such object", { status = 404 }) end
    return Response.new(obj.body, { headers = { ["etag"] = obj.httpEtag, ["content-type"] = obj.httpMetadata.contentType or "application/octet-stream" } })
  end,
}
"#;

fn r2(moat: &Moat, id: &str, path: &str, extra: &[&str]) -> CurlOut {
    let mut args = vec!["-U", id];
    args.extend_from_slice(extra);
    curl(moat, &format!("http://my.r2/{path}"), &args)
}

#[test]
fn bucket_calls_and_edge_cases() {
    let moat = Moat::start(POLICY);
    let put = r2(
        &moat,
        "a1:",
        "docs/readme.txt",
        &["-X", "PUT", "-H", "content-type: text/plain", "--data-binary", "hello blob"],
    );
    assert_eq!(put.status, 200, "{}", put.body);
    let v: serde_json::Value = serde_json::from_str(&put.body).unwrap();
    assert_eq!((v["key"].as_str(), v["size"].as_u64()), (Some("a1/docs/readme.txt"), Some(10)));
    let got = r2(&moat, "a1:", "docs/readme.txt", &[]);
    assert_eq!(
        (got.status, got.body.as_str(), got.headers["content-type"].as_str()),
        (200, "hello blob", "text/plain")
    );
    assert_eq!(got.headers["etag"], format!("\"{}\"", v["etag"].as_str().unwrap()));
    assert_eq!(r2(&moat, "a1:", "docs/readme.txt?op=text", &[]).body, "hello blob");
    assert_eq!(r2(&moat, "a1:", "docs/readme.txt?op=head", &[]).body, "10 text/plain a1 true");
    // Range reads.
    assert_eq!(r2(&moat, "a1:", "docs/readme.txt?offset=6", &[]).body, "blob");
    assert_eq!(r2(&moat, "a1:", "docs/readme.txt?offset=2&length=3", &[]).body, "llo");
    let negative = r2(&moat, "a1:", "docs/readme.txt?offset=-1", &[]);
    assert_eq!(negative.status, 500);
    assert!(moat.wait_log("range.offset must be a whole number").contains("range.offset must be a whole number ≥ 0"));
    // Another container has its own folder.
    assert_eq!(r2(&moat, "b2:", "docs/readme.txt", &[]).status, 404);
    // Listing: prefix, delimiter, cursor pagination (pages of 2).
    for k in ["docs/a", "docs/b", "img/x.png", "img/y.png", "top"] {
        r2(&moat, "a1:", k, &["-X", "PUT", "--data-binary", k]);
    }
    assert_eq!(r2(&moat, "a1:", "?op=list&prefix=docs/", &[]).body, "a1/docs/a,a1/docs/b,a1/docs/readme.txt|");
    assert_eq!(r2(&moat, "a1:", "?op=list&delimiter=/", &[]).body, "a1/top|a1/docs/,a1/img/");
    // Overwrite, delete, missing.
    r2(&moat, "a1:", "top", &["-X", "PUT", "--data-binary", "v2"]);
    assert_eq!(r2(&moat, "a1:", "top", &[]).body, "v2");
    assert_eq!(r2(&moat, "a1:", "top", &["-X", "DELETE"]).status, 204);
    assert_eq!(r2(&moat, "a1:", "top", &[]).status, 404);
    assert_eq!(r2(&moat, "a1:", "?op=bad", &[]).body, "refused,refused,refused,refused,refused");
    // Data files stay inside the bucket folder, none named after a key.
    let files: Vec<_> =
        std::fs::read_dir(moat.dir.path().join("data/blobs/BUCKET")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 5, "one file per live object (top was deleted): {files:?}");
    assert!(files.iter().all(|f| f.to_string_lossy().ends_with(".obj")), "{files:?}");
}

#[test]
fn an_object_body_left_unread_does_not_keep_its_file_open() {
    let moat = Moat::start(POLICY);
    r2(&moat, "a1:", "kept", &["-X", "PUT", "--data-binary", "some bytes"]);
    for _ in 0..20 {
        assert_eq!(r2(&moat, "a1:", "kept?op=size", &[]).body, "10");
    }
    let bucket = moat.dir.path().join("data/blobs/BUCKET");
    let open: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", moat.pid()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .filter(|target| target.starts_with(&bucket))
        .collect();
    assert!(open.is_empty(), "moat still holds {} object files open, e.g. {:?}", open.len(), open.first());
}

#[test]
fn overwrite_is_atomic_under_a_concurrent_reader() {
    let moat = Moat::start(POLICY);
    let proxy = moat.proxy_url();
    let size = 256 * 1024;
    let files: Vec<String> = ["a", "b"]
        .iter()
        .map(|c| {
            let p = moat.dir.path().join(format!("{c}.bin"));
            std::fs::write(&p, c.repeat(size)).unwrap();
            format!("@{}", p.display())
        })
        .collect();
    r2(&moat, "c:", "obj", &["-X", "PUT", "--data-binary", &files[0]]);
    let writer = {
        let proxy = proxy.clone();
        let files = files.clone();
        std::thread::spawn(move || {
            for i in 0..30 {
                let body = &files[(i + 1) % 2];
                let r = curl_via(&proxy, "http://my.r2/obj", &["-U", "c:", "-X", "PUT", "--data-binary", body]);
                assert_eq!(r.status, 200);
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let r = curl_via(&proxy, "http://my.r2/obj", &["-U", "c:"]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), size, "a torn read");
        let first = r.body.as_bytes()[0];
        assert!(r.body.bytes().all(|b| b == first), "a read mixed two versions");
        reads += 1;
    }
    writer.join().unwrap();
    assert!(reads > 0);
}

#[test]
fn an_upload_the_client_cuts_off_is_not_stored() {
    use std::io::{Read, Write};
    let moat = Moat::start(POLICY);
    assert_eq!(r2(&moat, "c:", "obj", &["-X", "PUT", "--data-binary", "whole"]).status, 200);
    // A streamed put whose client stops 90 bytes short of its Content-Length.
    let mut s = std::net::TcpStream::connect(moat.addr).unwrap();
    s.write_all(
        b"PUT http://my.r2/obj HTTP/1.1\r\nProxy-Authorization: Basic Yzo=\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(r2(&moat, "c:", "obj", &[]).body, "whole", "the old object stays");
}

#[test]
fn a_100_mib_blob_streams_without_buffering() {
    // A generous wall clock: this moves 200 MiB through a handler on a shared 2-core machine.
    // lua_cpu counts the wall clock of the handler's polls, which carry the bytes; under load the
    // machine's other work lands in them.
    let moat = Moat::policy(POLICY).limit("handler_timeout", "300s").limit("lua_cpu", "60s").start();
    let file = moat.dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        for _ in 0..100 {
            f.write_all(&chunk).unwrap();
        }
    }
    // Warm up (Lua states, pools) so the measurement sees only the transfer.
    r2(&moat, "big:", "warm", &["-X", "PUT", "--data-binary", "x"]);
    let before = memory_kib(moat.pid(), "VmHWM");
    let up = Command::new("curl")
        .args(["-sS", "--noproxy", "", "-x", &moat.proxy_url(), "-U", "big:", "-X", "PUT", "-T"])
        .arg(&file)
        .arg("http://my.r2/huge")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&up.stdout).contains("\"size\":104857600"),
        "{}",
        String::from_utf8_lossy(&up.stdout)
    );
    let out = moat.dir.path().join("back.bin");
    let down = Command::new("curl")
        .args(["-sS", "--noproxy", "", "-x", &moat.proxy_url(), "-U", "big:", "-o"])
        .arg(&out)
        .arg("http://my.r2/huge")
        .status()
        .unwrap();
    assert!(down.success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&file).unwrap());
    let grown = memory_kib(moat.pid(), "VmHWM").saturating_sub(before);
    eprintln!("peak RSS grew by {grown} KiB for a 100 MiB upload and download");
    assert!(grown < 32 * 1024, "peak RSS grew by {grown} KiB");
}

#[test]
fn blob_cli_works_with_and_without_a_running_moat() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "policy.lua", POLICY);
    write(dir.path(), "in.txt", "from a file");
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    assert_eq!(moat_cmd(&["blob", "--data-dir", d, "put", "BUCKET", "cli/one.txt", "in.txt"], dir.path()).0, 0);
    let (code, out, _) = moat_cmd(&["blob", "--data-dir", d, "get", "BUCKET", "cli/one.txt"], dir.path());
    assert_eq!((code, out.as_str()), (0, "from a file"));
    let moat = Moat::serve_folder(dir.path());
    // The policy reads what the CLI wrote (container "cli" sees the cli/ folder).
    assert_eq!(r2(&moat, "cli:", "one.txt", &[]).body, "from a file");
    // With moat running, the CLI goes through it.
    write(dir.path(), "two.txt", "second");
    assert_eq!(moat_cmd(&["blob", "--data-dir", d, "put", "BUCKET", "cli/two.txt", "two.txt"], dir.path()).0, 0);
    assert_eq!(r2(&moat, "cli:", "two.txt", &[]).body, "second");
    r2(&moat, "cli:", "three.txt", &["-X", "PUT", "--data-binary", "from lua"]);
    let (_, out, _) = moat_cmd(&["blob", "--data-dir", d, "get", "BUCKET", "cli/three.txt"], dir.path());
    assert_eq!(out, "from lua");
    let (_, out, _) = moat_cmd(&["blob", "--data-dir", d, "list", "BUCKET", "cli/"], dir.path());
    assert_eq!(out, "cli/one.txt\ncli/three.txt\ncli/two.txt\n");
    assert_eq!(moat_cmd(&["blob", "--data-dir", d, "delete", "BUCKET", "cli/one.txt"], dir.path()).0, 0);
    assert_eq!(r2(&moat, "cli:", "one.txt", &[]).status, 404);
    let (code, _, _) = moat_cmd(&["blob", "--data-dir", d, "put", "BUCKET", "../evil", "two.txt"], dir.path());
    assert_eq!(code, 2);
}
