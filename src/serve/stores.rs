//! The stores `[kv]` and `[cluster]` ask for: moat's redb file by default, a shared
//! PostgreSQL database per URL otherwise (each URL is opened once, whatever uses it).

use std::collections::HashMap;
use std::sync::Arc;

use crate::bindings::kv::{KvBackend, KvStore, kv_table, postgres::PgKv, redb::RedbKv};
use crate::config::{Backend, Config};
use crate::db::overrides::PgOverrides;
use crate::db::pg::Pg;
use crate::proxy::overrides::OverrideStore;

/// The KV store and the override store, each watching its shared database if it has one.
pub(super) fn open(config: &Config, db: &Arc<redb::Database>) -> anyhow::Result<(Arc<KvStore>, Arc<OverrideStore>)> {
    let mut databases: HashMap<String, Arc<Pg>> = HashMap::new();
    let mut database = |url: &str, url_env: &str| -> anyhow::Result<Arc<Pg>> {
        if let Some(pg) = databases.get(url) {
            return Ok(pg.clone());
        }
        // The URL may carry a password: redacted from every log line from now on.
        if let Some(password) = crate::db::pg::parse_url(url).ok().and_then(|c| c.get_password().map(<[u8]>::to_vec)) {
            crate::log::add_own_secret(format!("{url_env} password"), String::from_utf8_lossy(&password).into_owned());
        }
        let pg = Pg::open(url).map_err(|e| anyhow::anyhow!("${url_env}: {e}"))?;
        databases.insert(url.to_string(), pg.clone());
        Ok(pg)
    };
    let local: Arc<dyn KvBackend> = Arc::new(RedbKv { db: db.clone() });
    let mut routes: HashMap<String, Arc<dyn KvBackend>> = HashMap::new();
    for (name, backend) in &config.stores.kv {
        if let Backend::Postgres { url, url_env } = backend {
            routes.insert(kv_table(name), Arc::new(PgKv { pg: database(url, url_env)? }));
        }
    }
    let (storage, overrides): (Arc<dyn KvBackend>, OverrideStore) = match &config.stores.cluster {
        Some(Backend::Postgres { url, url_env }) => {
            let pg = database(url, url_env)?;
            let shown = pg.shown.clone();
            (Arc::new(PgKv { pg: pg.clone() }), OverrideStore::on(Arc::new(PgOverrides { pg }), shown)?)
        }
        _ => (local.clone(), OverrideStore::open(db.clone(), &config.data_dir)?),
    };
    let kv = Arc::new(KvStore::with_backends(local, routes, storage));
    kv.watch();
    let overrides = Arc::new(overrides);
    overrides.watch()?;
    Ok((kv, overrides))
}
