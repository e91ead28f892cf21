//! One test's moat: the real proxy (decision order, handlers, injection, redaction, HTTPS
//! interception) on a loopback listener of its own, served on the test's thread, with a
//! fresh database and bucket folder, and every upstream connection answered by fixtures.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::bindings::Bindings;
use crate::config::{ClassConfig, Config};
use crate::proxy::listen::{ListenerKind, serve_connection};
use crate::proxy::overrides::OverrideStore;
use crate::proxy::state::{ClassId, Shared};
use crate::proxy::worker::Worker;
use crate::upstream::fixture::FixtureDialer;

/// A running engine; stops accepting when dropped.
pub struct Engine {
    pub shared: Arc<Shared>,
    pub worker: Rc<Worker>,
    /// The explicit proxy listener.
    pub addr: SocketAddr,
    /// The CA moat signs intercepted hosts' certificates with, for the test client to trust.
    pub ca: CertificateDer<'static>,
    pub class: ClassId,
    accept: tokio::task::JoinHandle<()>,
    _data: tempfile::TempDir,
}

/// What a test file sets for its engine.
pub struct Setup<'a> {
    pub base: &'a Config,
    pub class: &'a ClassConfig,
    pub secrets: BTreeMap<String, String>,
    pub vars: BTreeMap<String, String>,
    pub hosts: BTreeMap<String, IpAddr>,
}

impl Engine {
    /// Starts an engine on the current `LocalSet`. The error is one line (a policy that does
    /// not load says where and why).
    pub fn start(setup: Setup<'_>, fixtures: Rc<dyn FixtureDialer>) -> Result<Self, String> {
        let data = tempfile::Builder::new().prefix("moat-test-").tempdir().map_err(|e| format!("temp folder: {e}"))?;
        let mut config = setup.base.clone();
        config.data_dir = data.path().to_path_buf();
        config.admin_socket = data.path().join("admin.sock");
        // Tests name their container; proving it with a token is not what they test.
        config.containers.clear();
        config.dns_hosts.extend(setup.hosts);
        config.vars.extend(setup.vars);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen on loopback: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        config.classes = vec![ClassConfig { listen: addr, ..setup.class.clone() }];
        let mut bindings = Bindings::with_secrets(&config, setup.secrets)?;
        let db = crate::db::open(data.path()).map_err(|e| e.to_string())?;
        let overrides = Arc::new(OverrideStore::open(db.clone(), data.path()).map_err(|e| e.to_string())?);
        bindings.attach_kv(Arc::new(crate::bindings::kv::KvStore::new(db.clone())));
        bindings.attach_blob(Arc::new(crate::bindings::blob::BlobStore::new(db, data.path())));
        // Fixtures speak plain HTTP: no upstream certificate is ever checked.
        let upstream_tls = crate::upstream::tls::UpstreamTls::new(&[])?;
        let metrics = crate::metrics::Metrics::default();
        metrics.start_class(&setup.class.name);
        let ca = crate::tls::Ca::ephemeral()?;
        let ca_der = ca.cert_der.clone();
        let leaves = crate::tls::LeafCache::new(
            ca,
            64,
            metrics.tls_leaf_cache_size.clone(),
            metrics.tls_leaves_generated.clone(),
        )?;
        let shared = Arc::new(Shared::new(config, bindings, overrides, upstream_tls, leaves, metrics, vec![addr]));
        let (class, _) = shared.classes().next().ok_or("no class")?;
        shared.class(class).reload(&shared.config.limits, None).map_err(|e| e.to_string())?;
        let worker = Worker::with_fixtures(shared.clone(), fixtures);
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let serving = worker.clone();
        let accept = tokio::task::spawn_local(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::task::spawn_local(serve_connection(serving.clone(), stream, ListenerKind::Explicit, class));
            }
        });
        Ok(Self { shared, worker, addr, ca: ca_der, class, accept, _data: data })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.accept.abort();
        self.worker.start_draining();
    }
}
