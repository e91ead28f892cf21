//! `moat.auth` (SPEC 3 stdlib): credential recipes, with AWS SigV4 checked against cases of
//! AWS's Signature Version 4 test suite, AWS's published S3 example, and a vector from an
//! independent implementation of the algorithm.

use crate::harness::*;

const POLICY: &str = r#"
local auth = require("moat.auth")
local UP = "http://127.0.0.1:%UP%"
-- AWS's Signature Version 4 test suite (aws-sig-v4-test-suite): its credentials, region,
-- service and time, and the requests of five of its cases.
local SUITE = {
  ["get-vanilla"] = { "GET", "/" },
  ["post-vanilla"] = { "POST", "/" },
  ["get-vanilla-query-order-key-case"] = { "GET", "/?Param2=value2&Param1=value1" },
  ["get-vanilla-empty-query-key"] = { "GET", "/?Param1=value1" },
  ["post-x-www-form-urlencoded"] = { "POST", "/", { ["content-type"] = "application/x-www-form-urlencoded" }, "Param1=value1" },
}
outboundByHost = {
  ["suite.test"] = function(request)
    local c = SUITE[URL.new(request.url).pathname:sub(2)]
    local r = Request.new("https://example.amazonaws.com" .. c[2], { method = c[1], headers = c[3], body = c[4] })
    local signed = auth.sigv4(r, {
      accessKeyId = "AKIDEXAMPLE", secretAccessKey = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
      region = "us-east-1", service = "service", datetime = "20150830T123600Z" })
    return Response.new(signed.headers:get("authorization"))
  end,
  -- The signature alone, for known vectors: no network.
  ["vector.test"] = function(request)
    local which = URL.new(request.url).pathname
    local signed
    if which == "/s3" then
      -- AWS S3 documentation, "Example: GET Object".
      signed = auth.sigv4(Request.new("https://examplebucket.s3.amazonaws.com/test.txt", { headers = { range = "bytes=0-9" } }), {
        accessKeyId = "AKIAIOSFODNN7EXAMPLE", secretAccessKey = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region = "us-east-1", service = "s3", datetime = "20130524T000000Z" })
    else
      -- A POST to a non-S3 service: encoded path and query, body, session token, messy spaces.
      signed = auth.sigv4(Request.new("https://sts.eu-west-1.amazonaws.com/a b/c%2Fd?Version=2011-06-15&Action=Get%20It&b=2&a=", {
        method = "POST", body = "Action=GetCallerIdentity",
        headers = { ["content-type"] = "application/x-www-form-urlencoded;  charset=utf-8", ["x-amz-meta-a"] = "  one   two ",
                    ["user-agent"] = "not signed", authorization = "the container's fake one" } }), {
        accessKeyId = "AKIDEXAMPLE", secretAccessKey = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", sessionToken = "session-token-x",
        region = "eu-west-1", service = "sts", datetime = "20150830T123600Z" })
      assert(signed:text() == "Action=GetCallerIdentity", "the body survives signing")
    end
    return Response.new(signed.headers:get("authorization"))
  end,
  -- Each recipe on the container's request, forwarded to the test upstream.
  ["recipes.test"] = function(request, env)
    local kind = URL.new(request.url).pathname:sub(2)
    local r = Request.new(UP .. "/" .. kind, request)
    if kind == "bearer" then auth.bearer(r, env.TOKEN)
    elseif kind == "basic" then auth.basic(r, "bot", env.TOKEN)
    elseif kind == "header" then auth.header(r, "x-api-key", env.TOKEN)
    elseif kind == "swap" then
      local _, n = auth.swap(r, "PLACEHOLDER-KEY", env.TOKEN)
      r.headers:set("x-swapped", tostring(n))
    elseif kind == "sigv4" then
      r = auth.sigv4(r, { accessKeyId = "AKIDEXAMPLE", secretAccessKey = env.TOKEN, region = "us-east-1", service = "execute-api" })
    end
    return fetch(r)
  end,
}
"#;

#[test]
fn sigv4_passes_cases_of_aws_signature_v4_test_suite() {
    let moat = Moat::start(&POLICY.replace("%UP%", "9"));
    for (case, signed, signature) in [
        ("get-vanilla", "host;x-amz-date", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("post-vanilla", "host;x-amz-date", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
        (
            "get-vanilla-query-order-key-case",
            "host;x-amz-date",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "get-vanilla-empty-query-key",
            "host;x-amz-date",
            "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
        ),
        (
            "post-x-www-form-urlencoded",
            "content-type;host;x-amz-date",
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        ),
    ] {
        let r = curl(&moat, &format!("http://suite.test/{case}"), &[]);
        assert_eq!(
            r.body,
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed}, Signature={signature}"
            ),
            "{case}"
        );
    }
}

#[test]
fn sigv4_matches_aws_published_and_independent_vectors() {
    let moat = Moat::start(&POLICY.replace("%UP%", "9"));
    let r = curl(&moat, "http://vector.test/s3", &[]);
    assert_eq!(
        r.body,
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
         SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
         Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    );
    let r = curl(&moat, "http://vector.test/post", &[]);
    assert_eq!(
        r.body,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/sts/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date;x-amz-meta-a;x-amz-security-token, \
         Signature=2510f45c25d31f24b21bd031ba8c8dfc1ec749a5d5868fa8918d477c5e04c9b5"
    );
}

#[test]
fn every_recipe_reaches_the_upstream_and_the_container_never_holds_the_secret() {
    let up = Upstream::start();
    let moat =
        Moat::policy(&POLICY.replace("%UP%", &up.addr.port().to_string())).secret("TOKEN", "real-token-123456").start();
    let seen = |kind: &str, extra: &[&str]| {
        let r = curl(&moat, &format!("http://recipes.test/{kind}"), extra);
        assert_eq!(r.status, 200, "{kind}: {}", r.body);
        up.last().unwrap()
    };
    assert_eq!(seen("bearer", &[]).headers["authorization"], "Bearer real-token-123456");
    assert_eq!(seen("basic", &[]).headers["authorization"], "Basic Ym90OnJlYWwtdG9rZW4tMTIzNDU2");
    assert_eq!(seen("header", &[]).headers["x-api-key"], "real-token-123456");
    let s = seen("swap", &["-H", "Authorization: Bearer PLACEHOLDER-KEY", "-H", "X-Other: keep"]);
    assert_eq!(
        (s.headers["authorization"].as_str(), s.headers["x-other"].as_str(), s.headers["x-swapped"].as_str()),
        ("Bearer real-token-123456", "keep", "1")
    );
    // SigV4 re-signs the container's request: its fake signature is replaced, its body kept.
    let s = seen("sigv4", &["-H", "Authorization: AWS4-HMAC-SHA256 fake", "-d", "payload=1"]);
    let a = &s.headers["authorization"];
    assert!(
        a.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            && a.contains(
                "/us-east-1/execute-api/aws4_request, SignedHeaders=accept;content-type;host;x-amz-date, Signature="
            ),
        "{a}"
    );
    assert_eq!((s.method.as_str(), s.body.as_str()), ("POST", "payload=1"));
    assert!(s.headers["x-amz-date"].ends_with('Z'));
    assert!(!moat.logs().contains("real-token-123456"));
}
