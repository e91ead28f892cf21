-- moat quickstart: runs with no config and no internet.
--
--   cargo run --release -- serve --policy scripts/quickstart.lua
--   curl -x http://agent-1@127.0.0.1:3128 -X PUT --data 'hello from KV' http://my.kv/greeting
--   curl -x http://agent-1@127.0.0.1:3128 http://my.kv/greeting
--
-- Nothing leaves the machine: enableInternet is false, so anything not answered by a handler
-- below gets 520 "Origin is disallowed".
enableInternet = false

local json = require("moat.json")

outboundByHost = {
  -- A key-value store the container reaches at http://my.kv/KEY, answered from env.KV
  -- (a redb database under .moat/). GET reads, PUT writes, DELETE removes, GET / lists.
  ["my.kv"] = function(request, env, ctx)
    local url = URL.new(request.url)
    local key = url.pathname:sub(2)
    if key == "" then
      local page = env.KV:list({ prefix = url.searchParams:get("prefix") or "" })
      local names = json.array()
      for _, k in ipairs(page.keys) do names[#names + 1] = k.name end
      return Response.json({ keys = names, complete = page.list_complete })
    end
    if request.method == "PUT" then
      env.KV:put(key, request:text(), { metadata = { by = ctx.containerId } })
      return Response.new("stored " .. key .. "\n", { status = 201 })
    elseif request.method == "DELETE" then
      env.KV:delete(key)
      return Response.new(nil, { status = 204 })
    end
    local value, meta = env.KV:getWithMetadata(key)
    if value == nil then
      return Response.new("no such key: " .. key .. "\n", { status = 404 })
    end
    return Response.new(value .. "\n", { headers = { ["x-written-by"] = meta and meta.by or "?" } })
  end,

  -- Per-container notes: the same API on ctx.storage, which no other container can read.
  ["my.notes"] = function(request, env, ctx)
    local key = URL.new(request.url).pathname:sub(2)
    if request.method == "PUT" then
      ctx.storage:put(key, request:text())
      return Response.new("noted for " .. ctx.containerId .. "\n", { status = 201 })
    end
    local value = ctx.storage:get(key)
    if value == nil then return Response.new("nothing noted\n", { status = 404 }) end
    return Response.new(value .. "\n")
  end,

  -- A virtual host answered by the policy alone.
  ["hello.moat"] = function(request, env, ctx)
    local url = URL.new(request.url)
    return Response.json({ hello = ctx.containerId, path = url.pathname, requestId = ctx.requestId })
  end,
}
