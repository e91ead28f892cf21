//! `redactSecrets = true` (SPEC 8.5): secret values that an upstream reflects are replaced in
//! response headers and bodies before the container sees them, also when a value is split
//! across body chunks.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body::{Frame, SizeHint};

use crate::body::{Body, BoxError};

use crate::log::MIN_REDACTED_LEN;

/// Rewrites a response so that no secret value reaches the client.
pub fn redact_response(resp: http::Response<Body>) -> http::Response<Body> {
    let secrets: Arc<Vec<(String, String)>> =
        Arc::new(crate::log::secrets().into_iter().filter(|(_, v)| v.len() >= MIN_REDACTED_LEN).collect());
    if secrets.is_empty() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // moat asks upstreams for uncompressed bodies when it redacts; one that compresses anyway
    // cannot be inspected, so it is not passed on (fail safe).
    if let Some(enc) = parts.headers.get(http::header::CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        let enc = String::from_utf8_lossy(enc.as_bytes()).into_owned();
        return crate::proxy::answer::text(
            http::StatusCode::BAD_GATEWAY,
            format!("moat: redactSecrets is on and the upstream sent a {enc}-encoded body, which moat cannot inspect"),
        );
    }
    redact_header_values(&mut parts.headers, &secrets);
    // The length may change, so the body is re-framed by whoever writes it.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let max = secrets.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let body = RedactBody { inner: body, secrets, max, carry: BytesMut::new(), done: false };
    http::Response::from_parts(parts, crate::body::boxed(body))
}

/// Redacts the headers of a `101 Switching Protocols`: what flows after it is another
/// protocol's stream, relayed as it is.
pub fn redact_upgrade_headers(headers: &mut http::HeaderMap) {
    let secrets: Vec<(String, String)> =
        crate::log::secrets().into_iter().filter(|(_, v)| v.len() >= MIN_REDACTED_LEN).collect();
    redact_header_values(headers, &secrets);
}

/// Replaces every secret value in header values.
fn redact_header_values(headers: &mut http::HeaderMap, secrets: &[(String, String)]) {
    for value in headers.values_mut() {
        // Bytes, not text: a value with obs-text is no hiding place.
        let bytes = value.as_bytes();
        if !secrets.iter().any(|(_, s)| bytes.windows(s.len()).any(|w| w == s.as_bytes())) {
            continue;
        }
        let mut t = String::from_utf8_lossy(bytes).into_owned();
        for (name, s) in secrets {
            t = t.replace(s.as_str(), &format!("[secret {name}]"));
        }
        *value = HeaderValue::from_str(&t).unwrap_or_else(|_| HeaderValue::from_static("[secret]"));
    }
}

struct RedactBody {
    inner: Body,
    secrets: Arc<Vec<(String, String)>>,
    /// Length of the longest secret.
    max: usize,
    /// Bytes held back because a secret may start in them.
    carry: BytesMut,
    done: bool,
}

impl RedactBody {
    /// Replaces complete secrets in `carry`, emits what can no longer be part of one.
    fn process(&mut self, last: bool) -> Bytes {
        let buf = std::mem::take(&mut self.carry);
        let keep_from = if last { buf.len() } else { buf.len().saturating_sub(self.max - 1) };
        let mut out = BytesMut::with_capacity(buf.len());
        let mut i = 0;
        'scan: while i < buf.len() {
            for (name, s) in self.secrets.iter() {
                if buf[i..].starts_with(s.as_bytes()) {
                    out.extend_from_slice(format!("[secret {name}]").as_bytes());
                    i += s.len();
                    continue 'scan;
                }
            }
            if i >= keep_from {
                break;
            }
            out.extend_from_slice(&buf[i..i + 1]);
            i += 1;
        }
        self.carry.extend_from_slice(&buf[i..]);
        out.freeze()
    }
}

impl http_body::Body for RedactBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    self.carry.extend_from_slice(&data);
                    let out = self.process(false);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let out = self.process(true);
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out))));
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[(&str, &str)], chunks: &[&str]) -> String {
        let secrets: Vec<(String, String)> = secrets.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        let max = secrets.iter().map(|(_, v)| v.len()).max().unwrap();
        let mut b = RedactBody {
            inner: crate::body::empty(),
            secrets: Arc::new(secrets),
            max,
            carry: BytesMut::new(),
            done: false,
        };
        let mut out = Vec::new();
        for c in chunks {
            b.carry.extend_from_slice(c.as_bytes());
            out.extend_from_slice(&b.process(false));
        }
        out.extend_from_slice(&b.process(true));
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn replaces_across_chunk_boundaries() {
        let s = [("TOKEN", "s3cr3t-value")];
        assert_eq!(run(&s, &["a s3cr3t-value b"]), "a [secret TOKEN] b");
        assert_eq!(run(&s, &["a s3cr", "3t-va", "lue b"]), "a [secret TOKEN] b");
        assert_eq!(run(&s, &["s", "3", "cr3t-value", "s3cr3t-value"]), "[secret TOKEN][secret TOKEN]");
        assert_eq!(run(&s, &["almost s3cr3t-valu"]), "almost s3cr3t-valu");
        assert_eq!(run(&s, &["x"]), "x");
    }
}
