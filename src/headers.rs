//! HTTP header rules that both sides of moat follow (RFC 9110 §7.6.1, §7.8): hop-by-hop
//! headers, `Connection` tokens and upgrades. Below `proxy` (the client side) and `upstream`
//! (the server side), so that neither reaches into the other for them.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy's own credentials: never forwarded,
/// in either direction.
static HOP_BY_HOP: [HeaderName; 9] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present is cheaper than a
    // lookup per hop-by-hop name (this runs up to four times per handled request).
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Remove only the names present (usually just `connection`), not a lookup for each.
    let present: Vec<HeaderName> = headers.keys().filter(|name| HOP_BY_HOP.contains(name)).cloned().collect();
    if present.contains(&http::header::CONNECTION) {
        for token in connection_tokens(headers) {
            headers.remove(token.as_str());
        }
    }
    for name in &present {
        headers.remove(name);
    }
}

/// Like [`strip_hop_by_hop`], but an upgrade (WebSocket) keeps its `Upgrade` header and a
/// `Connection: upgrade`: those two are the one hop-by-hop pair that must travel end to end
/// for the upgrade to happen (RFC 9110 §7.8).
pub fn strip_hop_by_hop_keep_upgrade(headers: &mut HeaderMap) {
    let upgrade = is_upgrade(headers).then(|| headers.get(http::header::UPGRADE).cloned()).flatten();
    strip_hop_by_hop(headers);
    if let Some(u) = upgrade {
        headers.insert(http::header::UPGRADE, u);
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Does this message ask to switch protocols (`Connection: upgrade` + `Upgrade`)?
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE) && connection_tokens(headers).iter().any(|t| t == "upgrade")
}

/// The comma-separated tokens of every `Connection` header.
pub fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}
