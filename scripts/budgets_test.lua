-- moat test scripts/budgets_test.lua

-- Budgets are per minute of the clock: start where the next few seconds stay in one minute.
local function fresh_window(t)
  local into = os.time() % 60
  if into > 45 then
    t.sleep(61 - into)
  end
end

test("the 61st request in a minute gets 429, other containers are not affected", function(t)
  fresh_window(t)
  t.upstream("api.openai.com", "ok")
  for i = 1, 60 do
    t.eq(t.send { url = "https://api.openai.com/v1/models", container = "busy" }.status, 200, "request " .. i)
  end
  local r = t.send { url = "https://api.openai.com/v1/models", container = "busy" }
  t.eq(r.status, 429)
  t.ok(tonumber(r.headers["retry-after"]) >= 1)
  t.eq(#t.sent, 60)
  t.eq(t.send { url = "https://api.openai.com/v1/models", container = "calm" }.status, 200)
end)

test("bytes up are counted per host, with or without Content-Length", function(t)
  fresh_window(t)
  t.upstream("*", "ok")
  local mib = string.rep("x", 1024 * 1024)
  t.eq(t.send { url = "https://api.anthropic.com/v1/files", body = mib, container = "up" }.status, 200)
  t.eq(t.send { url = "https://api.anthropic.com/v1/files", body = mib, container = "up" }.status, 200)
  local r = t.send { url = "https://api.anthropic.com/v1/files", body = "one more byte", container = "up" }
  t.eq(r.status, 429)
  t.contains(r.body, "bytes uploaded")
  -- Another host has its own budget.
  t.eq(t.send { url = "https://registry.npmjs.org/x", method = "PUT", body = mib, container = "up" }.status, 200)
  -- A chunked upload (no Content-Length) is read and counted, and still arrives whole.
  t.eq(
    t.send {
      url = "https://api.openai.com/v1/files",
      body = "abc",
      headers = { ["transfer-encoding"] = "chunked" },
      container = "up",
    }.status,
    200
  )
  t.eq(t.sent[#t.sent].body, "abc")
end)

test("the counts live in KV, shared by every worker", function(t)
  t.upstream("registry.npmjs.org", "ok")
  t.send { url = "https://registry.npmjs.org/x", container = "c1" }
  local found = t.env.KV:list({ prefix = "budget:c1|registry.npmjs.org:" })
  t.eq(#found.keys, 1)
  t.eq(t.env.KV:get(found.keys[1].name), "1 0")
end)
