-- moat test scripts/llm-keys_test.lua
secrets = { OPENAI_API_KEY = "sk-test-openai-0123456789", ANTHROPIC_API_KEY = "sk-ant-test-0123456789" }

test("OpenAI: the bearer placeholder becomes the key", function(t)
  t.upstream("api.openai.com", '{"object":"list"}')
  local r =
    t.send { url = "https://api.openai.com/v1/models", headers = { authorization = "Bearer moat-placeholder-openai" } }
  t.eq(r.status, 200)
  t.eq(t.sent[1].headers.authorization, "Bearer sk-test-openai-0123456789")
end)

test("Anthropic: the x-api-key placeholder becomes the key", function(t)
  t.upstream("api.anthropic.com", '{"type":"message"}')
  local r = t.send {
    url = "https://api.anthropic.com/v1/messages",
    headers = { ["x-api-key"] = "moat-placeholder-anthropic", ["anthropic-version"] = "2023-06-01" },
    body = '{"model":"claude","max_tokens":1,"messages":[]}',
  }
  t.eq(r.status, 200)
  t.eq(t.sent[1].headers["x-api-key"], "sk-ant-test-0123456789")
  t.eq(t.sent[1].headers["anthropic-version"], "2023-06-01")
  t.eq(t.sent[1].body, '{"model":"claude","max_tokens":1,"messages":[]}')
end)

test("a request carrying the real key is refused", function(t)
  local r = t.send {
    url = "https://api.openai.com/v1/models",
    headers = { authorization = "Bearer sk-test-openai-0123456789" },
  }
  t.eq(r.status, 403)
  t.eq(#t.sent, 0)
end)

test("no placeholder, no key", function(t)
  t.eq(t.send { url = "https://api.anthropic.com/v1/messages", body = "{}" }.status, 401)
  t.eq(#t.sent, 0)
end)

test("never over plain HTTP", function(t)
  local r =
    t.send { url = "http://api.openai.com/v1/models", headers = { authorization = "Bearer moat-placeholder-openai" } }
  t.eq(r.status, 403)
  t.eq(#t.sent, 0)
end)

test("never on another host", function(t)
  local r =
    t.send { url = "https://api.example.com/v1/models", headers = { authorization = "Bearer moat-placeholder-openai" } }
  t.eq(r.decision, "deny")
  t.eq(#t.sent, 0)
end)
