-- moat test scripts/audit-log_test.lua
local json = require("moat.json")

local function lines(t)
  local out = {}
  local page = t.env.BUCKET:list({ prefix = "audit/" })
  for _, o in ipairs(page.objects) do
    out[#out + 1] = json.decode(t.env.BUCKET:get(o.key):text())
  end
  return out, page.objects
end

test("each forwarded request leaves one JSON line, without its query", function(t)
  t.upstream("api.github.com", { status = 404, body = "nope" })
  t.eq(t.send { url = "https://api.github.com/repos/x/y?access_token=abc", container = "agent-1" }.status, 404)
  local got, objects = lines(t)
  t.eq(#got, 1)
  t.eq(got[1].container, "agent-1")
  t.eq(got[1].method, "GET")
  t.eq(got[1].scheme, "https")
  t.eq(got[1].host, "api.github.com")
  t.eq(got[1].path, "/repos/x/y")
  t.eq(got[1].status, 404)
  t.ok(got[1].time:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$"), got[1].time)
  t.ok(objects[1].key:match("^audit/%d%d%d%d%-%d%d%-%d%d/agent%-1/%d+%-%x+%.jsonl$"), objects[1].key)
  t.ok(not t.env.BUCKET:get(objects[1].key):text():find("access_token"))
end)

test("uploads record their size; denied requests are not the handler's", function(t)
  t.upstream("registry.npmjs.org", "{}")
  t.send { method = "PUT", url = "https://registry.npmjs.org/pkg", body = "12345", container = "a" }
  t.send { url = "https://evil.example/", container = "a" }
  local got = lines(t)
  t.eq(#got, 1)
  t.eq(got[1].bytesUp, 5)
end)
