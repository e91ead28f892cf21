-- AWS: the container's SDK signs with dummy credentials; moat re-signs with the real ones
-- (Signature Version 4), so the container never holds an AWS key.
--
-- What: HTTPS requests to S3 and STS in REGION are re-signed with AWS_ACCESS_KEY_ID /
-- AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN when set). S3 is signed UNSIGNED-PAYLOAD so
-- uploads stream; the uploads current SDKs send (an aws-chunked body with a checksum
-- trailer, STREAMING-UNSIGNED-PAYLOAD-TRAILER) keep their framing and are re-signed as they
-- are; a presigned URL the container made is re-signed in header form; chunk-signed bodies
-- (what SDKs send over plain HTTP) are refused with a message that says why. Plain HTTP gets
-- nothing; other hosts are refused.
--
-- Use:
--   moat init --recipe aws
--   export AWS_ACCESS_KEY_ID=AKIA... AWS_SECRET_ACCESS_KEY=...    (moat.toml [secrets])
--   moat test && moat serve
--   in the container: AWS_ACCESS_KEY_ID=moat AWS_SECRET_ACCESS_KEY=moat AWS_REGION=eu-west-1,
--   https_proxy=http://agent-1:x@127.0.0.1:3128, AWS_CA_BUNDLE=/path/to/moat-ca.pem
local auth = require("moat.auth")

local REGION = "eu-west-1"

interceptHttps = true

allowedHosts = {
  "s3." .. REGION .. ".amazonaws.com",
  "*.s3." .. REGION .. ".amazonaws.com",
  "sts." .. REGION .. ".amazonaws.com",
}

local function resign(service)
  return function(request, env)
    if URL.new(request.url).protocol ~= "https:" then
      return Response.new("moat: AWS requests are only signed over HTTPS\n", { status = 403 })
    end
    local ok, signed = pcall(auth.sigv4, request, {
      accessKeyId = env.AWS_ACCESS_KEY_ID,
      secretAccessKey = env.AWS_SECRET_ACCESS_KEY,
      sessionToken = rawget(env, "AWS_SESSION_TOKEN"),
      region = REGION,
      service = service,
      unsignedPayload = service == "s3",
    })
    if not ok then
      return Response.new(tostring(signed) .. "\n", { status = 400 })
    end
    return fetch(signed)
  end
end

outboundByHost = {
  ["s3." .. REGION .. ".amazonaws.com"] = resign("s3"),
  ["*.s3." .. REGION .. ".amazonaws.com"] = resign("s3"),
  ["sts." .. REGION .. ".amazonaws.com"] = resign("sts"),
}
