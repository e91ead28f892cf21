//! Canonical hosts (SPEC 4.1): the one spelling of a host that every match and every dial uses.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// A request's host after canonicalisation: lower case, no trailing dots, IDN as punycode,
/// every numeric IPv4 form as a dotted quad, IPv6 compressed, IPv4-mapped IPv6 as IPv4.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CanonicalHost {
    /// A DNS name, ASCII lower case (punycode for IDN).
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

/// Why a host could not be canonicalised; the request gets a 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid host {0:?}")]
pub struct InvalidHost(pub String);

impl CanonicalHost {
    /// Canonicalises a host as it appears in a URL authority, a CONNECT target or a Host
    /// header (without port). IPv6 may be bracketed or bare.
    pub fn parse(raw: &str) -> Result<Self, InvalidHost> {
        let bad = || InvalidHost(raw.to_string());
        if raw.is_empty() || raw.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad());
        }
        if let Some(inner) = raw.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(bad)?;
            let v6: Ipv6Addr = inner.parse().map_err(|_| bad())?;
            return Ok(Self::Ip(IpAddr::V6(v6).to_canonical()));
        }
        if raw.contains(']') {
            return Err(bad());
        }
        if raw.contains(':') {
            let v6: Ipv6Addr = raw.parse().map_err(|_| bad())?;
            return Ok(Self::Ip(IpAddr::V6(v6).to_canonical()));
        }
        let trimmed = raw.trim_end_matches('.');
        if trimmed.is_empty() {
            return Err(bad());
        }
        // Fast paths: a dotted-quad IPv4, or an already-canonical DNS name (lower-case LDH
        // labels, last label not numeric), needs none of the WHATWG machinery below.
        if let Ok(v4) = trimmed.parse::<std::net::Ipv4Addr>() {
            return Ok(Self::Ip(IpAddr::V4(v4)));
        }
        // An already-canonical DNS name (lower-case LDH labels, last label not
        // numeric) needs none of the WHATWG machinery below.
        if is_plain_name(trimmed) {
            validate_dns_name(trimmed).map_err(|_| bad())?;
            return Ok(Self::Name(trimmed.to_string()));
        }
        // The WHATWG host parser does IDNA, lower-casing and every IPv4 number form
        // (decimal, hex, octal, short forms), exactly as browsers and Workers' URL do.
        match url::Host::parse(trimmed).map_err(|_| bad())? {
            url::Host::Ipv4(v4) => Ok(Self::Ip(IpAddr::V4(v4))),
            url::Host::Ipv6(v6) => Ok(Self::Ip(IpAddr::V6(v6).to_canonical())),
            url::Host::Domain(name) => {
                validate_dns_name(&name).map_err(|_| bad())?;
                Ok(Self::Name(name))
            }
        }
    }

    /// Appends the host as it appears in a URL (IPv6 in brackets).
    pub fn push_url_host(&self, out: &mut String) {
        use std::fmt::Write;
        match self {
            Self::Name(n) => out.push_str(n),
            Self::Ip(IpAddr::V4(v4)) => push_ipv4(out, *v4),
            Self::Ip(IpAddr::V6(v6)) => {
                let _ = write!(out, "[{v6}]");
            }
        }
    }

    /// The IP address, when the host is a literal.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Ip(ip) => Some(*ip),
            Self::Name(_) => None,
        }
    }
}

impl fmt::Display for CanonicalHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Ip(IpAddr::V4(v4)) => {
                let mut s = String::with_capacity(15);
                push_ipv4(&mut s, *v4);
                f.write_str(&s)
            }
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Appends `n` in decimal (see [`crate::units::decimal`]).
pub fn push_decimal(out: &mut String, n: u32) {
    out.push_str(crate::units::decimal(u64::from(n), &mut [0; 20]));
}

/// Appends `ip` in dotted decimal (what `Ipv4Addr`'s `Display` writes).
fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_decimal(out, u32::from(octet));
    }
}

/// Lower-case ASCII letters, digits, `-`, `_` and dots, not `xn--` anywhere (punycode must be
/// validated by IDNA), with a last label that is not all digits or hex-looking (those are IPv4
/// number forms in WHATWG parsing).
fn is_plain_name(s: &str) -> bool {
    let ok_bytes = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if !ok_bytes || s.contains("xn--") {
        return false;
    }
    let last = s.rsplit('.').next().unwrap_or("");
    !last.is_empty() && !last.bytes().all(|b| b.is_ascii_digit()) && !last.starts_with("0x")
}

/// Checks the label syntax that DNS can carry: 1–63 bytes of `[a-z0-9_-]` per label, 253 in all.
/// `_` is accepted because real service names use it (`_acme-challenge`).
fn validate_dns_name(name: &str) -> Result<(), ()> {
    if name.len() > 253 {
        return Err(());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
            return Err(());
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
            return Err(());
        }
    }
    Ok(())
}

/// Splits an authority (`host`, `host:port`, `[v6]:port`) into host and optional port.
/// Userinfo is refused: a proxy target never carries credentials in its authority.
pub fn split_authority(authority: &str) -> Result<(&str, Option<u16>), InvalidHost> {
    let bad = || InvalidHost(authority.to_string());
    if authority.contains('@') {
        return Err(bad());
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']').ok_or_else(bad)?;
        let (h, rest) = authority.split_at(end + 1);
        match rest {
            "" => (h, None),
            _ => (h, Some(rest.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err(bad()),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(parse_port(p).ok_or_else(bad)?),
    };
    Ok((host, port))
}

/// A port: 1–65535, decimal digits only (no sign, no spaces).
pub fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_and_numbers_are_written_as_std_writes_them() {
        for ip in ["0.0.0.0", "127.0.0.1", "10.20.30.40", "255.255.255.255", "1.2.3.4", "192.168.100.9"] {
            let v4: std::net::Ipv4Addr = ip.parse().unwrap();
            let mut out = String::new();
            super::push_ipv4(&mut out, v4);
            assert_eq!(out, ip);
            assert_eq!(super::CanonicalHost::Ip(v4.into()).to_string(), ip);
        }
        for n in [0u32, 7, 10, 99, 443, 8080, 65535, u32::MAX] {
            let mut out = String::new();
            super::push_decimal(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    use super::*;

    fn canon(s: &str) -> String {
        CanonicalHost::parse(s).unwrap().to_string()
    }

    #[test]
    fn ipv4_number_forms() {
        for form in ["127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "127.0.0.1."] {
            assert_eq!(canon(form), "127.0.0.1", "{form}");
        }
    }

    #[test]
    fn ipv6_forms() {
        assert_eq!(canon("[::ffff:127.0.0.1]"), "127.0.0.1");
        assert_eq!(canon("::ffff:7f00:1"), "127.0.0.1");
        assert_eq!(canon("[0:0:0:0:0:0:0:1]"), "::1");
        let mut url_host = String::new();
        CanonicalHost::parse("[::1]").unwrap().push_url_host(&mut url_host);
        assert_eq!(url_host, "[::1]");
    }

    #[test]
    fn names() {
        assert_eq!(canon("API.Example.COM."), "api.example.com");
        assert_eq!(canon("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(canon("_acme.example.com"), "_acme.example.com");
    }

    #[test]
    fn junk_is_refused() {
        for bad in ["", ".", "a..b", "[::1", "::1]", "a b", "a\0b", "[zz]", "x]", "-", "a/b", "256.256.256.256.1"] {
            assert!(CanonicalHost::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.com:8080").unwrap(), ("a.com", Some(8080)));
        assert_eq!(split_authority("[::1]:443").unwrap(), ("[::1]", Some(443)));
        assert_eq!(split_authority("[::1]").unwrap(), ("[::1]", None));
        assert!(split_authority("u:p@a.com").is_err());
        assert!(split_authority("a.com:0").is_err());
        assert!(split_authority("a.com:+80").is_err());
        assert!(split_authority("a.com:99999").is_err());
    }
}
