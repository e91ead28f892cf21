-- moat test scripts/agent-sandbox_test.lua
secrets = { GITHUB_TOKEN = "ghp_test_starter_0123456789" }
hosts = { ["pypi.org"] = "169.254.169.254" }

test("the one credential is injected", function(t)
  t.upstream("api.github.com", "{}")
  t.eq(t.send { url = "https://api.github.com/user" }.status, 200)
  t.eq(t.sent[1].headers.authorization, "Bearer ghp_test_starter_0123456789")
end)

test("listed hosts egress unchanged", function(t)
  t.upstream("registry.npmjs.org", "{}")
  local r = t.send { url = "https://registry.npmjs.org/left-pad", headers = { authorization = "Bearer npm_x" } }
  t.eq(r.decision, "egress")
  t.eq(t.sent[1].headers.authorization, "Bearer npm_x")
end)

test("everything else is denied by default", function(t)
  t.eq(t.send { url = "https://example.com/" }.detail, "not-allowed")
  t.eq(t.send { url = "http://10.0.0.1/" }.detail, "not-allowed")
  t.eq(#t.sent, 0)
end)

test("a listed name that resolves to cloud metadata is still refused", function(t)
  local r = t.send { url = "https://pypi.org/simple/" }
  t.eq(r.status, 520)
  t.contains(r.detail, "169.254.169.254")
  t.eq(#t.sent, 0)
end)
