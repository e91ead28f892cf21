-- A starter moat policy. Edit it, then `moat check` to validate.
-- Every outbound request of a container goes through the decision order:
-- deniedHosts, allowedHosts, outboundByHost, outbound, then enableInternet.

enableInternet = false -- nothing leaves unless something below lets it

-- HTTPS: true lets the handlers below see https:// requests too; clients must then trust
-- moat's CA (`moat ca path`, docs/https.md). false: HTTPS hosts are decided by the lists only.
interceptHttps = false

allowedHosts = { -- a host must be listed here before any handler can run for it
  "hello.moat",
  "example.com",
  "*.example.com",
}

deniedHosts = {
  "169.254.169.254", -- cloud metadata: never
}

outboundByHost = {
  -- Answer a virtual host locally, without any upstream.
  ["hello.moat"] = function(request, env, ctx)
    return Response.new("hello " .. ctx.containerId .. "\n")
  end,
}

-- Catch-all for every allowed host not matched above: add a header and forward.
function outbound(request, env, ctx)
  local r = Request.new(request)
  r.headers:set("x-moat-container", ctx.containerId)
  return fetch(r)
end
