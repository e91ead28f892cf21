-- LLM API keys by placeholder: the container holds a fake key, moat swaps in the real one.
--
-- What: the container runs with OPENAI_API_KEY=moat-placeholder-openai and
-- ANTHROPIC_API_KEY=moat-placeholder-anthropic. On HTTPS requests to api.openai.com
-- (`Authorization: Bearer ...`) and api.anthropic.com (`x-api-key: ...`) moat replaces the
-- placeholder with the real key, wherever the SDK put it. A request that carries the real
-- key is refused (the container must never have it: if it does, it leaked); a request with
-- no placeholder gets 401; plain HTTP gets nothing; other hosts are refused.
--
-- Use:
--   moat init --recipe llm-keys
--   export OPENAI_API_KEY=sk-... ANTHROPIC_API_KEY=sk-ant-...   (see moat.toml [secrets])
--   moat test && moat serve
--   in the container: the placeholders above, https_proxy=http://agent-1:x@127.0.0.1:3128,
--   and moat's CA trusted (SSL_CERT_FILE / NODE_EXTRA_CA_CERTS / REQUESTS_CA_BUNDLE).
local auth = require("moat.auth")

interceptHttps = true
redactSecrets = true

allowedHosts = { "api.openai.com", "api.anthropic.com" }

-- A handler that swaps `placeholder` for the secret `name`.
local function swap_in(placeholder, name)
  return function(request, env)
    if URL.new(request.url).protocol ~= "https:" then
      return Response.new("moat: API keys are only sent over HTTPS\n", { status = 403 })
    end
    local real = env[name]
    for _, value in request.headers:entries() do
      if value:find(real, 1, true) then
        console.warn("refused a request that carries the real " .. name .. ": the container has the key")
        return Response.new("moat: this request carries the real key; use the placeholder\n", { status = 403 })
      end
    end
    local r, changed = auth.swap(request, placeholder, real)
    if changed == 0 then
      return Response.new("moat: no " .. placeholder .. " in the request\n", { status = 401 })
    end
    return fetch(r)
  end
end

outboundByHost = {
  ["api.openai.com"] = swap_in("moat-placeholder-openai", "OPENAI_API_KEY"),
  ["api.anthropic.com"] = swap_in("moat-placeholder-anthropic", "ANTHROPIC_API_KEY"),
}
