//! The bundled recipes end to end: real clients through `moat serve`, real TLS upstreams on
//! loopback named as the real services (moat resolves them to 127.0.0.1 and trusts the test
//! CA), and for AWS, botocore itself on both ends.

use std::path::Path;
use std::process::Command;

use crate::harness::*;

fn recipe(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)).unwrap()
}

/// moat serving recipe `name`, with `hosts` resolved to loopback and the test CA trusted.
fn serve(name: &str, ca: &TestCa, hosts: &[&str], secrets: &[(&str, &str)]) -> Moat {
    let mut b = Moat::policy(&recipe(name)).config(&format!("[tls]\nextra_ca = [{:?}]\n", ca.pem));
    for h in hosts {
        b = b.resolve(h, "127.0.0.1");
    }
    for (k, v) in secrets {
        b = b.secret(k, v);
    }
    b.start()
}

/// curl through moat over HTTPS, trusting moat's CA.
fn curl_https(moat: &Moat, url: &str, extra: &[&str]) -> CurlOut {
    let ca = moat.dir.path().join("data/ca.pem");
    let mut args = vec!["--cacert", ca.to_str().unwrap()];
    args.extend_from_slice(extra);
    curl_via(&format!("http://agent-1:x@{}", moat.addr), url, &args)
}

#[test]
fn github_recipe_injects_the_token_for_the_api_and_git_and_nothing_elsewhere() {
    let ca = TestCa::new();
    let up = Upstream::start_tls_for(&ca, &["api.github.com", "github.com"]);
    let port = up.addr.port();
    let moat = serve("github.lua", &ca, &["api.github.com", "github.com"], &[("GITHUB_TOKEN", "ghp_e2e_0123456789")]);
    let r = curl_https(&moat, &format!("https://api.github.com:{port}/user"), &["-H", "Authorization: Bearer fake"]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.last().unwrap().headers["authorization"], "Bearer ghp_e2e_0123456789");
    let r =
        curl_https(&moat, &format!("https://github.com:{port}/octo/repo.git/info/refs?service=git-upload-pack"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    // git's own credential for a token: x-access-token and the token, basic.
    assert_eq!(up.last().unwrap().headers["authorization"], "Basic eC1hY2Nlc3MtdG9rZW46Z2hwX2UyZV8wMTIzNDU2Nzg5");
    let seen = up.count();
    let r = curl(&moat, "http://api.github.com/user", &[]);
    assert_eq!(r.status, 403);
    assert_eq!(curl_https(&moat, "https://evil.test/", &[]).status, 520);
    assert_eq!(up.count(), seen);
    assert!(!moat.logs().contains("ghp_e2e_0123456789"));
}

#[test]
fn llm_keys_recipe_swaps_placeholders_and_refuses_the_real_key() {
    let ca = TestCa::new();
    let up = Upstream::start_tls_for(&ca, &["api.openai.com", "api.anthropic.com"]);
    let port = up.addr.port();
    let keys = [("OPENAI_API_KEY", "sk-e2e-openai-0123456789"), ("ANTHROPIC_API_KEY", "sk-ant-e2e-0123456789")];
    let moat = serve("llm-keys.lua", &ca, &["api.openai.com", "api.anthropic.com"], &keys);
    let openai = format!("https://api.openai.com:{port}/v1/chat/completions");
    let r = curl_https(&moat, &openai, &["-H", "Authorization: Bearer moat-placeholder-openai", "-d", "{}"]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.last().unwrap().headers["authorization"], "Bearer sk-e2e-openai-0123456789");
    let anthropic = format!("https://api.anthropic.com:{port}/v1/messages");
    let r = curl_https(&moat, &anthropic, &["-H", "x-api-key: moat-placeholder-anthropic", "-d", "{}"]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.last().unwrap().headers["x-api-key"], "sk-ant-e2e-0123456789");
    let seen = up.count();
    let r = curl_https(&moat, &openai, &["-H", "Authorization: Bearer sk-e2e-openai-0123456789"]);
    assert_eq!(r.status, 403, "{}", r.body);
    let r = curl(&moat, "http://api.openai.com/v1/models", &["-H", "Authorization: Bearer moat-placeholder-openai"]);
    assert_eq!(r.status, 403);
    assert_eq!(up.count(), seen);
}

#[test]
fn registries_recipe_reads_and_refuses_to_publish() {
    let ca = TestCa::new();
    let up = Upstream::start_tls_for(&ca, &["registry.npmjs.org"]);
    let url = format!("https://registry.npmjs.org:{}/left-pad", up.addr.port());
    let moat = serve("registries.lua", &ca, &["registry.npmjs.org"], &[]);
    let r = curl_https(&moat, &url, &["-H", "Authorization: Bearer npm_token"]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!up.last().unwrap().headers.contains_key("authorization"));
    let seen = up.count();
    let r = curl_https(&moat, &url, &["-X", "PUT", "-d", "{}"]);
    assert_eq!(r.status, 403);
    assert!(r.body.contains("read-only"), "{}", r.body);
    assert_eq!(up.count(), seen);
}

#[test]
fn aws_recipe_resigns_what_botocore_sends_so_that_botocore_verifies_it_with_the_real_secret() {
    if Command::new("python3").args(["-c", "import botocore"]).status().map(|s| !s.success()).unwrap_or(true) {
        assert!(std::env::var_os("MOAT_REQUIRE_BOTOCORE").is_none(), "botocore is required (pip install botocore)");
        eprintln!("skipped: python3 has no botocore");
        return;
    }
    let ca = TestCa::new();
    let (cert, key) = ca.leaf_files(&["s3.eu-west-1.amazonaws.com", "sts.eu-west-1.amazonaws.com"]);
    let (id, secret) = ("AKIDREALE2E000000000", "real/e2e/secret/0123456789abcdefghij");
    let moat = serve(
        "aws.lua",
        &ca,
        &["s3.eu-west-1.amazonaws.com", "sts.eu-west-1.amazonaws.com"],
        &[("AWS_ACCESS_KEY_ID", id), ("AWS_SECRET_ACCESS_KEY", secret)],
    );
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/helpers/aws_botocore.py");
    let out = Command::new("python3")
        .arg(helper)
        .args([cert.to_str().unwrap(), key.to_str().unwrap()])
        .arg(format!("http://{}", moat.addr))
        .arg(moat.dir.path().join("data/ca.pem"))
        .args([id, secret])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}\nmoat:\n{}", moat.logs());
    assert_eq!(
        stdout,
        "ok single PUT: UNSIGNED-PAYLOAD\n\
         ok trailer-checksum upload: STREAMING-UNSIGNED-PAYLOAD-TRAILER\n\
         ok GET single: single put body\n\
         ok GET trailer: 70000\n\
         ok presigned GET: single put body\n\
         ok STS GetCallerIdentity: arn:aws:iam::123456789012:user/real\n"
    );
    assert!(!moat.logs().contains(secret));
}
