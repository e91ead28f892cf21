//! The dial-time address check (SPEC 8.3): which resolved addresses egress may dial.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::policy::HostList;

/// Why an address may not be dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// In a special range (loopback, private, …) and no `allowedHosts` IP/CIDR covers it.
    Special(&'static str),
    /// Inside a `deniedHosts` IP/CIDR.
    Denied,
    /// One of moat's own listeners (SPEC 8.4).
    OwnListener,
}

/// What egress checks every resolved address against.
pub struct AddressRules<'a> {
    pub allowed: Option<&'a HostList>,
    pub denied: Option<&'a HostList>,
    pub own: &'a [SocketAddr],
}

impl AddressRules<'_> {
    /// Checks one address about to be dialled on `port`.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), Refusal> {
        let ip = ip.to_canonical();
        if is_own_listener(self.own, ip, port) {
            return Err(Refusal::OwnListener);
        }
        if self.denied.is_some_and(|d| d.covers_addr(ip, port)) {
            return Err(Refusal::Denied);
        }
        match special_range(ip) {
            Some(kind) if !self.allowed.is_some_and(|a| a.covers_addr(ip, port)) => Err(Refusal::Special(kind)),
            _ => Ok(()),
        }
    }
}

/// Is `ip:port` one of moat's listeners? A listener on an unspecified address (0.0.0.0, ::)
/// takes every local address, so any special-range address with its port counts.
pub fn is_own_listener(own: &[SocketAddr], ip: IpAddr, port: u16) -> bool {
    let ip = ip.to_canonical();
    own.iter().any(|l| {
        l.port() == port && (l.ip().to_canonical() == ip || (l.ip().is_unspecified() && special_range(ip).is_some()))
    })
}

/// Did a connection just made (`local` → `peer`) reach one of moat's wildcard listeners?
/// The address check cannot know every address of the host (its public ones), but the
/// kernel can: a connection to one of the host's own addresses gets that address as its
/// source. So `local.ip() == peer.ip()` on the port of a listener bound to 0.0.0.0 / `::` is
/// moat itself. (A listener on a fixed address is matched before dialling.)
pub fn reached_own_listener(own: &[SocketAddr], local: SocketAddr, peer: SocketAddr) -> bool {
    let (local_ip, peer_ip) = (local.ip().to_canonical(), peer.ip().to_canonical());
    local_ip == peer_ip
        && own.iter().any(|l| {
            l.port() == peer.port()
                && match l.ip() {
                    // 0.0.0.0 takes IPv4 only; `::` is dual-stack unless IPV6_V6ONLY.
                    IpAddr::V4(v4) => v4.is_unspecified() && peer_ip.is_ipv4(),
                    IpAddr::V6(v6) => v6.is_unspecified(),
                }
        })
}

/// The special range an address is in, if any: these are never dialled unless allowed by an
/// explicit IP/CIDR entry, because they reach the host, its network, or the cloud's metadata.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    let kind = match o {
        [0, ..] => "unspecified",
        [127, ..] => "loopback",
        [10, ..] | [192, 168, ..] => "private",
        [172, b, ..] if (16..=31).contains(&b) => "private",
        [100, b, ..] if (64..=127).contains(&b) => "shared (CGNAT)",
        [169, 254, ..] => "link-local",
        [192, 0, 0, _] => "IETF protocol assignment",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation",
        [198, 18 | 19, ..] => "benchmarking",
        [192, 88, 99, _] => "6to4 relay",
        [a, ..] if (224..=239).contains(&a) => "multicast",
        [a, ..] if a >= 240 => "reserved or broadcast",
        _ => return None,
    };
    Some(kind)
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    let embedded_v4 = |a: u16, b: u16| Ipv4Addr::new((a >> 8) as u8, a as u8, (b >> 8) as u8, b as u8);
    match s {
        // NAT64 (RFC 6052 well-known and local-use prefixes): the last 32 bits are IPv4.
        [0x64, 0xff9b, 0, 0, 0, 0, a, b] | [0x64, 0xff9b, 1, _, _, _, a, b] => {
            special_v4(embedded_v4(a, b)).map(|_| "NAT64 embedding of a special IPv4 address")
        }
        // 6to4 (RFC 3056): bits 16..48 are IPv4.
        [0x2002, a, b, ..] => special_v4(embedded_v4(a, b)).map(|_| "6to4 embedding of a special IPv4 address"),
        // Teredo (RFC 4380): the client's IPv4 is the last 32 bits, inverted.
        [0x2001, 0, _, _, _, _, a, b] => {
            special_v4(embedded_v4(!a, !b)).map(|_| "Teredo embedding of a special IPv4 address")
        }
        [0x2001, 0xdb8, ..] => Some("documentation"),
        [0x0100, 0, 0, 0, ..] => Some("discard-only"),
        [a, ..] if a & 0xfe00 == 0xfc00 => Some("private (ULA)"),
        [a, ..] if a & 0xffc0 == 0xfe80 => Some("link-local"),
        [a, ..] if a & 0xff00 == 0xff00 => Some("multicast"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_connection_to_the_hosts_own_address_on_a_wildcard_listeners_port_is_moat() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let wildcard = [sa("0.0.0.0:3128")];
        // The host's public address: the source the kernel picked is the destination.
        assert!(reached_own_listener(&wildcard, sa("203.0.113.5:40000"), sa("203.0.113.5:3128")));
        // Another machine, or another port of this one.
        assert!(!reached_own_listener(&wildcard, sa("203.0.113.5:40000"), sa("198.51.100.7:3128")));
        assert!(!reached_own_listener(&wildcard, sa("203.0.113.5:40000"), sa("203.0.113.5:8080")));
        // A listener on a fixed address is the pre-dial check's, and 0.0.0.0 is IPv4 only.
        assert!(!reached_own_listener(&[sa("127.0.0.1:3128")], sa("203.0.113.5:1"), sa("203.0.113.5:3128")));
        assert!(!reached_own_listener(&wildcard, sa("[2001:db8::1]:1"), sa("[2001:db8::1]:3128")));
        assert!(reached_own_listener(&[sa("[::]:3128")], sa("[2001:db8::1]:1"), sa("[2001:db8::1]:3128")));
        assert!(reached_own_listener(&[sa("[::]:3128")], sa("[::ffff:203.0.113.5]:1"), sa("203.0.113.5:3128")));
    }

    #[test]
    fn special_ranges() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "ff02::1",
        ] {
            assert!(special_range(ip(s)).is_some(), "{s}");
        }
        for s in ["93.184.216.34", "2606:4700::1111", "172.32.0.1", "64:ff9b::5db8:d822"] {
            assert!(special_range(ip(s)).is_none(), "{s}");
        }
    }

    #[test]
    fn allowed_cidr_opens_a_special_range_but_denied_wins() {
        let allowed = HostList::parse(&["127.0.0.0/8"]).unwrap();
        let denied = HostList::parse(&["127.0.0.2"]).unwrap();
        let own = ["127.0.0.1:3128".parse().unwrap()];
        let rules = AddressRules { allowed: Some(&allowed), denied: Some(&denied), own: &own };
        assert_eq!(rules.check(ip("127.0.0.1"), 80), Ok(()));
        assert_eq!(rules.check(ip("127.0.0.2"), 80), Err(Refusal::Denied));
        assert_eq!(rules.check(ip("127.0.0.1"), 3128), Err(Refusal::OwnListener));
        assert_eq!(rules.check(ip("10.0.0.1"), 80), Err(Refusal::Special("private")));
        let none = AddressRules { allowed: None, denied: None, own: &[] };
        assert_eq!(none.check(ip("::ffff:127.0.0.1"), 80), Err(Refusal::Special("loopback")));
        assert_eq!(none.check(ip("93.184.216.34"), 80), Ok(()));
    }
}
