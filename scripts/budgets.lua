-- Per-container budgets: how many requests, and how many bytes up, each container may send to
-- each host per minute. Over budget: 429 with Retry-After, and nothing is sent.
--
-- What: every allowed request passes through `outbound`, which counts it in env.KV (shared by
-- every worker, kept across restarts) under container|host for the current minute. Uploads
-- count their Content-Length; a body sent without one is read to be counted (up to
-- limits.body_buffer). Edit LIMITS per host; hosts without an entry get DEFAULT.
--
-- Use: moat init --recipe budgets && moat test && moat serve
local ratelimit = require("moat.ratelimit")

interceptHttps = true

allowedHosts = { "api.openai.com", "api.anthropic.com", "registry.npmjs.org" }

local DEFAULT = { requests = 120, bytesUp = 8 * 1024 * 1024 }
local LIMITS = {
  ["api.openai.com"] = { requests = 60, bytesUp = 2 * 1024 * 1024 },
  ["api.anthropic.com"] = { requests = 60, bytesUp = 2 * 1024 * 1024 },
}

local budgets = {}
local function budget_for(host)
  local b = budgets[host]
  if b == nil then
    local l = LIMITS[host] or DEFAULT
    b = ratelimit.new({ window = 60, requests = l.requests, bytesUp = l.bytesUp, prefix = "budget:" })
    budgets[host] = b
  end
  return b
end

function outbound(request, env, ctx)
  local host = URL.new(request.url).hostname
  local size = tonumber(request.headers:get("content-length") or "")
  if size == nil and request.method ~= "GET" and request.method ~= "HEAD" then
    local body = request:bytes()
    size = #body
    request = Request.new(request.url, { method = request.method, headers = request.headers, body = body })
  end
  local ok, why, retry = budget_for(host):take(env.KV, ctx.containerId .. "|" .. host, size or 0)
  if not ok then
    console.warn(ctx.containerId .. " is over its " .. why .. " budget for " .. host)
    return ratelimit.tooMany(why, retry)
  end
  return fetch(request)
end
