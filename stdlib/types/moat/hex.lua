---@meta moat.hex
local hex = {}
---@param bytes string
---@return string
function hex.encode(bytes) end
---@param text string
---@return string
function hex.decode(text) end
return hex
