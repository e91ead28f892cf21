-- moat.hex: lower-case hexadecimal.
--   hex.encode(bytes) -> "deadbeef"      hex.decode("DEADbeef") -> bytes
local native = ...
return {
  encode = native.hex_encode,
  decode = native.hex_decode,
}
