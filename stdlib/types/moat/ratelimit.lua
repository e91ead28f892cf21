---@meta moat.ratelimit
local ratelimit = {}
---@class Budget
local Budget = {}
---Counts one request of `bytes` bytes against `key`; false, "requests"|"bytes", seconds left when spent.
---@param kv KVNamespace
---@param key string
---@param bytes? integer
---@return boolean ok
---@return "requests"|"bytes"|nil why
---@return integer? retryAfter
function Budget:take(kv, key, bytes) end
---@param kv KVNamespace
---@param key string
---@return integer requests
---@return integer bytes
function Budget:peek(kv, key) end
---@param opts { window: number, requests?: integer, bytesUp?: integer, prefix?: string, clock?: fun(): number }
---@return Budget
function ratelimit.new(opts) end
---A 429 with Retry-After.
---@param why "requests"|"bytes"
---@param retryAfter integer
---@return Response
function ratelimit.tooMany(why, retryAfter) end
return ratelimit
