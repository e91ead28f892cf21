//! Where a request goes (SPEC 8.2): the canonical target and origin-form path of an
//! absolute-form request, of a request inside a tunnel, and of one on a transparent
//! connection; and [`Pinned`], a connection whose owner and destination are known.

use super::h1::RequestHead;
use crate::identity::ContainerId;
use crate::policy::CanonicalHost;
use crate::policy::host::split_authority;
use crate::upstream::Target;

/// A connection pinned to one owner and one destination before its first request: HTTP
/// inside a CONNECT tunnel (plain, or intercepted TLS when `target.https`), and, with the
/// sandbox, a transparent connection (owner from the kernel, destination from the socket).
pub struct Pinned {
    /// Whose every request on the connection is.
    pub container: ContainerId,
    /// Where every request on the connection goes: a request for another authority is refused.
    /// For a transparent connection ([`Pinned::transparent`]) only its scheme and port are
    /// fixed: the host is the one the request names.
    pub target: Target,
    /// The host comes from each request (Host, or an absolute-form target), not from the
    /// connection: a transparent connection knows only the address the program dialled.
    pub named_by_request: bool,
}

impl Pinned {
    /// A connection inside a CONNECT tunnel to `target`.
    pub fn tunnel(container: ContainerId, target: Target) -> Self {
        Self { container, target, named_by_request: false }
    }

    /// A connection the kernel delivered to a transparent listener: `host` is what the
    /// program dialled (the name behind the sandbox's address, else the address), `port` the
    /// port it dialled, its owner the listener's container.
    pub fn transparent(container: ContainerId, host: CanonicalHost, port: u16, https: bool) -> Self {
        Self { container, target: Target { https, host, port }, named_by_request: true }
    }
}

/// The target of a request on a transparent connection: the host the request names (an
/// absolute-form target, else Host; without either, the address dialled), on the port that
/// was dialled. A Host naming another port is refused: the program dialled this one.
pub(super) fn transparent(t: &Pinned, head: &RequestHead) -> Result<(Target, String), String> {
    let (authority, path) = if head.target.starts_with('/') {
        let host = head.headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
        (host.map(str::to_string), origin_form(&head.target)?)
    } else {
        let (target, path) = absolute(&head.target)?;
        (Some(target.authority()), path)
    };
    let Some(authority) = authority else { return Ok((t.target.clone(), path)) };
    let (host, port) = split_authority(&authority).map_err(|e| e.to_string())?;
    if port.is_some_and(|p| p != t.target.port) {
        return Err(format!("Host {authority} names another port than the {} that was dialled", t.target.port));
    }
    let host = CanonicalHost::parse(host).map_err(|e| e.to_string())?;
    Ok((Target { host, ..t.target.clone() }, path))
}

/// The target of a request inside a tunnel: origin-form, or absolute-form for the same host.
/// An origin-form request whose Host names another authority is refused (SPEC 8.2: one
/// authority, the one the tunnel and its TLS server name were decided on).
pub(super) fn tunnel(t: &Pinned, head: &RequestHead) -> Result<(Target, String), String> {
    let raw = head.target.as_str();
    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2), and is checked below.
    if let Some(host) = head.headers.get(http::header::HOST).filter(|_| raw.starts_with('/')) {
        let same = host.to_str().ok().and_then(|h| split_authority(h).ok()).is_some_and(|(name, port)| {
            CanonicalHost::parse(name).is_ok_and(|n| n == t.target.host) && port.is_none_or(|p| p == t.target.port)
        });
        if !same {
            return Err(format!(
                "Host {:?} is not the tunnel's host {}",
                String::from_utf8_lossy(host.as_bytes()),
                t.target.authority()
            ));
        }
    }
    if raw.starts_with('/') {
        return Ok((t.target.clone(), origin_form(raw)?));
    }
    let (target, path) = absolute(raw)?;
    if target.host != t.target.host || target.port != t.target.port || target.https != t.target.https {
        return Err(format!("request for {} inside a tunnel to {}", target.authority(), t.target.authority()));
    }
    Ok((target, path))
}

/// The start of the answer to an origin-form request on the explicit listener (the caller
/// adds how to send it, with the listener's address).
pub(super) const NOT_ABSOLUTE: &str = "moat is a proxy: send absolute-form requests";

/// Parses an absolute-form `http[s]://authority/path?query` target (RFC 9112 §3.2.2) into
/// the canonical target and the origin-form path.
pub(super) fn absolute(raw: &str) -> Result<(Target, String), String> {
    let lower = raw.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
    let (https, rest) = if lower.starts_with("http://") {
        (false, &raw[7..])
    } else if lower.starts_with("https://") {
        (true, &raw[8..])
    } else {
        return Err(NOT_ABSOLUTE.into());
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let (host, port) = split_authority(authority).map_err(|e| e.to_string())?;
    let host = CanonicalHost::parse(host).map_err(|e| e.to_string())?;
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        origin_form(&format!("/{path}"))?
    } else {
        origin_form(path)?
    };
    let default_port = if https { 443 } else { 80 };
    Ok((Target { https, host, port: port.unwrap_or(default_port) }, path))
}

/// The path and query of a request as moat passes them on: a fragment is refused (RFC 9112
/// §3.2: a request-target has none, and a proxy that drops it silently forwards a different
/// resource than the client named); the bytes a browser would percent-encode (`<`, `>`, `"`,
/// a backtick, `{`, `}`, `|`, `\`, `^`, and non-ASCII) are encoded as a browser would, so
/// that the handler's `request.url`, the log and the upstream see one and the same URL.
pub(crate) fn origin_form(path: &str) -> Result<String, String> {
    if path.contains('#') {
        return Err("a request target cannot contain a fragment (#...)".into());
    }
    let needs =
        |b: u8| matches!(b, b'"' | b'<' | b'>' | b'`' | b'{' | b'}' | b'|' | b'\\' | b'^') || !b.is_ascii_graphic();
    if !path.bytes().any(needs) {
        return Ok(path.to_string());
    }
    let mut out = String::with_capacity(path.len() + 16);
    for b in path.bytes() {
        if needs(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    Ok(out)
}
