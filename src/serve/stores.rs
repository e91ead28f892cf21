//! The stores `[kv]`, `[blob]` and `[cluster]` ask for: moat's redb file and blob folder by
//! default; a shared PostgreSQL database per URL (each URL opened once, whatever uses it);
//! an S3-compatible service per bucket that names one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bindings::blob::{BlobBackend, BlobStore, local::LocalBlobs};
use crate::bindings::kv::{KvBackend, KvStore, kv_table, postgres::PgKv, redb::RedbKv};
use crate::config::{Backend, Config};
use crate::db::containers::{PgRegistry, RedbRegistry, RegistryBackend};
use crate::db::overrides::PgOverrides;
use crate::db::pg::Pg;
use crate::proxy::overrides::OverrideStore;

/// Every store of a config, open.
pub(crate) struct Stores {
    pub kv: Arc<KvStore>,
    pub blob: Arc<BlobStore>,
    pub overrides: Arc<OverrideStore>,
    /// The daemon's container records.
    pub registry: Arc<dyn RegistryBackend>,
}

/// Opens every store. With `watch` (a serving moat), the KV cache and the overrides follow
/// the changes other nodes make to a shared database.
pub(crate) fn open(config: &Config, db: &Arc<redb::Database>, watch: bool) -> anyhow::Result<Stores> {
    let mut databases: HashMap<String, Arc<Pg>> = HashMap::new();
    let mut database = |url: &str, source: &str| -> anyhow::Result<Arc<Pg>> {
        if let Some(pg) = databases.get(url) {
            return Ok(pg.clone());
        }
        let pg = open_database(url, source)?;
        databases.insert(url.to_string(), pg.clone());
        Ok(pg)
    };
    let local: Arc<dyn KvBackend> = Arc::new(RedbKv { db: db.clone() });
    let mut routes: HashMap<String, Arc<dyn KvBackend>> = HashMap::new();
    for (name, backend) in &config.stores.kv {
        if let Backend::Postgres { url, source } = backend {
            routes.insert(kv_table(name), Arc::new(PgKv { pg: database(url, source)? }));
        }
    }
    type Cluster = (Arc<dyn KvBackend>, OverrideStore, Arc<dyn RegistryBackend>);
    let (storage, overrides, registry): Cluster = match &config.stores.cluster {
        Some(Backend::Postgres { url, source }) => {
            let pg = database(url, source)?;
            let shown = pg.shown.clone();
            let registry = Arc::new(PgRegistry { pg: pg.clone(), node: config.stores.node.clone() });
            (Arc::new(PgKv { pg: pg.clone() }), OverrideStore::on(Arc::new(PgOverrides { pg }), shown)?, registry)
        }
        _ => (
            local.clone(),
            OverrideStore::open(db.clone(), &config.data_dir)?,
            Arc::new(RedbRegistry { db: db.clone() }),
        ),
    };
    let kv = Arc::new(KvStore::with_backends(local, routes, storage));
    let overrides = Arc::new(overrides);
    if watch {
        kv.watch();
        overrides.watch()?;
    }
    Ok(Stores { kv, blob: Arc::new(blob_store(config, db)?), overrides, registry })
}

/// The overrides of a `[cluster]` store, opened alone: what commands that only read them
/// (`moat check`, `moat explain`) must see, whether or not this node's moat is running.
/// None without a `[cluster]` store (the overrides are in moat's redb file).
pub(crate) fn cluster_overrides(config: &Config) -> Option<anyhow::Result<OverrideStore>> {
    let Some(Backend::Postgres { url, source }) = &config.stores.cluster else { return None };
    Some(open_database(url, source).and_then(|pg| {
        let shown = pg.shown.clone();
        Ok(OverrideStore::on(Arc::new(PgOverrides { pg }), shown)?)
    }))
}

/// Opens a PostgreSQL database; the password its URL may carry is redacted from every log
/// line from now on.
fn open_database(url: &str, source: &str) -> anyhow::Result<Arc<Pg>> {
    if let Some(password) = crate::db::pg::parse_url(url).ok().and_then(|c| c.get_password().map(<[u8]>::to_vec)) {
        crate::log::add_own_secret(format!("{source} password"), String::from_utf8_lossy(&password).into_owned());
    }
    Pg::open(url).map_err(|e| anyhow::anyhow!("{source}: {e}"))
}

/// The buckets: moat's blob folder, but for those that name an S3-compatible service.
fn blob_store(config: &Config, db: &Arc<redb::Database>) -> anyhow::Result<BlobStore> {
    let local: Arc<dyn BlobBackend> = Arc::new(LocalBlobs::new(db.clone(), &config.data_dir));
    #[allow(unused_mut)]
    let mut routes: HashMap<String, Arc<dyn BlobBackend>> = HashMap::new();
    #[cfg(feature = "s3")]
    for (name, s3) in &config.stores.blob {
        for (what, secret) in [("access key", &s3.access_key), ("secret key", &s3.secret_key)] {
            crate::log::add_own_secret(format!("blob.{name} {what}"), secret.clone());
        }
        let backend = crate::bindings::blob::s3::S3Blobs::open(s3).map_err(|e| anyhow::anyhow!("blob.{name}: {e}"))?;
        routes.insert(name.clone(), Arc::new(backend));
    }
    Ok(BlobStore::with_backends(local, routes))
}
