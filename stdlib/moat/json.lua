-- moat.json: JSON encode/decode.
--   json.encode(value) -> string        (tables with only 1..n keys become arrays)
--   json.decode(text)  -> value         (JSON null becomes json.null)
--   json.null                           (the null sentinel, for encode and decode)
--   json.array(t)      -> t             (marks t so that it encodes as an array, even empty)
local native = ...
return {
  encode = native.json_encode,
  decode = native.json_decode,
  null = native.json_null,
  array = function(t)
    return setmetatable(t or {}, native.json_array_mt)
  end,
}
