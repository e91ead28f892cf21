-- Package registries, read-only: installs work, publishing does not.
--
-- What: GET and HEAD to the npm, PyPI, crates.io and Go module hosts below are forwarded;
-- any other method (npm publish's PUT, cargo publish's PUT, a DELETE) gets 403. No
-- credential is added, and the container's own Authorization is not passed on, so a token
-- that found its way into the container cannot publish either. Other hosts are refused.
--
-- Use:
--   moat init --recipe registries && moat test && moat serve
--   in the container: https_proxy=http://agent-1:x@127.0.0.1:3128 and moat's CA trusted:
--   npm: npm_config_cafile=/path/ca.pem (it beats NODE_EXTRA_CA_CERTS when an npmrc sets
--   cafile); pip: REQUESTS_CA_BUNDLE=/path/ca.pem (it overrides PIP_CERT); cargo:
--   CARGO_HTTP_CAINFO=/path/ca.pem; go: SSL_CERT_FILE=/path/ca.pem.
interceptHttps = true

allowedHosts = {
  "registry.npmjs.org",
  "pypi.org",
  "files.pythonhosted.org",
  "crates.io",
  "index.crates.io",
  "static.crates.io",
  "proxy.golang.org",
  "sum.golang.org",
}

local function read_only(request)
  if request.method ~= "GET" and request.method ~= "HEAD" then
    return Response.new(
      "moat: package registries are read-only here (" .. request.method .. " refused)\n",
      { status = 403 }
    )
  end
  request.headers:delete("authorization")
  return fetch(request)
end

outboundByHost = {}
for _, host in ipairs(allowedHosts) do
  outboundByHost[host] = read_only
end
