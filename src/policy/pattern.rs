//! Host patterns (SPEC 4.2): globs, IP literals, CIDRs, each optionally with `:port`.

use std::cmp::Ordering;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::host::{CanonicalHost, parse_port};

/// One validated entry of `allowedHosts`, `deniedHosts`, an `outboundByHost` key or a runtime
/// setter argument. Keeps the text the user wrote for messages and exact-string removal.
#[derive(Clone, Debug)]
pub struct HostPattern {
    raw: String,
    kind: PatternKind,
    port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PatternKind {
    /// A canonical DNS name, matched exactly.
    Exact(String),
    /// A name with `*` wildcards; `*` matches any run of characters, dots included.
    Glob(Glob),
    /// An IP literal.
    Ip(IpAddr),
    /// An IP network.
    Cidr(IpNet),
}

/// Why a pattern was refused, for the script-load or admin error message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid host pattern {pattern:?}: {why}")]
pub struct InvalidPattern {
    pub pattern: String,
    pub why: &'static str,
}

impl HostPattern {
    pub fn parse(raw: &str) -> Result<Self, InvalidPattern> {
        let err = |why| InvalidPattern { pattern: raw.to_string(), why };
        let text = raw.trim();
        if text.is_empty() {
            return Err(err("empty pattern"));
        }
        if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(err("contains spaces or control characters"));
        }
        // A URL pasted in place of a host: say what to write instead of "bad port".
        if text.contains("://") {
            return Err(err("a pattern is a host, not a URL: drop the scheme and path"));
        }
        let (host, port) = split_pattern_port(text).ok_or_else(|| err("bad port"))?;
        let kind = if let Ok(net) = host.parse::<IpNet>() {
            PatternKind::Cidr(canonical_net(net))
        } else if let Some((before, _)) = host.split_once('/') {
            if before.parse::<std::net::IpAddr>().is_err() {
                return Err(err("a pattern is a host, not a URL: drop the path"));
            }
            return Err(err("bad CIDR"));
        } else if host.contains('*') {
            PatternKind::Glob(Glob::new(&canonical_glob_text(host).ok_or_else(|| err("bad glob"))?))
        } else {
            match CanonicalHost::parse(host).map_err(|_| err("not a valid host name or IP"))? {
                CanonicalHost::Ip(ip) => PatternKind::Ip(ip),
                CanonicalHost::Name(n) => PatternKind::Exact(n),
            }
        };
        Ok(Self { raw: raw.to_string(), kind, port })
    }

    /// The text as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The port this pattern is limited to, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Does the request's host and port match?
    pub fn matches(&self, host: &CanonicalHost, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.kind, host) {
            (PatternKind::Exact(p), CanonicalHost::Name(n)) => p == n,
            (PatternKind::Glob(g), CanonicalHost::Name(n)) => g.matches(n),
            (PatternKind::Glob(g), CanonicalHost::Ip(ip)) => g.matches(&ip.to_string()),
            (PatternKind::Ip(p), CanonicalHost::Ip(ip)) => p == ip,
            (PatternKind::Cidr(net), CanonicalHost::Ip(ip)) => net.contains(ip),
            _ => false,
        }
    }

    /// The network an IP or CIDR pattern covers (for the dial-time address check, SPEC 8.3).
    pub fn ip_net(&self) -> Option<IpNet> {
        match &self.kind {
            PatternKind::Ip(ip) => Some(IpNet::from(*ip)),
            PatternKind::Cidr(net) => Some(*net),
            _ => None,
        }
    }

    /// Does an IP or CIDR pattern cover this dialled address?
    pub fn covers_addr(&self, ip: IpAddr, port: u16) -> bool {
        self.port.is_none_or(|p| p == port) && self.ip_net().is_some_and(|n| n.contains(&ip))
    }

    /// Order among matching `outboundByHost` keys (SPEC 4.2): exact key first, then the glob
    /// with the most literal characters (a CIDR counts its prefix bits), then the
    /// port-qualified one, then byte order of the key. `Less` means "chosen first".
    pub fn precedence(&self, other: &Self) -> Ordering {
        let rank = |p: &Self| match &p.kind {
            PatternKind::Exact(_) | PatternKind::Ip(_) => (0u8, 0usize),
            PatternKind::Glob(g) => (1, usize::MAX - g.literal_len()),
            PatternKind::Cidr(n) => (1, usize::MAX - usize::from(n.prefix_len())),
        };
        rank(self)
            .cmp(&rank(other))
            .then_with(|| other.port.is_some().cmp(&self.port.is_some()))
            .then_with(|| self.raw.as_bytes().cmp(other.raw.as_bytes()))
    }

    /// The canonical name of an exact-name pattern without port: lets tables index it.
    pub fn exact_name(&self) -> Option<&str> {
        match (&self.kind, self.port) {
            (PatternKind::Exact(n), None) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Splits `host[:port]`, `[v6][:port]`, a bare IPv6 (`::1`, `fd00::/8`) or `CIDR:port`.
fn split_pattern_port(text: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let end = rest.find(']')?;
        let (inner, after) = (&rest[..end], &rest[end + 1..]);
        return match after {
            "" => Some((inner, None)),
            _ => Some((inner, Some(parse_port(after.strip_prefix(':')?)?))),
        };
    }
    match text.matches(':').count() {
        0 => Some((text, None)),
        1 => {
            let (h, p) = text.split_once(':')?;
            Some((h, Some(parse_port(p)?)))
        }
        _ => Some((text, None)), // bare IPv6 or IPv6 CIDR; a port needs brackets
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) if v6.prefix_len() >= 96 => {
                IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map(|n| n.trunc()).unwrap_or(net)
            }
            _ => net.trunc(),
        },
        IpNet::V4(_) => net.trunc(),
    }
}

/// Lower-cases a glob and turns each non-wildcard Unicode label into punycode so that
/// `*.bücher.example` matches the canonical `a.xn--bcher-kva.example`.
fn canonical_glob_text(text: &str) -> Option<String> {
    let text = text.trim_end_matches('.');
    let mut labels = Vec::new();
    for label in text.split('.') {
        if label.contains('*') || label.is_ascii() {
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'*')) {
                return None;
            }
            labels.push(label.to_ascii_lowercase());
        } else {
            labels.push(url::Host::parse(label).ok()?.to_string());
        }
    }
    Some(labels.join("."))
}

/// A `*`-only glob. Chosen over globset because host patterns have exactly one wildcard
/// and no path semantics; matching is a prefix/suffix/in-order search with no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Glob {
    /// The literal runs between `*`s; the first is a required prefix, the last a suffix.
    parts: Vec<String>,
}

impl Glob {
    fn new(text: &str) -> Self {
        Self { parts: text.split('*').map(str::to_string).collect() }
    }

    fn literal_len(&self) -> usize {
        self.parts.iter().map(String::len).sum()
    }

    fn matches(&self, s: &str) -> bool {
        let (first, rest) = self.parts.split_first().expect("split yields one part at least");
        let Some((last, middle)) = rest.split_last() else {
            return s == first; // no `*` at all
        };
        if s.len() < first.len() + last.len() || !s.starts_with(first.as_str()) || !s.ends_with(last.as_str()) {
            return false;
        }
        let mut window = &s[first.len()..s.len() - last.len()];
        for part in middle {
            match window.find(part.as_str()) {
                Some(i) => window = &window[i + part.len()..],
                None => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> CanonicalHost {
        CanonicalHost::parse(s).unwrap()
    }
    fn m(p: &str, h: &str, port: u16) -> bool {
        HostPattern::parse(p).unwrap().matches(&host(h), port)
    }

    #[test]
    fn globs() {
        assert!(m("*.example.com", "a.example.com", 80));
        assert!(m("*.example.com", "a.b.example.com", 80));
        assert!(!m("*.example.com", "example.com", 80));
        assert!(!m("*.example.com", "badexample.com", 80));
        assert!(m("*", "anything.at.all", 1));
        assert!(m("api.*.example.com", "api.eu.example.com", 443));
        assert!(!m("api.*.example.com", "api.example.com", 443));
        assert!(m("*.EXAMPLE.com.", "x.example.com", 80));
        assert!(m("*.bücher.example", "a.xn--bcher-kva.example", 80));
        assert!(m("a*b*c", "abc", 80));
        assert!(!m("a*b*c", "acb", 80));
    }

    #[test]
    fn exact_and_ports() {
        assert!(m("API.example.com", "api.example.com", 80));
        assert!(m("api.example.com:443", "api.example.com", 443));
        assert!(!m("api.example.com:443", "api.example.com", 80));
        assert!(m("[::1]:8080", "::1", 8080));
        assert!(!m("[::1]:8080", "::1", 8081));
        assert!(m("::1", "[::1]", 1));
    }

    #[test]
    fn ips_and_cidrs() {
        assert!(m("10.0.0.0/8", "10.1.2.3", 80));
        assert!(!m("10.0.0.0/8", "11.1.2.3", 80));
        assert!(m("fd00::/8", "[fd12::1]", 80));
        assert!(m("127.0.0.1", "2130706433", 80));
        assert!(m("::ffff:127.0.0.1", "127.0.0.1", 80));
        assert!(m("10.0.0.0/8:443", "10.9.9.9", 443));
        assert!(!m("10.0.0.0/8:443", "10.9.9.9", 80));
        assert!(!m("10.0.0.0/8", "ten.example", 80));
        assert!(m("169.254.169.254", "169.254.169.254", 80));
    }

    #[test]
    fn bad_patterns() {
        for bad in ["", "a b", "[::1", "a.com:0", "a.com:x", "10.0.0.0/33", "a/b", "a..b", "*.ex!ample.com"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        // A pasted URL is told apart from a bad port or CIDR.
        for url in ["https://api.github.com", "api.github.com/", "api.github.com/v1/x"] {
            assert!(HostPattern::parse(url).unwrap_err().why.contains("not a URL"), "{url}");
        }
        assert_eq!(HostPattern::parse("10.0.0.0/33").unwrap_err().why, "bad CIDR");
    }

    #[test]
    fn precedence_order() {
        let mut keys: Vec<HostPattern> =
            ["*", "*.example.com", "api.example.com", "*.com", "api.example.com:443", "*.example.com:443"]
                .iter()
                .map(|k| HostPattern::parse(k).unwrap())
                .collect();
        keys.sort_by(|a, b| a.precedence(b));
        let order: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            order,
            ["api.example.com:443", "api.example.com", "*.example.com:443", "*.example.com", "*.com", "*"]
        );
    }
}
