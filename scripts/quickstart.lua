-- moat quickstart: runs with no config and no internet.
--
--   cargo run --release -- serve --policy scripts/quickstart.lua
--   curl -x http://agent-1:x@127.0.0.1:3128 -X PUT --data 'hello from KV' http://my.kv/greeting
--   curl -x http://agent-1:x@127.0.0.1:3128 http://my.kv/greeting
--
-- Nothing leaves the machine: enableInternet is false, so anything not answered by a handler
-- below gets 520 "Origin is disallowed".
enableInternet = false
redactSecrets = true -- an upstream that echoes a secret back shows [secret NAME] instead

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
      for _, k in ipairs(page.keys) do
        names[#names + 1] = k.name
      end
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
    if value == nil then
      return Response.new("nothing noted\n", { status = 404 })
    end
    return Response.new(value .. "\n")
  end,

  -- Files at http://my.r2/PATH, in env.BUCKET under a folder per container: PUT stores the
  -- request body (streamed to disk), GET streams the object back, DELETE removes it.
  ["my.r2"] = function(request, env, ctx)
    local key = ctx.containerId .. URL.new(request.url).pathname
    if request.method == "PUT" then
      local obj = env.BUCKET:put(key, request.body, {
        httpMetadata = { contentType = request.headers:get("content-type") or "application/octet-stream" },
      })
      return Response.json({ key = obj.key, size = obj.size, etag = obj.etag }, { status = 201 })
    elseif request.method == "DELETE" then
      env.BUCKET:delete(key)
      return Response.new(nil, { status = 204 })
    end
    local obj = env.BUCKET:get(key)
    if obj == nil then
      return Response.new("no such object: " .. key .. "\n", { status = 404 })
    end
    return Response.new(
      obj.body,
      { headers = { ["content-type"] = obj.httpMetadata.contentType, etag = obj.httpEtag } }
    )
  end,

  -- Credential injection: the container calls http://api.local/... with no credentials; moat
  -- adds the token from MOAT_SECRET_DEMO_TOKEN and forwards to a local service (DEMO_UPSTREAM,
  -- a [vars] entry, default 127.0.0.1:8080). The container never sees the token.
  ["api.local"] = function(request, env, ctx)
    -- rawget: env raises for a name nothing declares; these two are optional.
    if rawget(env, "DEMO_TOKEN") == nil then
      return Response.new("start moat with MOAT_SECRET_DEMO_TOKEN=... to try credential injection\n", { status = 503 })
    end
    local url = URL.new(request.url)
    local upstream = "http://" .. (rawget(env, "DEMO_UPSTREAM") or "127.0.0.1:8080") .. url.pathname .. url.search
    local r = Request.new(upstream, request)
    r.headers:set("authorization", "Bearer " .. env.DEMO_TOKEN)
    return fetch(r)
  end,

  -- A virtual host answered by the policy alone.
  ["hello.moat"] = function(request, env, ctx)
    local url = URL.new(request.url)
    return Response.json({ hello = ctx.containerId, path = url.pathname, requestId = ctx.requestId })
  end,
}
