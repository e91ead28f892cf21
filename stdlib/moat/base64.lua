-- moat.base64: standard and URL-safe Base64.
--   base64.encode(bytes) / base64.decode(text)        standard alphabet, padded
--   base64.urlEncode(bytes) / base64.urlDecode(text)  URL-safe alphabet, no padding
-- Both decoders accept text with or without "=" padding.
local native = ...
return {
  encode = native.b64_encode,
  decode = native.b64_decode,
  urlEncode = native.b64url_encode,
  urlDecode = native.b64url_decode,
}
