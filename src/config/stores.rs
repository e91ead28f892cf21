//! Where state lives (`[kv]`, `[blob]`, `[cluster]`): moat's own redb file and blob folder by
//! default, or a shared database that several moat nodes use together.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Options of one KV namespace or bucket as written: `{}` or `{ backend = "postgres", url_env = "VAR" }`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BindingOptions {
    pub backend: Option<String>,
    pub url_env: Option<String>,
}

/// `[cluster]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterSection {
    /// This node's name in `moat status` and `/metrics` (default: the host name).
    pub node: Option<String>,
    /// Where overrides and ctx.storage live, shared by every node.
    pub store: Option<BindingOptions>,
}

/// A store's backend, with its credentials read.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Backend {
    /// moat's own file (`data_dir/moat.redb`; blobs under `data_dir/blobs`).
    #[default]
    Local,
    /// A PostgreSQL database; the URL came from `url_env` and is never shown (it may carry a
    /// password).
    Postgres { url: String, url_env: String },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("Local"),
            Self::Postgres { url_env, .. } => write!(f, "Postgres(${url_env})"),
        }
    }
}

/// Every store's backend, resolved.
#[derive(Clone, Debug, Default)]
pub struct Stores {
    /// KV binding → backend (absent: [`Backend::Local`]).
    pub kv: BTreeMap<String, Backend>,
    /// Overrides and ctx.storage.
    pub cluster: Option<Backend>,
    /// This node's name.
    pub node: String,
}

/// `what` (`kv.KV`, `cluster.store`) resolved; `allow` lists the backends this store can have.
fn backend(what: &str, o: &BindingOptions, allow: &[&str]) -> Result<Backend, String> {
    let name = o.backend.as_deref().unwrap_or("redb");
    if !allow.contains(&name) {
        return Err(format!("{what}.backend {name:?} is not one moat knows: use one of {}", allow.join(", ")));
    }
    match name {
        "postgres" => {
            let var = o.url_env.as_deref().ok_or_else(|| {
                format!("{what}: backend \"postgres\" needs url_env = \"VAR\" (a variable holding postgres://USER:PASSWORD@HOST:PORT/DB)")
            })?;
            let url = std::env::var(var).map_err(|_| {
                format!(
                    "{what}.url_env: environment variable {var} is not set (export the database URL before moat starts)"
                )
            })?;
            crate::db::pg::parse_url(&url).map_err(|e| format!("{what}: ${var}: {e}"))?;
            Ok(Backend::Postgres { url, url_env: var.to_string() })
        }
        _ => {
            if o.url_env.is_some() {
                return Err(format!("{what}.url_env: only backend = \"postgres\" takes a URL"));
            }
            Ok(Backend::Local)
        }
    }
}

/// The stores `[kv]`, `[blob]` and `[cluster]` describe.
pub(crate) fn resolve(
    kv: &BTreeMap<String, BindingOptions>,
    blob: &BTreeMap<String, BindingOptions>,
    cluster: Option<&ClusterSection>,
) -> Result<Stores, String> {
    let mut stores = Stores::default();
    for (name, o) in kv {
        stores.kv.insert(name.clone(), backend(&format!("kv.{name}"), o, &["redb", "postgres"])?);
    }
    for (name, o) in blob {
        match (o.backend.as_deref(), &o.url_env) {
            (None | Some("local"), None) => {}
            (None | Some("local"), Some(_)) => return Err(format!("blob.{name}.url_env: a local bucket takes no URL")),
            (Some(other), _) => {
                return Err(format!(
                    "blob.{name}.backend {other:?}: buckets are kept in moat's blob folder (\"local\"); no shared bucket backend is built yet"
                ));
            }
        }
    }
    if let Some(c) = cluster {
        if let Some(store) = &c.store {
            stores.cluster = Some(backend("cluster.store", store, &["redb", "postgres"])?);
        }
        if let Some(node) = c
            .node
            .as_ref()
            .filter(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            return Err(format!("cluster.node {node:?}: use letters, digits, -, _ and ."));
        }
    }
    stores.node = cluster.and_then(|c| c.node.clone()).unwrap_or_else(host_name);
    Ok(stores)
}

/// The machine's host name (the default node name).
fn host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}
