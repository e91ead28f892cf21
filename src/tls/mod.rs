//! TLS interception (SPEC 5.1, 10): moat's certificate authority and the per-host leaf
//! certificates it signs for intercepted tunnels. Upstream TLS lives in [`crate::upstream::tls`].

pub mod ca;
pub mod leaf;

pub use ca::Ca;
pub use leaf::LeafCache;

/// `n` bytes from the system's secure random source, through the crypto library.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, String> {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut b).map_err(|_| "system random failed".to_string())?;
    Ok(b)
}

/// The one crypto provider moat uses (never the process default: see RUST-NOTES).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
