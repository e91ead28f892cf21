//! Every row of the decision order (SPEC 4.3), with class rules and container overrides.

use std::sync::Arc;

use super::decide::{NamedHandler, Verdict};
use super::*;

fn host(s: &str) -> CanonicalHost {
    CanonicalHost::parse(s).unwrap()
}

fn list(items: &[&str]) -> Option<HostList> {
    Some(HostList::parse(items).unwrap())
}

fn by_host(keys: &[&str]) -> ByHost<()> {
    ByHost::new(keys.iter().map(|k| (HostPattern::parse(k).unwrap(), ())).collect())
}

fn named(name: &str) -> Arc<NamedHandler> {
    Arc::new(NamedHandler { name: name.into(), params: Some(serde_json::json!({"n": name})) })
}

fn class() -> ClassPolicy {
    ClassPolicy { enable_internet: true, ..Default::default() }
}

fn step(h: &str, c: &ClassPolicy, o: Option<&Overrides>) -> (u8, Decision) {
    let v = decide(&host(h), 80, c, o);
    (v.step, v.decision)
}

#[test]
fn step1_denied_beats_everything() {
    let c = ClassPolicy {
        denied: list(&["*.evil.example"]),
        allowed: list(&["*"]),
        by_host: by_host(&["x.evil.example"]),
        has_outbound: true,
        ..class()
    };
    assert_eq!(step("x.evil.example", &c, None), (1, Decision::Deny(DenyReason::DeniedHost)));
    assert_eq!(step("ok.example", &c, None), (6, Decision::Handler(HandlerChoice::ClassOutbound)));
}

#[test]
fn step2_allowed_gate_and_empty_list() {
    let c = ClassPolicy { allowed: list(&["api.example.com"]), ..class() };
    assert_eq!(step("other.example.com", &c, None), (2, Decision::Deny(DenyReason::NotAllowed)));
    assert_eq!(step("api.example.com", &c, None), (7, Decision::Egress));
    let empty = ClassPolicy { allowed: list(&[]), ..class() };
    assert_eq!(step("api.example.com", &empty, None), (2, Decision::Deny(DenyReason::NotAllowed)));
}

#[test]
fn steps_3_to_6_handler_precedence() {
    let c = ClassPolicy { by_host: by_host(&["api.example.com", "*.example.com"]), has_outbound: true, ..class() };
    let mut o = Overrides::default();
    o.by_host.upsert(HostPattern::parse("*.example.com").unwrap(), named("inst"));
    o.outbound = Some(named("catchall"));
    // Instance per-host beats class exact match.
    match step("api.example.com", &c, Some(&o)) {
        (3, Decision::Handler(HandlerChoice::InstanceByHost { key, handler })) => {
            assert_eq!(key, "*.example.com");
            assert_eq!(handler.name, "inst");
        }
        other => panic!("{other:?}"),
    }
    // Class per-host beats the instance catch-all.
    let no_inst_host = Overrides { outbound: Some(named("catchall")), ..Default::default() };
    assert_eq!(
        step("api.example.com", &c, Some(&no_inst_host)),
        (4, Decision::Handler(HandlerChoice::ClassByHost { key: "api.example.com".into() }))
    );
    // Instance catch-all beats the class catch-all.
    assert_eq!(
        step("other.test", &c, Some(&no_inst_host)),
        (5, Decision::Handler(HandlerChoice::InstanceOutbound(named("catchall"))))
    );
    assert_eq!(step("other.test", &c, None), (6, Decision::Handler(HandlerChoice::ClassOutbound)));
}

#[test]
fn steps_7_8_9() {
    assert_eq!(step("a.test", &class(), None), (8, Decision::Egress));
    let off = ClassPolicy { enable_internet: false, ..Default::default() };
    assert_eq!(step("a.test", &off, None), (9, Decision::Deny(DenyReason::InternetDisabled)));
    let off_allowed = ClassPolicy { allowed: list(&["a.test"]), ..off };
    assert_eq!(step("a.test", &off_allowed, None), (7, Decision::Egress));
}

#[test]
fn instance_lists_replace_class_lists() {
    let c = ClassPolicy { allowed: list(&["a.test"]), denied: list(&["b.test"]), ..class() };
    let o = Overrides { allowed: list(&["b.test"]), denied: list(&[]), ..Default::default() };
    assert_eq!(step("b.test", &c, Some(&o)), (7, Decision::Egress));
    assert_eq!(step("a.test", &c, Some(&o)).1, Decision::Deny(DenyReason::NotAllowed));
}

#[test]
fn by_host_choice_rule() {
    let c = ClassPolicy {
        by_host: by_host(&["*", "*.com", "*.example.com", "api.example.com:80", "api.example.com"]),
        ..class()
    };
    let key = |h: &str, port: u16| match decide(&host(h), port, &c, None).decision {
        Decision::Handler(HandlerChoice::ClassByHost { key }) => key,
        d => panic!("{d:?}"),
    };
    assert_eq!(key("api.example.com", 80), "api.example.com:80");
    assert_eq!(key("api.example.com", 8080), "api.example.com");
    assert_eq!(key("www.example.com", 80), "*.example.com");
    assert_eq!(key("x.com", 80), "*.com");
    assert_eq!(key("x.org", 80), "*");
}

#[test]
fn tunnel_skips_handlers() {
    let c =
        ClassPolicy { by_host: by_host(&["a.test"]), has_outbound: true, enable_internet: false, ..Default::default() };
    assert_eq!(decide_tunnel(&host("a.test"), 443, &c, None).decision, Decision::Deny(DenyReason::InternetDisabled));
    let allowed = ClassPolicy { allowed: list(&["a.test:443"]), ..c };
    assert_eq!(decide_tunnel(&host("a.test"), 443, &allowed, None), Verdict { step: 7, decision: Decision::Egress });
    assert_eq!(decide_tunnel(&host("a.test"), 8443, &allowed, None).step, 2);
}
