---@meta moat.json
local json = {}
---@param value any
---@return string
function json.encode(value) end
---JSON null decodes to json.null.
---@param text string
---@return any
function json.decode(text) end
---The null sentinel.
---@type lightuserdata
json.null = nil
---Marks `t` to encode as an array, even empty.
---@generic T: table
---@param t? T
---@return T
function json.array(t) end
return json
