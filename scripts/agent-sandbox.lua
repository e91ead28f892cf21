-- A starter for sandboxing an agent: deny by default, allow a short list, see inside HTTPS,
-- inject one credential.
--
-- What: only the hosts in allowedHosts are reachable (everything else gets 520 before any
-- byte leaves); HTTPS is intercepted so handlers see it; api.github.com gets the GitHub
-- token the agent never holds; cloud metadata is refused even if a name resolves to it.
-- Add hosts to allowedHosts and handlers to outboundByHost as the agent needs them.
--
-- Use:
--   moat init --recipe agent-sandbox
--   export GITHUB_TOKEN=ghp_...          (moat.toml: [secrets] GITHUB_TOKEN)
--   moat test && moat run -- your-agent   (or moat serve and point the agent's proxy at it)
local auth = require("moat.auth")

enableInternet = false
interceptHttps = true
redactSecrets = true

allowedHosts = {
  "api.github.com",
  "registry.npmjs.org",
  "pypi.org",
  "files.pythonhosted.org",
}

deniedHosts = {
  "169.254.169.254", -- cloud metadata
  "fd00:ec2::254",
}

outboundByHost = {
  ["api.github.com"] = function(request, env)
    if URL.new(request.url).protocol ~= "https:" then
      return Response.new("moat: api.github.com takes HTTPS only\n", { status = 403 })
    end
    return fetch(auth.bearer(request, env.GITHUB_TOKEN))
  end,
}
