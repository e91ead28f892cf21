//! TLS interception (SPEC 5.1, 10): moat's certificate authority and the per-host leaf
//! certificates it signs for intercepted tunnels. Upstream TLS lives in [`crate::upstream::tls`].

pub mod ca;
pub mod leaf;

pub use ca::Ca;
pub use leaf::LeafCache;

/// The one crypto provider moat uses (never the process default: see RUST-NOTES).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
