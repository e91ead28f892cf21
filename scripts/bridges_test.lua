-- moat test scripts/bridges_test.lua

test("KV: put, get, list and delete in the container's own space", function(t)
  t.eq(t.send { method = "PUT", url = "http://kv.moat/notes/a", body = "alpha", container = "c1" }.status, 204)
  t.eq(t.send { method = "PUT", url = "http://kv.moat/notes/b", body = "beta", container = "c1" }.status, 204)
  t.eq(t.send { url = "http://kv.moat/notes/a", container = "c1" }.body, "alpha")
  t.eq(
    t.send { url = "http://kv.moat/?prefix=notes/", container = "c1" }.body,
    '{"complete":true,"keys":["notes/a","notes/b"]}'
  )
  t.eq(t.env.KV:get("c1/notes/a"), "alpha")
  t.eq(t.send { method = "DELETE", url = "http://kv.moat/notes/a", container = "c1" }.status, 204)
  t.eq(t.send { url = "http://kv.moat/notes/a", container = "c1" }.status, 404)
end)

test("KV: another container sees nothing, even with ../ in the path", function(t)
  t.env.KV:put("c1/secret-plan", "x")
  t.eq(t.send { url = "http://kv.moat/secret-plan", container = "c2" }.status, 404)
  t.eq(t.send { url = "http://kv.moat/../c1/secret-plan", container = "c2" }.status, 404)
  t.eq(t.send { url = "http://kv.moat/", container = "c2" }.body, '{"complete":true,"keys":[]}')
end)

test("bucket: objects round-trip with their type, per container", function(t)
  local put = t.send {
    method = "PUT",
    url = "http://r2.moat/out/report.txt",
    body = "results",
    headers = { ["content-type"] = "text/plain" },
    container = "c1",
  }
  t.eq(put.status, 201)
  local got = t.send { url = "http://r2.moat/out/report.txt", container = "c1" }
  t.eq(got.body, "results")
  t.eq(got.headers["content-type"], "text/plain")
  t.eq(t.env.BUCKET:get("c1/out/report.txt"):text(), "results")
  t.eq(t.send { url = "http://r2.moat/out/report.txt", container = "c2" }.status, 404)
  t.eq(
    t.send { url = "http://r2.moat/?prefix=out/", container = "c1" }.body,
    '{"complete":true,"keys":["out/report.txt"]}'
  )
end)

test("nothing else is reachable", function(t)
  t.eq(t.send { url = "http://example.com/" }.status, 520)
  t.eq(#t.sent, 0)
end)
