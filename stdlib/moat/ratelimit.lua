-- moat.ratelimit: fixed-window budgets kept in a KV namespace, so every worker thread (and
-- every restart) counts against the same budget.
--
--   local ratelimit = require("moat.ratelimit")
--   local budget = ratelimit.new{ window = 60, requests = 100, bytesUp = 10 * 1024 * 1024 }
--   -- in a handler:
--   local ok, why, retryAfter = budget:take(env.KV, ctx.containerId .. "|" .. host, bytes)
--   if not ok then return ratelimit.tooMany(why, retryAfter) end
--
-- new(opts): window (seconds, required), requests and/or bytesUp (limits per window; leave
-- one out to not count it), prefix (KV key prefix, default "ratelimit:"), clock (a function
-- returning seconds, default os.time; for tests).
-- budget:take(kv, key, bytes): counts one request of `bytes` bytes (default 0) against
-- `key`'s budget in this window. Returns true, or false with "requests" or "bytes" and the
-- seconds until the window ends; a refused request is not counted.
-- budget:peek(kv, key): the counts so far in this window: requests, bytes.
-- ratelimit.tooMany(why, retryAfter): a 429 with Retry-After.
--
-- Counts are read and written without a lock: two requests that race may both pass at the
-- edge of the budget (it is a budget, not a hard quota).
local M = {}
local Budget = {}
Budget.__index = Budget

local function positive(name, v, optional)
  if v == nil and optional then
    return
  end
  if type(v) ~= "number" or v <= 0 then
    error(("moat.ratelimit.new: %s must be a positive number, got %s"):format(name, tostring(v)), 3)
  end
end

function M.new(opts)
  if type(opts) ~= "table" then
    error("moat.ratelimit.new: pass a table of options", 2)
  end
  positive("window", opts.window)
  positive("requests", opts.requests, true)
  positive("bytesUp", opts.bytesUp, true)
  if opts.requests == nil and opts.bytesUp == nil then
    error("moat.ratelimit.new: set requests, bytesUp or both", 2)
  end
  return setmetatable({
    window = opts.window,
    requests = opts.requests,
    bytesUp = opts.bytesUp,
    prefix = opts.prefix or "ratelimit:",
    clock = opts.clock or os.time,
  }, Budget)
end

-- The KV key of `key`'s count in the current window, and the seconds left in it.
function Budget:slot(key)
  local now = self.clock()
  local index = math.floor(now / self.window)
  local left = math.max(1, math.ceil((index + 1) * self.window - now))
  return self.prefix .. key .. ":" .. index, left
end

function Budget:peek(kv, key)
  local stored = kv:get((self:slot(key)))
  if stored == nil then
    return 0, 0
  end
  local n, b = stored:match("^(%d+) (%d+)$")
  return tonumber(n) or 0, tonumber(b) or 0
end

function Budget:take(kv, key, bytes)
  bytes = bytes or 0
  local slot, left = self:slot(key)
  local n, b = self:peek(kv, key)
  if self.requests and n + 1 > self.requests then
    return false, "requests", left
  end
  if self.bytesUp and b + bytes > self.bytesUp then
    return false, "bytes", left
  end
  -- Kept a little past its window, so a clock step back does not reset a spent budget.
  kv:put(slot, (n + 1) .. " " .. (b + bytes), { expirationTtl = math.max(60, self.window * 2) })
  return true
end

function M.tooMany(why, retryAfter)
  local what = why == "bytes" and "bytes uploaded" or "requests"
  return Response.new(("moat: budget of %s for this window spent; retry in %d s\n"):format(what, retryAfter), {
    status = 429,
    headers = { ["retry-after"] = tostring(retryAfter) },
  })
end

return M
