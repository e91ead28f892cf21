-- luacheck configuration for moat's Lua: the bundled stdlib and the policies in scripts/.
std = "lua54"
max_line_length = 120
-- A handler's signature is (request, env, ctx) whether or not it uses them all.
ignore = { "212/request", "212/env", "212/ctx" }

-- What moat gives a policy (docs/policies.md), read-only.
read_globals = { "Request", "Response", "Headers", "URL", "fetch", "console", "moat" }
-- What a policy sets to configure its class.
globals = {
  "enableInternet", "interceptHttps", "redactSecrets", "allowedHosts", "deniedHosts",
  "outboundByHost", "outboundHandlers", "outbound",
}

-- Test files: moat test's API (docs/testing.md).
files["scripts/*_test.lua"] = { read_globals = { "test" }, globals = { "policy", "secrets", "vars", "hosts" } }
-- The annotation files only describe; they are checked by compiling them (src/cli/init.rs).
exclude_files = { "stdlib/types/**", "target/**", "fuzz/**" }
