---@meta moat.crypto
local crypto = {}
---@param data string
---@return string digest 32 bytes
function crypto.sha256(data) end
---@param key string
---@param data string
---@return string mac 32 bytes
function crypto.hmac_sha256(key, data) end
---@param n integer at most 1 MiB
---@return string
function crypto.randomBytes(n) end
---@return string
function crypto.randomUUID() end
return crypto
