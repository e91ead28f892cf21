-- GitHub: the container uses the API and git over HTTPS without ever holding the token.
--
-- What: HTTPS requests to api.github.com get `Authorization: Bearer <GITHUB_TOKEN>`; git over
-- HTTPS to github.com (clone, fetch, push) gets the credential git sends for a token,
-- `Basic base64("x-access-token:<GITHUB_TOKEN>")`. Whatever the container sent in
-- Authorization is replaced. Nothing is injected over plain HTTP, on other github.com pages,
-- or on any other host; hosts not listed below are refused.
--
-- Use:
--   moat init --recipe github            (writes this file, its test and moat.toml)
--   export GITHUB_TOKEN=ghp_...          ([secrets] GITHUB_TOKEN = { env = "GITHUB_TOKEN" })
--   moat test && moat serve
--   in the container: https_proxy=http://agent-1:x@127.0.0.1:3128, trust `moat ca path`,
--   and git needs no credential helper at all.
local auth = require("moat.auth")

interceptHttps = true
redactSecrets = true

allowedHosts = {
  "api.github.com",
  "github.com",
  "codeload.github.com",
  "objects.githubusercontent.com",
  "raw.githubusercontent.com",
}

-- git's smart HTTP endpoints: /OWNER/REPO[.git]/info/refs, git-upload-pack, git-receive-pack.
local function is_git(path)
  return path:match("^/[^/]+/[^/]+/info/refs$") ~= nil
    or path:match("^/[^/]+/[^/]+/git%-upload%-pack$") ~= nil
    or path:match("^/[^/]+/[^/]+/git%-receive%-pack$") ~= nil
end

local function over_https(request)
  return URL.new(request.url).protocol == "https:"
end

outboundByHost = {
  ["api.github.com"] = function(request, env)
    if not over_https(request) then
      return Response.new("moat: api.github.com takes HTTPS only\n", { status = 403 })
    end
    return fetch(auth.bearer(request, env.GITHUB_TOKEN))
  end,

  ["github.com"] = function(request, env)
    if over_https(request) and is_git(URL.new(request.url).pathname) then
      return fetch(auth.basic(request, "x-access-token", env.GITHUB_TOKEN))
    end
    request.headers:delete("authorization")
    return fetch(request)
  end,
}
