-- An audit log of every request the policy lets out, kept in a bucket as JSON lines.
--
-- What: `outbound` forwards every allowed request and then writes one JSON line about it
-- to env.BUCKET under audit/<date>/<containerId>/<time>-<requestId>.jsonl: time, container,
-- request id, method, scheme, host, path (never the query, which may carry tokens), status,
-- bytes up (Content-Length) and whether fetch failed. Denied requests never reach a handler;
-- the access log has them.
-- Read a day back: moat blob list BUCKET --prefix audit/2026-12-06/ (then moat blob get ...),
-- or from a handler with env.BUCKET:list{ prefix = "audit/2026-12-06/" }.
-- Use: moat init --recipe audit-log && moat test && moat serve
local json = require("moat.json")

interceptHttps = true

allowedHosts = { "api.github.com", "registry.npmjs.org", "pypi.org", "files.pythonhosted.org" }

local function record(env, ctx, request, status, failure)
  local url = URL.new(request.url)
  local now = os.time()
  local line = json.encode({
    time = os.date("!%Y-%m-%dT%H:%M:%SZ", now),
    container = ctx.containerId,
    requestId = ctx.requestId,
    method = request.method,
    scheme = url.protocol:sub(1, -2),
    host = url.hostname,
    path = url.pathname,
    status = status,
    bytesUp = tonumber(request.headers:get("content-length") or "0") or 0,
    failure = failure,
  })
  local key = ("audit/%s/%s/%s-%s.jsonl"):format(
    os.date("!%Y-%m-%d", now),
    ctx.containerId,
    os.date("!%H%M%S", now),
    ctx.requestId
  )
  env.BUCKET:put(key, line .. "\n", { httpMetadata = { contentType = "application/x-ndjson" } })
end

function outbound(request, env, ctx)
  local ok, response = pcall(fetch, request)
  if not ok then
    record(env, ctx, request, 502, tostring(response))
    error(response, 0)
  end
  record(env, ctx, request, response.status, nil)
  return response
end
