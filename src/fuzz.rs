//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer), each with the
//! properties it checks; the seed corpora in `fuzz/corpus/` are replayed by this module's
//! tests on stable, so every input that once crashed stays a test. Not part of moat's API.
//!
//! Run one: `cargo +nightly fuzz run http_head` (see fuzz/README.md).

use std::sync::OnceLock;

use crate::policy::{CanonicalHost, HostPattern};
use crate::proxy::h1::{ConnReader, Framing, HeadError, Pace, parse_request_head};
use crate::proxy::sniff::{Sniffed, classify};

/// A fuzz target: takes any bytes, panics only when a property it checks fails.
pub type Target = fn(&[u8]);

/// Every fuzz target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 8] = [
    ("http_head", http_head),
    ("chunked_body", chunked_body),
    ("tunnel_first_bytes", tunnel_first_bytes),
    ("canonical_host", canonical_host),
    ("host_pattern", host_pattern),
    ("config_toml", config_toml),
    ("stdlib_codecs", stdlib_codecs),
    ("url_new", url_new),
];

/// The HTTP/1.1 head parser and its framing decision: never a panic; what it accepts has
/// one framing, at most one Host, a version of 1.0 or 1.1, and no control bytes in the target.
pub fn http_head(data: &[u8]) {
    match parse_request_head(data, 64 * 1024) {
        Ok(Some((head, used))) => {
            assert!(used <= data.len());
            let te = head.headers.contains_key(http::header::TRANSFER_ENCODING);
            let cl = head.headers.contains_key(http::header::CONTENT_LENGTH);
            assert!(!(te && cl), "both framings accepted");
            assert_eq!(te, head.framing == Framing::Chunked);
            assert!(head.headers.get_all(http::header::HOST).iter().count() <= 1);
            assert!(head.target.bytes().all(|b| b > b' ' && b != 0x7f), "control byte in target");
            assert!(matches!(head.version, http::Version::HTTP_10 | http::Version::HTTP_11));
        }
        Ok(None) | Err(HeadError::Bad(_) | HeadError::TooLarge(_)) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"))
}

/// The chunked body decoder: never a panic; a body it completes is exactly the sum of its
/// chunks, each size made of hex digits only.
pub fn chunked_body(data: &[u8]) {
    runtime().block_on(async {
        let mut reader = ConnReader::new(data);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let pace = Pace { stall: std::time::Duration::from_secs(1), min_rate: 0, grace: std::time::Duration::ZERO };
        let pump = reader.pump_body(Framing::Chunked, tx, pace);
        let collect = async {
            let mut total = 0usize;
            let mut failed = false;
            while let Some(item) = rx.recv().await {
                match item {
                    Ok(b) => total += b.len(),
                    Err(_) => failed = true,
                }
            }
            (total, failed)
        };
        let (pumped, (total, failed)) = tokio::join!(pump, collect);
        match pumped {
            Ok(complete) => {
                assert!(complete && !failed);
                assert!(total <= data.len());
            }
            Err(_) => assert!(failed, "a failed body must reach its reader as a failure"),
        }
    });
}

/// The tunnel classifier: never a panic, and once the bytes seen decide, more bytes do not
/// change the decision (moat decides on a prefix).
pub fn tunnel_first_bytes(data: &[u8]) {
    let mut decided = None;
    for end in 0..=data.len().min(64) {
        let now = classify(&data[..end]);
        if let Some(d) = &decided {
            assert_eq!(&now, d, "decision changed at {end} bytes");
        } else if now != Sniffed::NeedMore {
            decided = Some(now);
        }
    }
}

/// Host canonicalisation, differentially against the WHATWG host parser of the `url` crate:
/// a name or IPv4 address moat accepts is what `url` makes of it, and canonicalising is
/// idempotent.
pub fn canonical_host(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(ours) = CanonicalHost::parse(s) else { return };
    let again = CanonicalHost::parse(&ours.to_string()).expect("a canonical host parses");
    assert_eq!(again, ours, "not idempotent");
    if s.contains(['[', ':']) {
        return;
    }
    let theirs = url::Host::parse(s.trim_end_matches('.')).expect("url refuses a host moat accepts");
    match (&ours, theirs) {
        (CanonicalHost::Name(n), url::Host::Domain(d)) => assert_eq!(n, &d),
        (CanonicalHost::Ip(std::net::IpAddr::V4(a)), url::Host::Ipv4(b)) => assert_eq!(*a, b),
        (o, t) => panic!("moat made {o:?} of what url made {t:?}"),
    }
}

/// Host patterns: never a panic; a pattern that is itself a host (no `*`, no port) matches
/// that host on every port.
pub fn host_pattern(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (pattern, host) = s.split_once('\n').unwrap_or((s, s));
    let Ok(p) = HostPattern::parse(pattern) else { return };
    if let Ok(h) = CanonicalHost::parse(host) {
        let _ = p.matches(&h, 443);
    }
    if !pattern.contains('*')
        && let Ok(h) = CanonicalHost::parse(pattern)
    {
        assert!(p.matches(&h, 80) && p.matches(&h, 8443), "{pattern:?} does not match itself");
    }
}

/// `moat.toml` loading: never a panic, whatever the text.
pub fn config_toml(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(file) = crate::config::parse_file(s, std::path::Path::new("moat.toml")) {
        let _ = file.limits();
    }
}

/// The natives behind `moat.json`, `moat.base64`, `moat.hex`: never a panic; what decodes
/// re-encodes to a value that decodes the same.
pub fn stdlib_codecs(data: &[u8]) {
    thread_local! {
        static LUA: mlua::Lua = mlua::Lua::new();
    }
    LUA.with(|lua| {
        let natives = crate::script::api::natives::table(lua).expect("natives");
        let call = |name: &str, arg: mlua::Value| -> mlua::Result<mlua::Value> {
            natives.get::<mlua::Function>(name)?.call::<mlua::Value>(arg)
        };
        let input = mlua::Value::String(lua.create_string(data).expect("string"));
        for (decode, encode) in
            [("b64_decode", "b64_encode"), ("b64url_decode", "b64url_encode"), ("hex_decode", "hex_encode")]
        {
            if let Ok(bytes) = call(decode, input.clone()) {
                let text = call(encode, bytes.clone()).expect("encode");
                let back = call(decode, text).expect("re-decode");
                let raw = |v: &mlua::Value| v.as_string().map(|s| s.as_bytes().to_vec());
                assert_eq!(raw(&back), raw(&bytes), "{decode}");
            }
        }
        if let Ok(value) = call("json_decode", input)
            && let Ok(text) = call("json_encode", value)
        {
            call("json_decode", text).expect("moat's JSON re-decodes");
        }
    });
}

/// `URL.new(input[, base])` and its setters, as a policy calls them: never a panic; a URL
/// that parses re-parses from its `href` to the same `href` (before any setter ran). The input is split at the first
/// two newlines into input, base and a value given to every setter.
pub fn url_new(data: &[u8]) {
    use mlua::ObjectLike;
    thread_local! {
        static LUA: mlua::Lua = {
            let lua = mlua::Lua::new();
            crate::script::api::url::install(&lua).expect("URL");
            lua
        };
    }
    let Ok(s) = std::str::from_utf8(data) else { return };
    let mut parts = s.splitn(3, '\n');
    let (input, base, value) = (parts.next().unwrap_or(""), parts.next(), parts.next().unwrap_or(""));
    LUA.with(|lua| {
        let new: mlua::Function = lua.load("return URL.new").eval().expect("URL.new");
        let Ok(url) = new.call::<mlua::AnyUserData>((input, base)) else { return };
        let href: String = url.get("href").expect("href");
        let again = new.call::<mlua::AnyUserData>(href.as_str()).expect("an href re-parses");
        assert_eq!(again.get::<String>("href").expect("href"), href, "href not stable");
        for field in
            ["href", "protocol", "host", "hostname", "port", "pathname", "search", "hash", "username", "password"]
        {
            url.set(field, value).expect("a setter ignores what it cannot take");
            let _: String = url.get(field).expect("a getter answers");
        }
        let _: String = url.get("origin").expect("origin");
        let params: mlua::AnyUserData = url.get("searchParams").expect("searchParams");
        params.call_method::<()>("append", (value, input)).expect("append");
        params.call_method::<()>("set", (input, value)).expect("set");
        let _: Option<String> = params.call_method("get", value).expect("get");
        params.call_method::<()>("delete", value).expect("delete");
        // An href made by setters need not parse again: the url crate's setters can leave a
        // non-special URL whose serialization is not a URL (fuzzing found one, kept in the
        // corpus). A policy that fetches it gets a Lua error; what must hold is no panic.
        let href: String = url.get("href").expect("href");
        let _ = new.call::<mlua::AnyUserData>(href.as_str());
    });
}

#[cfg(test)]
mod tests {
    /// Replays every committed corpus entry (seeds, and inputs that once crashed) on stable.
    #[test]
    fn fuzz_corpora_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (name, target) in super::TARGETS {
            let dir = root.join(name);
            let entries: Vec<_> =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten().collect();
            assert!(!entries.is_empty(), "{name}: empty seed corpus");
            for e in entries {
                target(&std::fs::read(e.path()).unwrap());
            }
        }
    }
}
