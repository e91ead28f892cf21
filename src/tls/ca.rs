//! moat's certificate authority: ECDSA P-256, ephemeral by default (the key lives only in this
//! process), or persisted under `[tls] ca_dir` as `ca.pem` + `ca-key.pem` (mode 0600) and
//! reused across restarts.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// File names inside `ca_dir` (and `ca.pem` under `data_dir` for the running instance).
pub const CERT_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "ca-key.pem";
/// Locked while a process loads or creates the CA in `ca_dir`.
const LOCK_FILE: &str = ".ca.lock";

/// A CA that can sign leaf certificates.
pub struct Ca {
    pub(super) issuer: Issuer<'static, KeyPair>,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
}

impl Ca {
    /// A fresh CA whose private key never leaves memory.
    pub fn ephemeral() -> Result<Self, String> {
        Self::generate(365)
    }

    /// The CA under `dir`: loaded when `ca.pem` and `ca-key.pem` exist, else made and saved.
    /// `moat serve` and `moat ca` may both do this at once on a new `ca_dir`: a lock on the
    /// folder makes one of them create the CA and the other load it, never two CAs whose files
    /// overwrite each other.
    pub fn load_or_create(dir: &Path) -> Result<Self, String> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("tls.ca_dir: cannot create {}: {e}", dir.display()))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| format!("tls.ca_dir: cannot open {}: {e}", lock_path.display()))?;
        // Held until `lock` is dropped at the end of this function.
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("tls.ca_dir: cannot lock {}: {e}", lock_path.display()))?;
        if cert_path.exists() || key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        let ca = Self::generate(3650)?;
        write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes())
            .map_err(|e| format!("tls.ca_dir: cannot write {}: {e}", key_path.display()))?;
        write_atomic(&cert_path, ca.cert_pem.as_bytes(), 0o644)
            .map_err(|e| format!("tls.ca_dir: cannot write {}: {e}", cert_path.display()))?;
        Ok(ca)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, String> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| {
                format!("tls.ca_dir: cannot read {}: {e} (ca.pem and ca-key.pem belong together)", p.display())
            })
        };
        let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
        // Whoever reads this key can impersonate any site to clients that trust the CA.
        if let Ok(meta) = std::fs::metadata(key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            return Err(format!(
                "tls.ca_dir: {} can be read by other users (mode {:o}); run chmod 600 on it",
                key_path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| format!("tls.ca_dir: {}: {e}", key_path.display()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("tls.ca_dir: {}: {e}", cert_path.display()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| format!("tls.ca_dir: {} with {}: {e}", cert_path.display(), key_path.display()))?;
        // A key from another CA would sign leaves no client can verify: refuse at start.
        let public = issuer.key().public_key_raw();
        if !cert_der.windows(public.len()).any(|w| w == public) {
            return Err(format!(
                "tls.ca_dir: {} is not the key of {}; restore the pair or delete both to make a new CA",
                key_path.display(),
                cert_path.display()
            ));
        }
        Ok(Self { issuer, cert_der, cert_pem })
    }

    fn generate(valid_days: i64) -> Result<Self, String> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "moat");
        dn.push(DnType::CommonName, format!("moat interception CA {}", short_id()));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(valid_days);
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        Ok(Self { issuer: Issuer::new(params, key), cert_der, cert_pem })
    }

    /// SHA-256 of the certificate, as `AB:CD:…` (what `openssl x509 -fingerprint -sha256` shows).
    pub fn fingerprint(&self) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.cert_der);
        digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
    }

    /// Writes the certificate (never the key) to `path` for clients to trust, with `mode`.
    pub fn write_cert(&self, path: &Path, mode: u32) -> std::io::Result<()> {
        write_atomic(path, self.cert_pem.as_bytes(), mode)
    }
}

/// Where the CA certificate of an instance with this config is: `ca_dir/ca.pem` when the CA
/// is persisted, else `data_dir/ca.pem` (written by the running instance at start).
pub fn cert_path(config: &crate::config::Config) -> PathBuf {
    match config.ca_dir() {
        Some(dir) => dir.join(CERT_FILE),
        None => config.data_dir.join(CERT_FILE),
    }
}

fn short_id() -> String {
    super::random_bytes(4).map(|b| b.iter().map(|x| format!("{x:02x}")).collect()).unwrap_or_default()
}

/// Writes a file only its owner can read, without a moment where it is readable by others.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, bytes, 0o600)
}

/// Writes to a temporary file created with `mode`, then renames it into place.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    // The mode asked for, whatever the umask made of it at creation.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
