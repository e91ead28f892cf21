-- moat test scripts/registries_test.lua

test("installs read from every registry", function(t)
  t.upstream("*", function(req)
    return { status = 200, body = req.method .. " " .. req.url }
  end)
  for _, url in ipairs({
    "https://registry.npmjs.org/left-pad",
    "https://pypi.org/simple/requests/",
    "https://files.pythonhosted.org/packages/x/requests.whl",
    "https://index.crates.io/se/rd/serde",
    "https://static.crates.io/crates/serde/serde-1.0.0.crate",
    "https://proxy.golang.org/golang.org/x/net/@v/list",
  }) do
    local r = t.send { url = url }
    t.eq(r.status, 200, url)
    t.eq(r.body, "GET " .. url)
  end
  t.eq(t.send { method = "HEAD", url = "https://registry.npmjs.org/left-pad" }.status, 200)
end)

test("publishing is refused before anything is sent", function(t)
  t.eq(t.send { method = "PUT", url = "https://registry.npmjs.org/left-pad", body = "{}" }.status, 403)
  t.eq(t.send { method = "PUT", url = "https://crates.io/api/v1/crates/new", body = "x" }.status, 403)
  t.eq(t.send { method = "DELETE", url = "https://registry.npmjs.org/left-pad/-rev/1" }.status, 403)
  t.eq(#t.sent, 0)
end)

test("the container's token is not passed on", function(t)
  t.upstream("registry.npmjs.org", "{}")
  t.send { url = "https://registry.npmjs.org/left-pad", headers = { authorization = "Bearer npm_leaked" } }
  t.eq(t.sent[1].headers.authorization, nil)
end)

test("upload.pypi.org and other hosts are refused", function(t)
  t.eq(t.send { method = "POST", url = "https://upload.pypi.org/legacy/", body = "x" }.decision, "deny")
  t.eq(t.send { url = "https://example.com/" }.decision, "deny")
  t.eq(#t.sent, 0)
end)
