-- moat test scripts/aws_test.lua
-- The end-to-end check against botocore itself is tests/it/recipes.rs (aws_*).
secrets = { AWS_ACCESS_KEY_ID = "AKIDREALKEY0000", AWS_SECRET_ACCESS_KEY = "real/secret/key/0123456789" }

local function signature_of(req)
  return req.headers.authorization
end

test("S3 is re-signed with the real key, UNSIGNED-PAYLOAD", function(t)
  t.upstream("*.s3.eu-west-1.amazonaws.com", "")
  t.send {
    method = "PUT",
    url = "https://bucket.s3.eu-west-1.amazonaws.com/a.txt",
    body = "hello",
    headers = {
      authorization = "AWS4-HMAC-SHA256 Credential=moat/20260101/eu-west-1/s3/aws4_request, "
        .. "SignedHeaders=host, Signature=00",
    },
  }
  local sent = t.sent[1]
  t.ok(
    signature_of(sent):find("^AWS4%-HMAC%-SHA256 Credential=AKIDREALKEY0000/%d+/eu%-west%-1/s3/aws4_request"),
    signature_of(sent)
  )
  t.eq(sent.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD")
  t.eq(sent.body, "hello")
end)

test("an aws-chunked upload keeps its framing and its declared payload", function(t)
  t.upstream("*.s3.eu-west-1.amazonaws.com", "")
  local chunked = "5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n"
  t.send {
    method = "PUT",
    url = "https://bucket.s3.eu-west-1.amazonaws.com/b.txt",
    body = chunked,
    headers = {
      ["content-encoding"] = "aws-chunked",
      ["x-amz-content-sha256"] = "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
      ["x-amz-decoded-content-length"] = "5",
      ["x-amz-trailer"] = "x-amz-checksum-crc32",
    },
  }
  local sent = t.sent[1]
  t.eq(sent.headers["x-amz-content-sha256"], "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
  t.eq(sent.headers["content-encoding"], "aws-chunked")
  t.eq(sent.headers["content-length"], tostring(#chunked))
  t.eq(sent.body, chunked)
  t.contains(signature_of(sent), "content-encoding;")
end)

test("chunk-signed bodies are refused, not mangled", function(t)
  local r = t.send {
    method = "PUT",
    url = "https://bucket.s3.eu-west-1.amazonaws.com/c.txt",
    body = "5;chunk-signature=00\r\nhello\r\n",
    headers = { ["content-encoding"] = "aws-chunked", ["x-amz-content-sha256"] = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" },
  }
  t.eq(r.status, 400)
  t.contains(r.body, "cannot re-sign")
  t.eq(#t.sent, 0)
end)

test("a presigned URL is re-signed in header form", function(t)
  t.upstream("s3.eu-west-1.amazonaws.com", "object")
  t.send {
    url = "https://s3.eu-west-1.amazonaws.com/bucket/k?versionId=3&X-Amz-Algorithm=AWS4-HMAC-SHA256"
      .. "&X-Amz-Credential=moat%2F20260101%2Feu-west-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
      .. "&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=abc",
  }
  local sent = t.sent[1]
  t.eq(sent.path, "/bucket/k?versionId=3")
  t.contains(signature_of(sent), "Credential=AKIDREALKEY0000/")
end)

test("STS gets a signed body hash; plain HTTP and other regions get nothing", function(t)
  t.upstream("sts.eu-west-1.amazonaws.com", "<GetCallerIdentityResponse/>")
  t.send {
    method = "POST",
    url = "https://sts.eu-west-1.amazonaws.com/",
    body = "Action=GetCallerIdentity&Version=2011-06-15",
    headers = { ["content-type"] = "application/x-www-form-urlencoded" },
  }
  t.contains(signature_of(t.sent[1]), "/eu-west-1/sts/aws4_request")
  t.eq(t.sent[1].body, "Action=GetCallerIdentity&Version=2011-06-15")
  t.eq(t.send { url = "http://s3.eu-west-1.amazonaws.com/bucket/k" }.status, 403)
  t.eq(t.send { url = "https://s3.us-east-1.amazonaws.com/bucket/k" }.decision, "deny")
  t.eq(#t.sent, 1)
end)
