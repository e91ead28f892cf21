-- Tests for quickstart.lua: moat test scripts/quickstart_test.lua
secrets = { DEMO_TOKEN = "demo-token-0123456789" }

test("a value put through my.kv is read back with who wrote it", function(t)
  local put = t.send { method = "PUT", url = "http://my.kv/greeting", body = "hello from KV", container = "agent-1" }
  t.eq(put.status, 201)
  t.eq(put.decision, "handler")
  local got = t.send { url = "http://my.kv/greeting", container = "agent-2" }
  t.eq(got.body, "hello from KV\n")
  t.eq(got.headers["x-written-by"], "agent-1")
  t.eq(t.env.KV:get("greeting"), "hello from KV")
end)

test("notes are per container", function(t)
  t.eq(t.send { method = "PUT", url = "http://my.notes/todo", body = "buy milk", container = "a" }.status, 201)
  t.eq(t.send { url = "http://my.notes/todo", container = "a" }.body, "buy milk\n")
  t.eq(t.send { url = "http://my.notes/todo", container = "b" }.status, 404)
end)

test("api.local gets the token, the container never sees it", function(t)
  t.upstream("127.0.0.1", function(req)
    return { status = 200, body = "authorized as " .. req.headers.authorization }
  end)
  local r = t.send { url = "http://api.local/v1/me?x=1", container = "agent-1" }
  t.eq(r.status, 200)
  t.eq(t.sent[1].url, "http://127.0.0.1:8080/v1/me?x=1")
  t.eq(t.sent[1].headers.authorization, "Bearer demo-token-0123456789")
  t.contains(r.body, "[secret DEMO_TOKEN]")
end)

test("anything else is refused: internet is off", function(t)
  local r = t.send { url = "http://example.com/" }
  t.eq(r.status, 520)
  t.eq(r.decision, "deny")
  t.eq(#t.sent, 0)
end)
