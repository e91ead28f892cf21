---@meta moat.auth
local auth = {}
---Sets `Authorization: Bearer <token>`.
---@param request Request
---@param token string
---@return Request
function auth.bearer(request, token) end
---Sets `Authorization: Basic base64(user:password)`.
---@param request Request
---@param user string
---@param password string
---@return Request
function auth.basic(request, user, password) end
---Sets any header.
---@param request Request
---@param name string
---@param value string
---@return Request
function auth.header(request, name, value) end
---Replaces `placeholder` in every header value with `secret`.
---@param request Request
---@param placeholder string
---@param secret string
---@return Request request
---@return integer changed how many values changed
function auth.swap(request, placeholder, secret) end
---@class SigV4Options
---@field accessKeyId string
---@field secretAccessKey string
---@field region string
---@field service string
---@field sessionToken? string
---@field unsignedPayload? boolean
---@field datetime? string "YYYYMMDDTHHMMSSZ"

---AWS Signature Version 4 (header form); may return a new Request.
---@param request Request
---@param opts SigV4Options
---@return Request
function auth.sigv4(request, opts) end
return auth
