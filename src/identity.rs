//! Who is asking: the container identity of an explicit-proxy request (SPEC 1, 5.1).

use std::fmt;

use base64::Engine;

/// A validated container id: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("container id must be 1-64 characters of A-Z a-z 0-9 . _ -")]
pub struct InvalidContainerId;

impl ContainerId {
    pub fn parse(s: &str) -> Result<Self, InvalidContainerId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok { Ok(Self(s.to_string())) } else { Err(InvalidContainerId) }
    }

    /// The id of requests that carry no `Proxy-Authorization`.
    pub fn default_id() -> Self {
        Self("default".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a `Proxy-Authorization` header said.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyCredentials {
    pub id: ContainerId,
    pub token: Option<String>,
}

/// Why the credentials were refused; the client gets 407.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("Proxy-Authorization must be Basic base64(containerId:token)")]
    Malformed,
    #[error(transparent)]
    BadId(#[from] InvalidContainerId),
    #[error("this proxy requires a container id and token (http://ID:TOKEN@host:port)")]
    Missing,
    #[error("send one Proxy-Authorization header, not several")]
    Repeated,
    #[error("wrong or missing token for container {0}")]
    WrongToken(String),
}

/// Parses `Basic base64(user:pass)`.
pub fn parse_proxy_authorization(value: &[u8]) -> Result<ProxyCredentials, AuthError> {
    let text = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?.trim();
    let (scheme, b64) = text.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Malformed);
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|_| AuthError::Malformed)?;
    let raw = String::from_utf8(raw).map_err(|_| AuthError::Malformed)?;
    let (user, pass) = match raw.split_once(':') {
        Some((u, p)) => (u, Some(p.to_string()).filter(|p| !p.is_empty())),
        None => (raw.as_str(), None),
    };
    Ok(ProxyCredentials { id: ContainerId::parse(user)?, token: pass })
}

/// Compares secrets without an early exit, so timing does not reveal a prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(ContainerId::parse("agent-1.a_b").is_ok());
        assert!(ContainerId::parse("").is_err());
        assert!(ContainerId::parse(&"a".repeat(65)).is_err());
        assert!(ContainerId::parse("a b").is_err());
    }

    #[test]
    fn basic_auth() {
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("agent-1:s3cret"));
        let c = parse_proxy_authorization(v.as_bytes()).unwrap();
        assert_eq!(c.id.as_str(), "agent-1");
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(parse_proxy_authorization(b"Bearer x"), Err(AuthError::Malformed));
        let bad = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("a/b:x"));
        assert_eq!(parse_proxy_authorization(bad.as_bytes()), Err(AuthError::BadId(InvalidContainerId)));
    }
}
