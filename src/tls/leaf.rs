//! Leaf certificates for intercepted hosts: one per canonical host, ECDSA P-256, signed by
//! moat's CA, served with the chain `[leaf, CA]`. Cached with a single-flight fill: the first
//! connection for a host makes the certificate while concurrent ones for the same host wait
//! for it (a leaf takes ~0.1 ms, so waiting on a worker thread is cheaper than a handoff).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SerialNumber};
use rustls::ServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Ca;
use crate::policy::CanonicalHost;

/// How long a leaf is valid, and when the cache makes a new one (well before it expires).
const VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
const REFRESH_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);

/// Protocols offered to intercepted clients, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

type Made = Result<Arc<ServerConfig>, String>;

/// One host's entry: filled once, by whichever connection got there first.
struct Slot {
    made_at: Instant,
    config: OnceLock<Made>,
    /// Used since eviction last passed over it (the "second chance" bit of CLOCK).
    referenced: AtomicBool,
}

/// The cached hosts. Eviction is CLOCK (second chance), an O(1) approximation of LRU: a hit
/// only sets its slot's bit; when the cache is full the oldest host is evicted unless it was
/// used since the last pass, in which case it moves to the back with its bit cleared. Hosts
/// in use stay cached however many one-off hosts pass through.
#[derive(Default)]
struct Entries {
    by_host: HashMap<String, Arc<Slot>>,
    /// The eviction queue, oldest first.
    order: VecDeque<String>,
}

impl Entries {
    /// Evicts hosts until at most `keep` remain.
    fn keep_at_most(&mut self, keep: usize) {
        while self.by_host.len() > keep {
            let Some(oldest) = self.order.pop_front() else { break };
            match self.by_host.get(&oldest) {
                Some(slot) if slot.referenced.swap(false, Ordering::Relaxed) => self.order.push_back(oldest),
                _ => {
                    self.by_host.remove(&oldest);
                }
            }
        }
    }
}

/// Per-host TLS server configs for interception.
pub struct LeafCache {
    ca: Ca,
    /// One leaf key for the whole process: keeps the CA key out of every `ServerConfig` and
    /// makes a new host cost one signature, not a key generation.
    leaf_key: KeyPair,
    provider: Arc<rustls::crypto::CryptoProvider>,
    capacity: usize,
    entries: Mutex<Entries>,
    size: Gauge,
    generated: Counter,
}

impl LeafCache {
    pub fn new(ca: Ca, capacity: usize, size: Gauge, generated: Counter) -> Result<Self, String> {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        Ok(Self {
            ca,
            leaf_key,
            provider: super::provider(),
            capacity: capacity.max(1),
            entries: Mutex::default(),
            size,
            generated,
        })
    }

    /// Leaf certificates made since start (each cache miss makes exactly one).
    #[cfg(test)]
    pub fn generated(&self) -> u64 {
        self.generated.get()
    }

    /// The TLS server config presenting a leaf for `host`.
    pub fn server_config(&self, host: &CanonicalHost) -> Made {
        let key = host.to_string();
        let slot = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            match entries.by_host.get(&key) {
                Some(slot) if slot.made_at.elapsed() < REFRESH_AFTER => {
                    slot.referenced.store(true, Ordering::Relaxed);
                    slot.clone()
                }
                _ => {
                    let slot = Arc::new(Slot {
                        made_at: Instant::now(),
                        config: OnceLock::new(),
                        referenced: AtomicBool::new(false),
                    });
                    if entries.by_host.contains_key(&key) {
                        // A stale leaf being renewed keeps its place in the queue.
                        entries.by_host.insert(key, slot.clone());
                    } else {
                        // Room first, so that the newcomer cannot be the one evicted.
                        entries.keep_at_most(self.capacity - 1);
                        entries.by_host.insert(key.clone(), slot.clone());
                        entries.order.push_back(key);
                    }
                    self.size.set(entries.by_host.len() as i64);
                    slot
                }
            }
        };
        // Outside the map lock: other hosts are not held up while this one is signed.
        slot.config.get_or_init(|| self.make(host)).clone()
    }

    fn make(&self, host: &CanonicalHost) -> Made {
        self.generated.inc();
        let name = match host {
            CanonicalHost::Name(n) => n.clone(),
            // rcgen turns an address into an IP SAN (clients reject an IP in a DNS SAN).
            CanonicalHost::Ip(ip) => ip.to_string(),
        };
        let mut params = CertificateParams::new(vec![name.clone()]).map_err(|e| format!("leaf for {name}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, name.clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + VALIDITY;
        let mut serial = super::random_bytes(16)?;
        serial[0] &= 0x7f; // a positive INTEGER
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let leaf = params.signed_by(&self.leaf_key, &self.ca.issuer).map_err(|e| format!("leaf for {name}: {e}"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.ca.cert_der.clone()], key)
            .map_err(|e| format!("leaf for {name}: {e}"))?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> LeafCache {
        LeafCache::new(Ca::ephemeral().unwrap(), capacity, Gauge::default(), Counter::default()).unwrap()
    }

    #[test]
    fn one_certificate_per_host_even_when_asked_concurrently() {
        let cache = Arc::new(cache(10));
        let host = CanonicalHost::parse("api.example").unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, host) = (cache.clone(), host.clone());
                std::thread::spawn(move || cache.server_config(&host).unwrap())
            })
            .collect();
        let configs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(cache.generated(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_the_hosts_in_use() {
        let cache = cache(2);
        let get = |h: &str| cache.server_config(&CanonicalHost::parse(h).unwrap()).unwrap();
        get("a.test");
        get("b.test");
        // a is in use, b is not: a newcomer evicts b, not the older a.
        get("a.test");
        get("c.test");
        assert_eq!(cache.size.get(), 2);
        assert_eq!(cache.generated(), 3);
        get("a.test");
        get("c.test");
        assert_eq!(cache.generated(), 3, "a and c are still cached");
        get("b.test");
        assert_eq!(cache.generated(), 4, "b was evicted and is made again");
        assert_eq!(cache.size.get(), 2);

        // A stream of one-off hosts does not push out a host used between them.
        for i in 0..10 {
            get("a.test");
            get(&format!("once-{i}.test"));
        }
        let made = cache.generated();
        get("a.test");
        assert_eq!(cache.generated(), made, "a stayed cached");
    }
}
