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
    // One pass over the few names present marks which hop-by-hop names are there (most
    // messages carry none, many just `connection`); only those are removed, without a lookup
    // per hop-by-hop name or an allocation (this runs up to four times per handled request).
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // HOP_BY_HOP[0] is `connection`: the names it lists go too.
    if present & 1 != 0 {
        for token in connection_tokens(headers) {
            headers.remove(token.as_str());
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
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
