//! Compiled, immutable host lists and by-host tables: Rust data built once per generation
//! (or per runtime override) so that deciding never touches Lua.

use std::net::IpAddr;

use super::host::CanonicalHost;
use super::pattern::{HostPattern, InvalidPattern};

/// `allowedHosts` or `deniedHosts`: a list of patterns. An empty list matches nothing.
#[derive(Clone, Debug, Default)]
pub struct HostList {
    patterns: Vec<HostPattern>,
}

impl HostList {
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, InvalidPattern> {
        let patterns = items.iter().map(|s| HostPattern::parse(s.as_ref())).collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    pub fn from_patterns(patterns: Vec<HostPattern>) -> Self {
        Self { patterns }
    }

    pub fn matches(&self, host: &CanonicalHost, port: u16) -> bool {
        self.patterns.iter().any(|p| p.matches(host, port))
    }

    /// Does an IP/CIDR entry cover this dialled address (SPEC 8.3)?
    pub fn covers_addr(&self, ip: IpAddr, port: u16) -> bool {
        self.patterns.iter().any(|p| p.covers_addr(ip, port))
    }

    /// Is there an entry that names this host and exactly this port (raw TCP rule, SPEC 5.1)?
    pub fn names_port(&self, host: &CanonicalHost, port: u16) -> bool {
        self.patterns.iter().any(|p| p.port() == Some(port) && p.matches(host, port))
    }

    pub fn patterns(&self) -> &[HostPattern] {
        &self.patterns
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// An `outboundByHost` map: patterns to values, kept in choice order (SPEC 4.2) so that the
/// first match is the chosen one.
#[derive(Clone, Debug)]
pub struct ByHost<T> {
    entries: Vec<(HostPattern, T)>,
}

impl<T> Default for ByHost<T> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<T> ByHost<T> {
    pub fn new(mut entries: Vec<(HostPattern, T)>) -> Self {
        entries.sort_by(|a, b| a.0.precedence(&b.0));
        Self { entries }
    }

    /// The chosen entry for this host and port, if any key matches.
    pub fn find(&self, host: &CanonicalHost, port: u16) -> Option<(&HostPattern, &T)> {
        self.entries.iter().find(|(p, _)| p.matches(host, port)).map(|(p, v)| (p, v))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HostPattern, &T)> {
        self.entries.iter().map(|(p, v)| (p, v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Inserts or replaces the entry whose key text is `pattern`'s.
    pub fn upsert(&mut self, pattern: HostPattern, value: T) {
        self.entries.retain(|(p, _)| p.as_str() != pattern.as_str());
        self.entries.push((pattern, value));
        self.entries.sort_by(|a, b| a.0.precedence(&b.0));
    }

    /// Removes the entry whose key text is exactly `key`; true if there was one.
    pub fn remove(&mut self, key: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(p, _)| p.as_str() != key);
        before != self.entries.len()
    }
}
