-- moat.auth: credential recipes for handlers. Each takes the request to send and returns it
-- (sigv4 may return a new Request), so a handler reads:
--     return fetch(auth.bearer(request, env.GITHUB_TOKEN))
--
--   auth.bearer(request, token)              Authorization: Bearer <token>
--   auth.basic(request, user, password)      Authorization: Basic base64(user:password)
--   auth.header(request, name, value)        any header (x-api-key, PRIVATE-TOKEN, ...)
--   auth.swap(request, placeholder, secret)  replaces `placeholder` in every header value
--                                            (the container holds a fake key, moat the real one);
--                                            returns the request and how many values changed
--   auth.sigv4(request, opts)                AWS Signature Version 4 (header form). opts:
--       accessKeyId, secretAccessKey, region, service (required), sessionToken,
--       unsignedPayload (S3: sign "UNSIGNED-PAYLOAD" instead of reading the body; an
--         aws-chunked upload with STREAMING-UNSIGNED-PAYLOAD-TRAILER keeps its own),
--       datetime ("YYYYMMDDTHHMMSSZ", default now; for tests)
--     A presigned URL's X-Amz-* signature parameters are dropped and the request is signed in
--     header form. Chunk-signed bodies (STREAMING-AWS4-HMAC-SHA256-PAYLOAD) are refused.
local crypto = require("moat.crypto")
local hex = require("moat.hex")
local base64 = require("moat.base64")

local M = {}

local function need_string(fn, what, v)
  if type(v) ~= "string" or v == "" then
    error(("moat.auth.%s: %s must be a non-empty string, got %s"):format(fn, what, type(v)), 3)
  end
end

function M.bearer(request, token)
  need_string("bearer", "token", token)
  request.headers:set("authorization", "Bearer " .. token)
  return request
end

function M.basic(request, user, password)
  need_string("basic", "user", user)
  if type(password) ~= "string" then
    error("moat.auth.basic: password must be a string, got " .. type(password), 2)
  end
  request.headers:set("authorization", "Basic " .. base64.encode(user .. ":" .. password))
  return request
end

function M.header(request, name, value)
  need_string("header", "name", name)
  need_string("header", "value", value)
  request.headers:set(name, value)
  return request
end

-- `s` with every occurrence of `old` replaced by `new`, literally (no Lua patterns).
local function replace_plain(s, old, new)
  local out, from, n = {}, 1, 0
  while true do
    local i, j = s:find(old, from, true)
    if not i then
      break
    end
    out[#out + 1] = s:sub(from, i - 1)
    out[#out + 1] = new
    from, n = j + 1, n + 1
  end
  out[#out + 1] = s:sub(from)
  return table.concat(out), n
end

function M.swap(request, placeholder, secret)
  need_string("swap", "placeholder", placeholder)
  need_string("swap", "secret", secret)
  local h, changed = request.headers, 0
  local names = {}
  for name, value in h:entries() do
    if value:find(placeholder, 1, true) then
      names[#names + 1] = name
    end
  end
  for _, name in ipairs(names) do
    local values = h:getAll(name)
    h:delete(name)
    for _, v in ipairs(values) do
      local swapped, n = replace_plain(v, placeholder, secret)
      changed = changed + (n > 0 and 1 or 0)
      h:append(name, swapped)
    end
  end
  return request, changed
end

-- SigV4 -------------------------------------------------------------------------------

local EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

-- Headers never signed: moat or the network may change them on the way (the list the AWS
-- SDKs use, plus content-length, which moat recomputes from the body).
local UNSIGNED = {
  ["authorization"] = true,
  ["connection"] = true,
  ["content-length"] = true,
  ["expect"] = true,
  ["from"] = true,
  ["keep-alive"] = true,
  ["max-forwards"] = true,
  ["pragma"] = true,
  ["proxy-authorization"] = true,
  ["referer"] = true,
  ["te"] = true,
  ["trailer"] = true,
  ["transfer-encoding"] = true,
  ["upgrade"] = true,
  ["user-agent"] = true,
  ["x-amzn-trace-id"] = true,
  ["host"] = true,
}

-- RFC 3986 unreserved characters stay, everything else is %XX (upper case), as AWS wants.
local function aws_encode(s, keep_slash)
  local set = keep_slash and "[^A-Za-z0-9%-%._~/]" or "[^A-Za-z0-9%-%._~]"
  return (s:gsub(set, function(c)
    return ("%%%02X"):format(c:byte())
  end))
end

local function percent_decode(s)
  return (s:gsub("%%(%x%x)", function(h)
    return string.char(tonumber(h, 16))
  end))
end

local function canonical_uri(pathname, service)
  if pathname == "" then
    return "/"
  end
  if service == "s3" then
    -- S3 encodes each segment once, from its decoded form.
    local segments = {}
    for segment in (pathname .. "/"):gmatch("([^/]*)/") do
      segments[#segments + 1] = aws_encode(percent_decode(segment), false)
    end
    return table.concat(segments, "/")
  end
  -- Every other service encodes the path as sent once more.
  return aws_encode(pathname, true)
end

local function canonical_query(search)
  local query = search:gsub("^%?", "")
  local params = {}
  for part in query:gmatch("[^&]+") do
    local k, v = part:match("^([^=]*)=?(.*)$")
    params[#params + 1] = { aws_encode(percent_decode(k), false), aws_encode(percent_decode(v), false) }
  end
  table.sort(params, function(a, b)
    if a[1] == b[1] then
      return a[2] < b[2]
    end
    return a[1] < b[1]
  end)
  local out = {}
  for i, p in ipairs(params) do
    out[i] = p[1] .. "=" .. p[2]
  end
  return table.concat(out, "&")
end

local function hmac(key, data)
  return crypto.hmac_sha256(key, data)
end

-- The query parameters of a presigned URL's signature.
local PRESIGN_PARAMS = {
  "X-Amz-Algorithm",
  "X-Amz-Credential",
  "X-Amz-Date",
  "X-Amz-Expires",
  "X-Amz-SignedHeaders",
  "X-Amz-Signature",
  "X-Amz-Security-Token",
}

function M.sigv4(request, opts)
  if type(opts) ~= "table" then
    error("moat.auth.sigv4: second argument must be a table of options", 2)
  end
  for _, k in ipairs({ "accessKeyId", "secretAccessKey", "region", "service" }) do
    need_string("sigv4", "opts." .. k, opts[k])
  end
  local amz_date = opts.datetime or os.date("!%Y%m%dT%H%M%SZ")
  if not tostring(amz_date):match("^%d%d%d%d%d%d%d%dT%d%d%d%d%d%dZ$") then
    error("moat.auth.sigv4: opts.datetime must look like 20150830T123600Z", 2)
  end
  local service, method = opts.service, request.method

  -- A presigned URL carries the container's signature in its query: drop it and sign the
  -- request in header form with the real key instead (S3 refuses a request with both).
  local url0 = URL.new(request.url)
  if url0.searchParams:has("X-Amz-Signature") then
    for _, p in ipairs(PRESIGN_PARAMS) do
      url0.searchParams:delete(p)
    end
    request = Request.new(url0.href, request)
  end

  -- The payload hash: what the client declared, UNSIGNED-PAYLOAD, or the body's hash.
  local declared = request.headers:get("x-amz-content-sha256")
  local encoding = (request.headers:get("content-encoding") or ""):lower()
  local payload_hash, signed = nil, request
  if declared == "STREAMING-UNSIGNED-PAYLOAD-TRAILER" then
    -- Current SDKs' uploads: an aws-chunked body with a checksum trailer, none of it signed.
    -- The body and its framing headers go on as they are; only the seed signature changes.
    -- (Claiming UNSIGNED-PAYLOAD instead would make S3 store the chunk framing as data.)
    payload_hash = declared
  elseif declared and declared:match("^STREAMING%-") then
    error(
      "moat.auth.sigv4: the client signs its body chunk by chunk ("
        .. declared
        .. "), which moat "
        .. "cannot re-sign; use HTTPS (SDKs then send STREAMING-UNSIGNED-PAYLOAD-TRAILER) or turn off "
        .. "payload signing in the client",
      2
    )
  elseif encoding:find("aws-chunked", 1, true) then
    error(
      "moat.auth.sigv4: an aws-chunked body must declare x-amz-content-sha256: "
        .. "STREAMING-UNSIGNED-PAYLOAD-TRAILER (got "
        .. tostring(declared)
        .. "); refusing to send a body "
        .. "whose framing its headers do not describe",
      2
    )
  elseif opts.unsignedPayload then
    payload_hash = "UNSIGNED-PAYLOAD"
  elseif declared and ((#declared == 64 and declared:match("^%x+$")) or declared == "UNSIGNED-PAYLOAD") then
    -- The service checks the body against it, so a wrong value only fails the request.
    payload_hash = declared
  elseif method == "GET" or method == "HEAD" then
    payload_hash = EMPTY_SHA256
  else
    local body = request:bytes()
    payload_hash = hex.encode(crypto.sha256(body))
    -- The read used the request's body: send a copy that carries the bytes.
    signed =
      Request.new(request.url, { method = method, headers = request.headers, body = body, redirect = request.redirect })
  end

  local h = signed.headers
  h:delete("authorization")
  h:set("x-amz-date", amz_date)
  if opts.sessionToken then
    h:set("x-amz-security-token", opts.sessionToken)
  else
    h:delete("x-amz-security-token")
  end
  if service == "s3" or opts.unsignedPayload or declared then
    h:set("x-amz-content-sha256", payload_hash)
  end

  local url = URL.new(signed.url)
  local names, lines = { "host" }, {}
  local values = { host = url.host }
  for name in h:entries() do
    if not UNSIGNED[name] and values[name] == nil then
      local parts = {}
      for i, v in ipairs(h:getAll(name)) do
        parts[i] = v:gsub("^%s+", ""):gsub("%s+$", ""):gsub("%s+", " ")
      end
      names[#names + 1] = name
      values[name] = table.concat(parts, ",")
    end
  end
  table.sort(names)
  for i, name in ipairs(names) do
    lines[i] = name .. ":" .. values[name] .. "\n"
  end
  local signed_headers = table.concat(names, ";")

  local canonical = table.concat({
    method,
    canonical_uri(url.pathname, service),
    canonical_query(url.search),
    table.concat(lines),
    signed_headers,
    payload_hash,
  }, "\n")
  local date = amz_date:sub(1, 8)
  local scope = table.concat({ date, opts.region, service, "aws4_request" }, "/")
  local to_sign = table.concat({ "AWS4-HMAC-SHA256", amz_date, scope, hex.encode(crypto.sha256(canonical)) }, "\n")
  local key = hmac(hmac(hmac(hmac("AWS4" .. opts.secretAccessKey, date), opts.region), service), "aws4_request")
  local signature = hex.encode(hmac(key, to_sign))
  h:set(
    "authorization",
    ("AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s"):format(
      opts.accessKeyId,
      scope,
      signed_headers,
      signature
    )
  )
  return signed
end

return M
