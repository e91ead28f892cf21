---@meta moat.base64
local base64 = {}
---@param bytes string
---@return string
function base64.encode(bytes) end
---@param text string
---@return string
function base64.decode(text) end
---URL-safe alphabet, no padding.
---@param bytes string
---@return string
function base64.urlEncode(bytes) end
---@param text string
---@return string
function base64.urlDecode(text) end
return base64
