---@meta
-- moat's Lua API for lua-language-server (LuaLS): completion and type checks in any editor.
-- `moat init` writes this folder and a .luarc.json that points LuaLS at it. Nothing here
-- runs: it only describes what moat provides (docs/policies.md has the full text).

-- Globals that configure the class ------------------------------------------------------

---Whether a host no rule names may be reached (step 6 of the decision order). Default true.
---@type boolean
enableInternet = true

---Whether moat terminates TLS so that handlers see `https://` requests. Default false.
---@type boolean
interceptHttps = false

---Replace secret values in responses with `[secret NAME]`. Default false.
---@type boolean
redactSecrets = false

---Hosts a request must match to go on (step 2); nil: no gate.
---@type string[]?
allowedHosts = nil

---Hosts always refused (step 1).
---@type string[]?
deniedHosts = nil

---Handlers by host pattern (step 4).
---@type table<string, Handler>
outboundByHost = {}

---Named handlers that overrides select at runtime (`setOutboundHandler`, `setOutboundByHost`).
---@type table<string, Handler>
outboundHandlers = {}

---The catch-all handler (step 5).
---@type Handler?
outbound = nil

---@alias Handler fun(request: Request, env: Env, ctx: Ctx): Response

-- Request, Response, Headers, URL ---------------------------------------------------------

---A body that can be passed on without buffering (to Request.new, Response.new, fetch, BUCKET:put).
---@class BodyStream

---@alias BodyInit string|BodyStream|nil

---@class RequestInit
---@field method? string
---@field headers? Headers|table<string, string>
---@field body? BodyInit
---@field redirect? "follow"|"manual"

---@class Request
---@field method string
---@field url string Absolute: scheme://host[:port]/path?query
---@field headers Headers
---@field body BodyStream
---@field bodyUsed boolean
---@field redirect "follow"|"manual"
Request = {}

---A new request. `input` is a URL or a Request (copied; its body is moved, not read).
---@param input string|Request
---@param init? RequestInit
---@return Request
function Request.new(input, init) end

---The whole body as text (once; up to limits.body_buffer).
---@return string
function Request:text() end

---The whole body parsed as JSON.
---@return any
function Request:json() end

---The whole body as a binary string.
---@return string
function Request:bytes() end

---@return Request
function Request:clone() end

---@class ResponseInit
---@field status? integer
---@field statusText? string
---@field headers? Headers|table<string, string>

---@class Response
---@field status integer
---@field ok boolean
---@field statusText string
---@field headers Headers
---@field url string
---@field redirected boolean
---@field body BodyStream
---@field bodyUsed boolean
Response = {}

---@param body? BodyInit
---@param init? ResponseInit
---@return Response
function Response.new(body, init) end

---A response whose body is `value` as JSON (content-type application/json).
---@param value any
---@param init? ResponseInit
---@return Response
function Response.json(value, init) end

---@param url string
---@param status? 301|302|303|307|308
---@return Response
function Response.redirect(url, status) end

---@return string
function Response:text() end

---@return any
function Response:json() end

---@return string
function Response:bytes() end

---@return Response
function Response:clone() end

---Header names are case-insensitive; invalid names or values raise an error.
---@class Headers
Headers = {}

---@param init? table<string, string>
---@return Headers
function Headers.new(init) end

---Every value of `name`, joined by ", "; nil when absent.
---@param name string
---@return string?
function Headers:get(name) end

---@param name string
---@return string[]
function Headers:getAll(name) end

---@param name string
---@param value string
function Headers:set(name, value) end

---@param name string
---@param value string
function Headers:append(name, value) end

---@param name string
function Headers:delete(name) end

---@param name string
---@return boolean
function Headers:has(name) end

---`for name, value in headers:entries() do ... end`
---@return fun(): string, string
function Headers:entries() end

---@class URLSearchParams
local URLSearchParams = {}
---@param name string
---@return string?
function URLSearchParams:get(name) end
---@param name string
---@return string[]
function URLSearchParams:getAll(name) end
---@param name string
---@param value string
function URLSearchParams:set(name, value) end
---@param name string
---@param value string
function URLSearchParams:append(name, value) end
---@param name string
function URLSearchParams:delete(name) end
---@param name string
---@return boolean
function URLSearchParams:has(name) end
---@return string
function URLSearchParams:toString() end

---A WHATWG URL; `tostring(url)` is its href. Setting a field edits the URL.
---@class URL
---@field href string
---@field protocol string "https:"
---@field host string hostname[:port]
---@field hostname string
---@field port string
---@field pathname string
---@field search string "?a=1" or ""
---@field hash string
---@field origin string
---@field searchParams URLSearchParams
URL = {}

---@param url string
---@param base? string
---@return URL
function URL.new(url, base) end

---Sends a request from moat itself (trusted: the container's host lists do not apply).
---@param input string|Request
---@param init? RequestInit
---@return Response
function fetch(input, init) end

-- console ----------------------------------------------------------------------------------

---Log lines tagged with the container, class and request id; secret values are redacted.
---@class console
console = {}
---@param ... any
function console.log(...) end
---@param ... any
function console.info(...) end
---@param ... any
function console.warn(...) end
---@param ... any
function console.error(...) end
---@param ... any
function console.debug(...) end

-- ctx and env ------------------------------------------------------------------------------

---@class Ctx
---@field containerId string
---@field className string
---@field requestId string
---@field params any Set when a runtime override chose this handler with params.
---@field storage KVNamespace This container's own KV, kept across restarts.

---The bindings of moat.toml: KV namespaces, buckets, secrets and vars by name. A name that
---nothing declares raises an error; test an optional one with rawget(env, "NAME").
---`moat init` writes types/env.lua with the fields your moat.toml declares.
---@class Env
---@field KV KVNamespace The default KV namespace (when moat.toml has no [kv]).
---@field BUCKET Bucket The default bucket (when moat.toml has no [blob]).
---@field [string] any

---@class KVListKey
---@field name string
---@field expiration? integer
---@field metadata? any

---@class KVList
---@field keys KVListKey[]
---@field list_complete boolean
---@field cursor? string

---@class KVNamespace
local KVNamespace = {}

---@param key string
---@param options? { type?: "text"|"json"|"bytes" }
---@return any
function KVNamespace:get(key, options) end

---@param key string
---@return any value
---@return any metadata
function KVNamespace:getWithMetadata(key) end

---@param key string
---@param value string
---@param options? { expirationTtl?: number, expiration?: number, metadata?: any }
function KVNamespace:put(key, value, options) end

---@param key string
function KVNamespace:delete(key) end

---@param options? { prefix?: string, limit?: integer, cursor?: string }
---@return KVList
function KVNamespace:list(options) end

---@class BucketObject
---@field key string
---@field size integer
---@field etag string
---@field httpEtag string
---@field uploaded number
---@field httpMetadata { contentType?: string, contentLanguage?: string, contentDisposition?: string, contentEncoding?: string, cacheControl?: string }
---@field customMetadata table<string, string>
---@field body BodyStream
local BucketObject = {}
---@return string
function BucketObject:text() end
---@return any
function BucketObject:json() end
---@return string
function BucketObject:bytes() end

---@class BucketList
---@field objects BucketObject[]
---@field delimitedPrefixes string[]
---@field truncated boolean
---@field cursor? string

---@class Bucket
local Bucket = {}

---@param key string
---@param options? { range?: { offset?: integer, length?: integer, suffix?: integer } }
---@return BucketObject?
function Bucket:get(key, options) end

---@param key string
---@return BucketObject?
function Bucket:head(key) end

---@param key string
---@param value string|BodyStream
---@param options? { httpMetadata?: table<string, string>, customMetadata?: table<string, string> }
---@return BucketObject
function Bucket:put(key, value, options) end

---@param keys string|string[]
function Bucket:delete(keys) end

---@param options? { prefix?: string, limit?: integer, cursor?: string, delimiter?: string }
---@return BucketList
function Bucket:list(options) end

-- moat.container ---------------------------------------------------------------------------

---One container's runtime policy (SPEC 7.2) and, under `moat serve`, its lifecycle.
---@class Container
local Container = {}
---@param name string
---@param params? any
function Container:setOutboundHandler(name, params) end
function Container:removeOutboundHandler() end
---@param host string
---@param name string
---@param params? any
function Container:setOutboundByHost(host, name, params) end
---@param map table<string, string|{ method: string, params?: any }>
function Container:setOutboundByHosts(map) end
---@param host string
function Container:removeOutboundByHost(host) end
---@param hosts string[]
function Container:setAllowedHosts(hosts) end
---@param hosts string[]
function Container:setDeniedHosts(hosts) end
---@param host string
function Container:allowHost(host) end
---@param host string
function Container:denyHost(host) end
---@param host string
function Container:removeAllowedHost(host) end
---@param host string
function Container:removeDeniedHost(host) end
function Container:clearOverrides() end
---@param target string
---@param name string
---@param params? any
function Container:interceptOutboundHttp(target, name, params) end
---@param host string
---@param name string
---@param params? any
function Container:interceptOutboundHttps(host, name, params) end
---@param name string
---@param params? any
function Container:interceptAllOutboundHttp(name, params) end
---@param options { entrypoint?: string[], env?: table<string, string>, enableInternet?: boolean, class?: string, workdir?: string, memory?: integer|string, pids?: integer }
---@return table status
function Container:start(options) end
---@param signal integer
function Container:signal(signal) end
---@param message? string
function Container:destroy(message) end
---Waits until the container ends; its exit status.
---@return table
function Container:monitor() end
---@param port integer
---@return table
function Container:getTcpPort(port) end

moat = {}

---@param id string
---@return Container
function moat.container(id) end
