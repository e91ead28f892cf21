//! Upstreams answered in memory instead of over the network (`moat test`): every connection
//! an [`super::Upstream`] with fixtures would dial is an in-memory stream to whoever answers
//! them. Everything before the dial (resolution, the address check, the decision) runs as it
//! always does; nothing leaves the process.

use std::net::IpAddr;

use super::Target;

/// Answers the connections an upstream client would dial.
pub trait FixtureDialer {
    /// A new connection to `target`: plain HTTP/1.1 (TLS is not spoken to fixtures; the
    /// target says whether the request was for https).
    fn dial(&self, target: &Target) -> Result<tokio::io::DuplexStream, String>;

    /// The address a name resolves to when nothing else answers it (no DNS packet is sent).
    fn address_of_any_name(&self) -> IpAddr;
}
