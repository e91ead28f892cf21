-- Tests for policy.lua: run them with `moat test`. Each test sends requests through the real
-- engine; t.upstream answers in place of the network. See docs/testing.md.

test("hello.moat is answered by the policy itself", function(t)
  local r = t.send { url = "http://hello.moat/", container = "agent-1" }
  t.eq(r.status, 200)
  t.eq(r.body, "hello agent-1\n")
  t.eq(#t.sent, 0)
end)

test("an allowed host is forwarded with the container's name added", function(t)
  t.upstream("www.example.com", "page")
  local r = t.send { url = "http://www.example.com/", container = "agent-1" }
  t.eq(r.body, "page")
  t.eq(t.sent[1].headers["x-moat-container"], "agent-1")
end)

test("everything else is refused before anything is sent", function(t)
  t.eq(t.send { url = "http://elsewhere.test/" }.status, 520)
  t.eq(t.send { url = "http://169.254.169.254/latest/meta-data/" }.decision, "deny")
  t.eq(#t.sent, 0)
end)
