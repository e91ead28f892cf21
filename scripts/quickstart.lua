-- moat quickstart: runs with no config and no internet.
--
--   cargo run --release -- serve --policy scripts/quickstart.lua
--   curl -x http://agent-1@127.0.0.1:3128 http://hello.moat/world
--
-- Nothing leaves the machine: enableInternet is false, so anything not answered by a handler
-- below gets 520 "Origin is disallowed".
enableInternet = false

local json = require("moat.json")

outboundByHost = {
  -- A virtual host answered entirely by the policy.
  ["hello.moat"] = function(request, env, ctx)
    local url = URL.new(request.url)
    return Response.new(json.encode({
      hello = ctx.containerId,
      path = url.pathname,
      name = url.searchParams:get("name"),
      requestId = ctx.requestId,
    }) .. "\n", { headers = { ["content-type"] = "application/json" } })
  end,
}
