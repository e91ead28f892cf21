//! A tunnel's first bytes: what they say it carries (TLS with its server name, HTTP, raw TCP,
//! or a silent client of a protocol whose server speaks first), read within a bound.

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;

/// Most bytes read while waiting for a complete ClientHello.
const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a tunnel are.
pub enum Inside {
    /// TLS with this server name (None: the ClientHello has no SNI).
    Tls(Option<String>),
    /// An HTTP request line (plain HTTP inside CONNECT).
    Http,
    /// Anything else.
    Raw,
    /// Nothing yet, where raw TCP is allowed: a protocol whose server speaks first.
    ServerFirst,
}

/// What the bytes seen so far say a tunnel carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS record (a ClientHello is expected).
    Tls,
    /// The start of an HTTP/1 request line: a method token, a space, and a request target
    /// (origin-form `/`, `*`, absolute-form `http(s)://`, or anything after `CONNECT `).
    Http,
    /// Anything else.
    Raw,
    /// Too few bytes to tell.
    NeedMore,
}

/// Methods that make a line HTTP whatever follows their space (RFC 9110 §9 and WebDAV's).
const KNOWN_METHODS: [&[u8]; 16] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
];

/// Longest method token looked for; a longer run of capitals is not an HTTP method.
const MAX_METHOD: usize = 24;

/// Classifies a tunnel's first bytes. An uppercase word alone is not HTTP (`SSH-2.0-…`,
/// `EHLO x`): it must be a known method followed by a space, or another word followed by a
/// space and a request target, so that the protocols whose lines start with a capital word
/// are relayed raw. A line that starts as HTTP and
/// goes wrong later is HTTP, and the strict parser refuses it with a 400: relaying it raw
/// would let a sloppy request past the policy's per-request decisions.
pub fn classify(buf: &[u8]) -> Sniffed {
    let Some(&b0) = buf.first() else { return Sniffed::NeedMore };
    if b0 == 0x16 {
        return Sniffed::Tls;
    }
    let token = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if token == 0 || token > MAX_METHOD {
        return Sniffed::Raw;
    }
    let Some(&after) = buf.get(token) else { return Sniffed::NeedMore };
    if after != b' ' {
        return Sniffed::Raw;
    }
    if KNOWN_METHODS.contains(&&buf[..token]) {
        return Sniffed::Http;
    }
    let target = &buf[token + 1..];
    match target.first() {
        None => Sniffed::NeedMore,
        Some(b'/' | b'*') => Sniffed::Http,
        Some(_) => {
            for scheme in [&b"http://"[..], b"https://"] {
                let n = target.len().min(scheme.len());
                if target[..n].eq_ignore_ascii_case(&scheme[..n]) {
                    return if n == scheme.len() { Sniffed::Http } else { Sniffed::NeedMore };
                }
            }
            Sniffed::Raw
        }
    }
}

/// Reads until the first bytes tell what the tunnel carries; for TLS, until rustls has the
/// whole ClientHello (it may span several TCP segments) and its SNI. With `server_first`,
/// a client silent for that long is taken for a server-speaks-first protocol. Everything
/// happens within `limit`; bytes that still look like the start of a request line then are
/// raw TCP.
pub async fn sniff(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    server_first: Option<std::time::Duration>,
    limit: std::time::Duration,
) -> std::io::Result<Inside> {
    let deadline = tokio::time::Instant::now() + limit;
    if buf.is_empty() {
        let first_wait = server_first.map_or(deadline, |w| tokio::time::Instant::now() + w.min(limit));
        match tokio::time::timeout_at(first_wait, read_some(rd, buf)).await {
            Ok(read) => read?,
            Err(_) if server_first.is_some() => return Ok(Inside::ServerFirst),
            Err(_) => return Err(std::io::Error::other("no bytes within limits.tls_handshake_timeout")),
        }
    }
    loop {
        match classify(buf) {
            Sniffed::Tls => break,
            Sniffed::Http => return Ok(Inside::Http),
            Sniffed::Raw => return Ok(Inside::Raw),
            Sniffed::NeedMore => match tokio::time::timeout_at(deadline, read_some(rd, buf)).await {
                Ok(read) => read?,
                Err(_) => return Ok(Inside::Raw),
            },
        }
    }
    match tokio::time::timeout_at(deadline, client_hello(rd, buf)).await {
        Ok(hello) => hello,
        Err(_) => Err(std::io::Error::other("no whole ClientHello within limits.tls_handshake_timeout")),
    }
}

/// One read into `buf`; end of stream is an error (the tunnel said nothing useful).
async fn read_some(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<()> {
    if rd.read_buf(buf).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Reads until rustls has the whole ClientHello in `buf`, and returns its server name.
async fn client_hello(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> std::io::Result<Inside> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        let mut chunk = &buf[fed..];
        let n = acceptor.read_tls(&mut chunk)?;
        if n == 0 && fed < buf.len() {
            return Err(std::io::Error::other("ClientHello not accepted"));
        }
        fed += n;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(Inside::Tls(accepted.client_hello().server_name().map(str::to_string)));
            }
            Ok(None) => {}
            Err((e, _)) => return Err(std::io::Error::other(format!("not a valid ClientHello: {e}"))),
        }
        if fed == buf.len() {
            if buf.len() > MAX_HELLO {
                return Err(std::io::Error::other("ClientHello too large"));
            }
            read_some(rd, buf).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Sniffed, classify};

    #[test]
    fn first_bytes() {
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Sniffed::Http),
            (b"POST http://a.test/ HTTP/1.1", Sniffed::Http),
            (b"OPTIONS * HTTP/1.1", Sniffed::Http),
            (b"CONNECT a:1 HTTP/1.1", Sniffed::Http),
            (b"GET  /", Sniffed::Http),
            (b"PURGE /x HTTP/1.1", Sniffed::Http),
            (b"PURGE x", Sniffed::Raw),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Sniffed::Raw),
            (b"EHLO x\r\n", Sniffed::Raw),
            (b"ssh-2.0-x", Sniffed::Raw),
            (b"\x16\x03\x01", Sniffed::Tls),
            (b"", Sniffed::NeedMore),
            (b"GE", Sniffed::NeedMore),
            (b"GET ", Sniffed::Http),
            (b"FOO ", Sniffed::NeedMore),
            (b"FOO ht", Sniffed::NeedMore),
            (b"FOO hx", Sniffed::Raw),
            (b"PING\r\n", Sniffed::Raw),
        ] {
            assert_eq!(classify(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
