//! Responses on the wire: head, framing chosen from the body, and the body streamed.

use std::time::Duration;

use http::Version;
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::body::{Body, BoxError};

/// How the response body will be framed on the wire.
enum OutFraming {
    Length,
    Chunked,
    /// HTTP/1.0 client and unknown length: the body ends when the connection closes.
    Close,
    NoBody,
}

/// What writing one response did.
pub struct Written {
    /// Body bytes sent to the client, also when the write failed part-way.
    pub bytes: u64,
    /// Whether the connection may carry another request, or why the response failed part-way
    /// (the body stream broke, the client went away); the connection must then be closed.
    pub outcome: Result<bool, BoxError>,
}

/// How one response is written.
#[derive(Clone, Copy)]
pub struct WriteOptions {
    pub version: Version,
    /// The request was HEAD, so no body is sent.
    pub head_request: bool,
    pub keep_alive: bool,
    /// Longest wait for the next body bytes (`limits.body_idle_timeout`): a body that stalls
    /// longer is cut off and the connection closed.
    pub stall: Duration,
}

impl WriteOptions {
    /// A one-off answer on a connection that closes after it.
    pub fn closing() -> Self {
        Self { version: Version::HTTP_11, head_request: false, keep_alive: false, stall: Duration::from_secs(300) }
    }
}

/// Writes one response.
pub async fn write_response<W: AsyncWrite + Unpin>(
    out: &mut W,
    response: http::Response<Body>,
    options: WriteOptions,
) -> Written {
    let mut bytes = 0;
    let outcome = write_response_counted(out, response, options, &mut bytes).await;
    Written { bytes, outcome }
}

async fn write_response_counted<W: AsyncWrite + Unpin>(
    out: &mut W,
    response: http::Response<Body>,
    options: WriteOptions,
    written: &mut u64,
) -> Result<bool, BoxError> {
    let WriteOptions { version, head_request, mut keep_alive, stall } = options;
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let no_body = head_request || status.is_informational() || status == 204 || status == 304;
    let exact = http_body::Body::size_hint(&body).exact();
    let framing = if no_body {
        OutFraming::NoBody
    } else if exact.is_some() {
        OutFraming::Length
    } else if version == Version::HTTP_11 {
        OutFraming::Chunked
    } else {
        keep_alive = false;
        OutFraming::Close
    };

    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(if version == Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(reason_phrase(status).as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        let framing_header = name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING;
        if framing_header && !(head_request && name == http::header::CONTENT_LENGTH) || name == http::header::CONNECTION
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        OutFraming::Length if !(status == 204 || status.is_informational()) => {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(crate::units::decimal(exact.unwrap_or(0), &mut [0; 20]).as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        OutFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    head.extend_from_slice(if keep_alive { b"connection: keep-alive\r\n\r\n" } else { b"connection: close\r\n\r\n" });
    out.write_all(&head).await?;

    if !matches!(framing, OutFraming::NoBody) {
        let mut body = crate::body::StallLimit::new(body, stall, "the response body");
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            // The announced Content-Length is a promise to the client: a body that would run
            // past it (or, below, stop short of it) would desynchronise the connection.
            if exact.is_some_and(|n| *written + data.len() as u64 > n) {
                return Err("response body is longer than its Content-Length".into());
            }
            *written += data.len() as u64;
            if let OutFraming::Chunked = framing {
                out.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
                out.write_all(&data).await?;
                out.write_all(b"\r\n").await?;
            } else {
                out.write_all(&data).await?;
            }
        }
        if let OutFraming::Chunked = framing {
            out.write_all(b"0\r\n\r\n").await?;
        }
        if let OutFraming::Length = framing
            && exact != Some(*written)
        {
            return Err("response body ended before its Content-Length".into());
        }
    }
    out.flush().await?;
    Ok(keep_alive)
}

/// The reason phrase; 520 is moat's (and Cloudflare's) "origin is disallowed" answer.
fn reason_phrase(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        520 => "Origin Disallowed",
        _ => status.canonical_reason().unwrap_or("Unknown"),
    }
}
