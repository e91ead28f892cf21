//! The request head (RFC 9112 §2–3, §6): parsed from bytes, strictly, with its framing.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};

/// Most headers a request may carry; more is treated like an oversized head (431).
const MAX_HEADERS: usize = 128;

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    /// The request-target exactly as sent (absolute-form, authority-form, origin-form or `*`).
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the client allows another request on this connection.
    pub keep_alive: bool,
}

/// How the request body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Why no request head could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The client closed the connection between requests: not an error.
    #[error("connection closed")]
    Closed,
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("bad request: {0}")]
    Bad(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Parses the request head at the start of `buf` without I/O: the head and the bytes it took,
/// `None` when `buf` holds no whole head yet. The same checks as [`ConnReader::read_head`]
/// (for the fuzzer, which drives the parser without a connection).
pub fn parse_request_head(mut buf: &[u8], limit: usize) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut skipped = 0;
    while let Some(rest) = buf.strip_prefix(b"\r\n") {
        buf = rest;
        skipped += 2;
    }
    let mut scanned = 0;
    match find_head_end(buf, &mut scanned)? {
        Some(end) if end > limit => Err(HeadError::TooLarge(limit)),
        Some(end) => Ok(Some((parse_head(&Bytes::copy_from_slice(&buf[..end]))?, skipped + end))),
        None if buf.len() > limit => Err(HeadError::TooLarge(limit)),
        None => Ok(None),
    }
}

/// Finds the end of the head (index after the blank line), refusing bare LF on the way.
pub(super) fn find_head_end(buf: &[u8], scanned: &mut usize) -> Result<Option<usize>, HeadError> {
    let mut i = *scanned;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err(HeadError::Bad("bare LF in request head"));
            }
            if i >= 3 && &buf[i - 3..=i] == b"\r\n\r\n" {
                return Ok(Some(i + 1));
            }
        }
        i += 1;
    }
    *scanned = i;
    Ok(None)
}

/// Parses a complete head. Header values are slices of `head` (no copy per header).
pub(super) fn parse_head(head: &Bytes) -> Result<RequestHead, HeadError> {
    check_bytes(head)?;
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Bad("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge(head.len())),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    }
    let method =
        Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| HeadError::Bad("bad method"))?;
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(HeadError::Bad("unsupported HTTP version")),
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Bad("bad header name"))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice_ref(h.value)).map_err(|_| HeadError::Bad("bad header value"))?;
        headers.append(name, value);
    }
    let framing = framing(&headers, version)?;
    normalize_content_length(&mut headers, framing);
    if headers.get_all(http::header::HOST).iter().count() > 1 {
        return Err(HeadError::Bad("more than one Host header"));
    }
    let keep_alive = wants_keep_alive(&headers, version);
    Ok(RequestHead { method, target: req.path.unwrap_or_default().to_string(), version, headers, framing, keep_alive })
}

/// Refuses control bytes other than HT, CR and LF, and obs-fold (RFC 9112 §5.2: a header line
/// that starts with white space). Each is one fold over the whole head without an early exit,
/// which the compiler turns into checks of many bytes at a time: a loop with a branch per byte
/// cost about ten instructions a byte.
fn check_bytes(head: &[u8]) -> Result<(), HeadError> {
    let control = head
        .iter()
        .fold(false, |seen, &b| seen | ((b < 0x20) & (b != b'\t') & (b != b'\r') & (b != b'\n')) | (b == 0x7f));
    if control {
        return Err(HeadError::Bad("control byte in request head"));
    }
    let next = head.get(1..).unwrap_or_default();
    let folded = head
        .iter()
        .zip(next)
        .fold(false, |seen, (&b, &after)| seen | ((b == b'\n') & ((after == b' ') | (after == b'\t'))));
    if folded {
        return Err(HeadError::Bad("obsolete line folding"));
    }
    Ok(())
}

/// RFC 9112 §6.3, strictly: Transfer-Encoding must be exactly `chunked` and never beside a
/// Content-Length; several Content-Length values must agree.
fn framing(headers: &HeaderMap, version: Version) -> Result<Framing, HeadError> {
    let te: Vec<&HeaderValue> = headers.get_all(http::header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(http::header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(HeadError::Bad("both Content-Length and Transfer-Encoding"));
        }
        if version == Version::HTTP_10 {
            return Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if te.len() != 1 || !te[0].as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(HeadError::Bad("Transfer-Encoding other than a single \"chunked\""));
        }
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for value in cl {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(trim(part)).ok_or(HeadError::Bad("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Bad("differing Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// An accepted Content-Length that is a list (`5, 5`), repeated or zero-padded goes upstream as
/// the one decimal moat framed the body with, so no server can read it another way.
fn normalize_content_length(headers: &mut HeaderMap, framing: Framing) {
    let n = match framing {
        Framing::Length(n) => n,
        Framing::None if headers.contains_key(http::header::CONTENT_LENGTH) => 0,
        _ => return,
    };
    // The value already parsed to `n`: it is canonical when it is plain digits without a
    // leading zero (checked without formatting `n` on every request with a body).
    let canonical = |v: &HeaderValue| {
        let b = v.as_bytes();
        b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b.first() != Some(&b'0'))
    };
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let single_and_canonical = values.next().is_some_and(canonical) && values.next().is_none();
    if !single_and_canonical {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
}

fn wants_keep_alive(headers: &HeaderMap, version: Version) -> bool {
    let tokens = crate::headers::connection_tokens(headers);
    match version {
        Version::HTTP_10 => tokens.iter().any(|t| t.eq_ignore_ascii_case("keep-alive")),
        _ => !tokens.iter().any(|t| t.eq_ignore_ascii_case("close")),
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t')).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !matches!(c, b' ' | b'\t')).map_or(start, |e| e + 1);
    &b[start..end]
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A chunk size is hex digits and nothing else (RFC 9112 §7.1): white space around it (which
/// the grammar allows only as BWS before a `;` extension) is refused, because parsers that
/// differ on it are a known request-smuggling vector.
pub(super) fn parse_chunk_size(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 15 || !b.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `check_bytes` replaced: a byte at a time, stopping at the first refusal.
    fn refused_byte_by_byte(head: &[u8]) -> bool {
        head.iter().enumerate().any(|(i, &b)| {
            let control = (b < 0x20 && b != b'\t' && b != b'\r' && b != b'\n') || b == 0x7f;
            control || (b == b'\n' && matches!(head.get(i + 1), Some(b' ' | b'\t')))
        })
    }

    #[test]
    fn check_bytes_refuses_what_a_byte_by_byte_scan_refuses_for_every_byte_anywhere() {
        let base = b"GET http://a.test/p HTTP/1.1\r\nHost: a.test\r\nX-A: v\tw\r\n\r\n";
        assert!(check_bytes(base).is_ok());
        let mut refused = 0;
        for b in 0..=255u8 {
            for at in 0..=base.len() {
                let mut head = base.to_vec();
                head.insert(at, b);
                assert_eq!(check_bytes(&head).is_err(), refused_byte_by_byte(&head), "byte {b:#04x} at {at}");
                refused += usize::from(check_bytes(&head).is_err());
            }
        }
        // Control bytes anywhere, DEL, and SP or HT right after a line feed were all met.
        assert!(refused > 30 * base.len(), "{refused}");
        assert!(check_bytes(b"GET / HTTP/1.1\r\nA: 1\r\n\tfolded\r\n\r\n").is_err());
        assert!(check_bytes(b"GET / HTTP/1.1\r\nA: 1\x7f\r\n\r\n").is_err());
        assert!(check_bytes(b"").is_ok());
    }
}
