//! TLS to upstream servers: verified against Mozilla's roots (compiled in, so every machine
//! trusts at least that set), the system's trust store (where a machine's own CAs are), and
//! `[tls] extra_ca`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::policy::CanonicalHost;

/// The client side of moat's upstream TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Offers h2 and http/1.1: the server picks.
    any: TlsConnector,
    /// Offers http/1.1 only: for upgrades (WebSocket), which HTTP/2 cannot carry.
    h1_only: TlsConnector,
}

impl UpstreamTls {
    /// Roots: webpki-roots, the system store, and every certificate in the `extra_ca` PEM
    /// files.
    pub fn new(extra_ca: &[std::path::PathBuf]) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        // The system store (honours SSL_CERT_FILE / SSL_CERT_DIR). Unreadable or missing
        // stores are not fatal: the compiled-in roots remain; certificates the store holds
        // that webpki cannot parse are skipped, as browsers do.
        let system = rustls_native_certs::load_native_certs();
        let (added, _skipped) = roots.add_parsable_certificates(system.certs);
        if added == 0 && !system.errors.is_empty() {
            tracing::debug!("no system trust store: {:?}", system.errors.first());
        }
        for path in extra_ca {
            let pem = std::fs::read(path).map_err(|e| format!("tls.extra_ca: cannot read {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("tls.extra_ca: {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("tls.extra_ca: {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("tls.extra_ca: {} has no PEM certificate", path.display()));
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut h1 = config.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { any: TlsConnector::from(Arc::new(config)), h1_only: TlsConnector::from(Arc::new(h1)) })
    }

    /// The TLS handshake, verifying the certificate for `host`; `h2` offers HTTP/2 too.
    pub async fn connect(
        &self,
        host: &CanonicalHost,
        tcp: TcpStream,
        h2: bool,
    ) -> Result<TlsStream<TcpStream>, String> {
        let name = match host {
            CanonicalHost::Name(n) => ServerName::try_from(n.clone()).map_err(|e| e.to_string())?,
            CanonicalHost::Ip(ip) => ServerName::IpAddress((*ip).into()),
        };
        let connector = if h2 { &self.any } else { &self.h1_only };
        connector.connect(name, tcp).await.map_err(|e| e.to_string())
    }
}
