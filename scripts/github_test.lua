-- moat test scripts/github_test.lua
secrets = { GITHUB_TOKEN = "ghp_test0123456789abcdef" }

-- base64("x-access-token:ghp_test0123456789abcdef")
local GIT_BASIC = "Basic eC1hY2Nlc3MtdG9rZW46Z2hwX3Rlc3QwMTIzNDU2Nzg5YWJjZGVm"

test("the API gets the token in place of the container's", function(t)
  t.upstream("api.github.com", '{"login":"octocat"}')
  local r = t.send { url = "https://api.github.com/user", headers = { authorization = "Bearer fake" } }
  t.eq(r.status, 200)
  t.eq(r.body, '{"login":"octocat"}')
  t.eq(t.sent[1].headers.authorization, "Bearer ghp_test0123456789abcdef")
end)

test("git over HTTPS gets an x-access-token basic credential", function(t)
  t.upstream("github.com", {
    status = 200,
    headers = { ["content-type"] = "application/x-git-upload-pack-advertisement" },
    body = "001e# service=git-upload-pack\n",
  })
  t.send { url = "https://github.com/octo/repo.git/info/refs?service=git-upload-pack" }
  t.send { method = "POST", url = "https://github.com/octo/repo.git/git-upload-pack", body = "0000" }
  t.send { method = "POST", url = "https://github.com/octo/repo/git-receive-pack", body = "0000" }
  t.eq(#t.sent, 3)
  for i = 1, 3 do
    t.eq(t.sent[i].headers.authorization, GIT_BASIC, t.sent[i].path)
  end
end)

test("github.com web pages get no credential", function(t)
  t.upstream("github.com", "<html>")
  t.send { url = "https://github.com/octo/repo", headers = { authorization = "Bearer fake" } }
  t.eq(t.sent[1].headers.authorization, nil)
end)

test("nothing is injected over plain HTTP", function(t)
  t.upstream("github.com", "moved")
  t.eq(t.send { url = "http://api.github.com/user" }.status, 403)
  t.send { url = "http://github.com/octo/repo.git/info/refs" }
  t.eq(#t.sent, 1)
  t.eq(t.sent[1].headers.authorization, nil)
end)

test("other hosts are refused before anything is sent", function(t)
  local r = t.send { url = "https://gist.example.com/" }
  t.eq(r.decision, "deny")
  t.eq(#t.sent, 0)
end)

test("an echoed token comes back redacted", function(t)
  t.upstream("api.github.com", function(req)
    return "you sent " .. req.headers.authorization
  end)
  t.eq(t.send { url = "https://api.github.com/debug" }.body, "you sent Bearer [secret GITHUB_TOKEN]")
end)
