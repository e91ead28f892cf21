//! The decision order (SPEC 4.3) and every pattern form (SPEC 4.2), through the proxy.

use crate::harness::*;

/// Each handler answers with its own name, so the response says which one ran.
fn routing_policy(upstream_port: u16) -> String {
    format!(
        r#"
deniedHosts = {{ "*.evil.test", "10.0.0.0/8", "blocked.test:8080" }}
outboundByHost = {{
  ["api.test"] = function() return Response.new("exact") end,
  ["*.api.test"] = function() return Response.new("glob") end,
  ["*.deep.api.test"] = function() return Response.new("longer-glob") end,
  ["api.test:8443"] = function() return Response.new("exact-port") end,
  ["192.0.2.7"] = function() return Response.new("ip") end,
  ["198.51.100.0/24"] = function() return Response.new("cidr") end,
  ["[2001:db8::1]:81"] = function() return Response.new("ipv6-port") end,
  ["bücher.test"] = function() return Response.new("idn") end,
  ["echo.test"] = function(request) return fetch("http://127.0.0.1:{upstream_port}/from-handler") end,
}}
function outbound(request, env, ctx) return Response.new("catch-all " .. request.url) end
"#
    )
}

#[test]
fn handler_choice_by_pattern_form() {
    let up = Upstream::start();
    let moat = Moat::start(&routing_policy(up.addr.port()));
    let cases = [
        ("http://api.test/", "exact"),
        ("http://API.Test./x", "exact"),
        ("http://v1.api.test/", "glob"),
        ("http://a.deep.api.test/", "longer-glob"),
        ("http://api.test:8443/", "exact-port"),
        ("http://192.0.2.7/", "ip"),
        ("http://3221225991/", "ip"), // 192.0.2.7 as one decimal number
        ("http://198.51.100.99/", "cidr"),
        ("http://[2001:db8::1]:81/", "ipv6-port"),
        ("http://xn--bcher-kva.test/", "idn"),
        ("http://other.test/p?q=1", "catch-all http://other.test/p?q=1"),
    ];
    for (url, want) in cases {
        let r = curl(&moat, url, &[]);
        assert_eq!((r.status, r.body.as_str()), (200, want), "{url}");
    }
    let r = curl(&moat, "http://echo.test/", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(up.last().unwrap().uri, "/from-handler");
}

#[test]
fn denied_hosts_win_over_handlers_and_never_reach_upstream() {
    let up = Upstream::start();
    let moat = Moat::start(&routing_policy(up.addr.port()));
    for url in ["http://x.evil.test/", "http://10.1.2.3/", "http://blocked.test:8080/"] {
        let r = curl(&moat, url, &[]);
        assert_eq!(r.status, 520, "{url}");
        assert_eq!(r.headers["moat-denied"], "denied-host", "{url}");
        assert_eq!(r.body, "Origin is disallowed\n");
    }
    // Port-qualified deny applies to that port only.
    assert_eq!(curl(&moat, "http://blocked.test:8081/", &[]).status, 200);
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn allowed_hosts_gate_egress_and_internet_switch() {
    let up = Upstream::start();
    let port = up.addr.port();
    let policy = r#"
enableInternet = false
allowedHosts = { "api.test", "127.0.0.1" }
"#;
    let moat = Moat::policy(policy).resolve("api.test", "127.0.0.1").start();
    // Step 7: listed host → egress (loopback is dialable because 127.0.0.1 is listed).
    let r = curl(&moat, &format!("http://api.test:{port}/echo?x=1"), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = up.last().unwrap();
    assert_eq!(seen.uri, "/echo?x=1");
    assert_eq!(seen.headers["host"], format!("api.test:{port}"));
    // Step 2: not listed → 520 not-allowed.
    let r = curl(&moat, "http://other.test/", &[]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "not-allowed"));

    // Step 9: nothing matched and the internet is off.
    let closed = Moat::start("enableInternet = false");
    let r = curl(&closed, "http://anything.test/", &[]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "internet-disabled"));
    // An empty allowedHosts list denies everything, handlers included.
    let empty =
        Moat::start(r#"allowedHosts = {} outboundByHost = { ["a.test"] = function() return Response.new("x") end }"#);
    assert_eq!(curl(&empty, "http://a.test/", &[]).headers["moat-denied"], "not-allowed");
}

#[test]
fn enable_internet_egress_still_checks_addresses() {
    let up = Upstream::start();
    // Step 8: enableInternet (default true) → egress; the address check refuses loopback.
    let moat = Moat::start("-- empty policy: enableInternet defaults to true\n");
    let r = curl(&moat, &up.url("/x"), &[]);
    assert_eq!((r.status, r.headers["moat-denied"].as_str()), (520, "blocked-address"));
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 0);
    let log = moat.wait_log("blocked-address");
    assert!(log.contains("decision=\"egress\""), "{log}");
}
