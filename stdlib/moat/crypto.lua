-- moat.crypto: hashing, MACs and randomness (results are binary strings; use moat.hex or
-- moat.base64 to print them).
--   crypto.sha256(data)            -> 32-byte digest
--   crypto.hmac_sha256(key, data)  -> 32-byte MAC
--   crypto.randomBytes(n)          -> n random bytes (n <= 1 MiB)
--   crypto.randomUUID()            -> "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx"
local native = ...
return {
  sha256 = native.sha256,
  hmac_sha256 = native.hmac_sha256,
  randomBytes = native.random_bytes,
  randomUUID = native.random_uuid,
}
