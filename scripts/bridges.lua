-- KV and bucket bridges: the container reaches moat's KV namespace and bucket over plain
-- HTTP, each container in its own space, so agents can keep state without any credential.
--
-- What: http://kv.moat/KEY and http://r2.moat/KEY (virtual hosts: nothing is dialled).
--   GET reads, PUT writes (the request body), DELETE removes, GET / lists (?prefix=).
--   Every key is stored under "<containerId>/": a container never sees another's keys,
--   whatever path it sends. Objects stream both ways; KV values are up to 25 MiB.
-- Use: moat init --recipe bridges && moat test && moat serve
--   in the container: curl -x http://agent-1:x@127.0.0.1:3128 -X PUT --data v http://kv.moat/k
local json = require("moat.json")

enableInternet = false

-- The container's key for `request`: its own prefix, then the path (without the first /).
local function scoped(request, ctx)
  local url = URL.new(request.url)
  return ctx.containerId .. "/", url.pathname:sub(2), url
end

local function listing(names, complete)
  return Response.json({ keys = names, complete = complete })
end

outboundByHost = {
  ["kv.moat"] = function(request, env, ctx)
    local prefix, key, url = scoped(request, ctx)
    if key == "" then
      local page = env.KV:list({ prefix = prefix .. (url.searchParams:get("prefix") or "") })
      local names = json.array()
      for _, k in ipairs(page.keys) do
        names[#names + 1] = k.name:sub(#prefix + 1)
      end
      return listing(names, page.list_complete)
    end
    if request.method == "PUT" then
      env.KV:put(prefix .. key, request:text())
      return Response.new(nil, { status = 204 })
    elseif request.method == "DELETE" then
      env.KV:delete(prefix .. key)
      return Response.new(nil, { status = 204 })
    end
    local value = env.KV:get(prefix .. key)
    if value == nil then
      return Response.new("no such key\n", { status = 404 })
    end
    return Response.new(value)
  end,

  ["r2.moat"] = function(request, env, ctx)
    local prefix, key, url = scoped(request, ctx)
    if key == "" then
      local page = env.BUCKET:list({ prefix = prefix .. (url.searchParams:get("prefix") or "") })
      local names = json.array()
      for _, o in ipairs(page.objects) do
        names[#names + 1] = o.key:sub(#prefix + 1)
      end
      return listing(names, not page.truncated)
    end
    if request.method == "PUT" then
      local obj = env.BUCKET:put(prefix .. key, request.body, {
        httpMetadata = { contentType = request.headers:get("content-type") or "application/octet-stream" },
      })
      return Response.json({ size = obj.size, etag = obj.etag }, { status = 201 })
    elseif request.method == "DELETE" then
      env.BUCKET:delete(prefix .. key)
      return Response.new(nil, { status = 204 })
    end
    local obj = env.BUCKET:get(prefix .. key)
    if obj == nil then
      return Response.new("no such object\n", { status = 404 })
    end
    return Response.new(
      obj.body,
      { headers = { ["content-type"] = obj.httpMetadata.contentType, etag = obj.httpEtag } }
    )
  end,
}
