//! A strict HTTP/1.1 server codec for the client side of the proxy (RFC 9112).
//!
//! moat parses client requests itself rather than through hyper's server because the proxy
//! must refuse every ambiguous framing (SPEC 8.6) that a lenient parser accepts: bare LF line
//! ends, Content-Length together with Transfer-Encoding, obfuscated Transfer-Encoding, NUL or
//! control bytes, obs-fold. The upstream side uses hyper's client.
//!
//! [`head`]: the request head parser and framing decision (pure, no I/O); [`reader`]: the
//! read side of a connection (heads as they arrive, request bodies with their pace);
//! [`write`]: responses on the wire.

mod head;
mod reader;
mod write;

pub use head::{Framing, HeadError, RequestHead, parse_request_head};
pub use reader::{BodyError, ConnReader, Pace};
pub use write::{WriteOptions, write_response};
