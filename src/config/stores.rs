//! Where state lives (`[kv]`, `[blob]`, `[cluster]`): moat's own redb file and blob folder by
//! default, or a shared database that several moat nodes use together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Options of one KV namespace or bucket as written: `{}` or `{ backend = "postgres", url_env = "VAR" }`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BindingOptions {
    pub backend: Option<String>,
    pub url_env: Option<String>,
    /// `backend = "s3"`: the bucket's name at the service.
    pub bucket: Option<String>,
    /// `backend = "s3"`: the service's URL (default: AWS S3 of `region`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Variables holding the access key id and the secret key (default: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`).
    pub access_key_env: Option<String>,
    pub secret_key_env: Option<String>,
    /// The same, read from files (a mounted secret); trailing newlines removed.
    pub url_file: Option<PathBuf>,
    pub access_key_file: Option<PathBuf>,
    pub secret_key_file: Option<PathBuf>,
}

/// An S3-compatible bucket, with its credentials read (never shown).
#[derive(Clone)]
pub struct S3Options {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Options {{ bucket: {:?}, endpoint: {:?}, region: {:?} }}", self.bucket, self.endpoint, self.region)
    }
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
    /// A PostgreSQL database; the URL came from `source` (`$VAR` or a file) and is never
    /// shown (it may carry a password).
    Postgres { url: String, source: String },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("Local"),
            Self::Postgres { source, .. } => write!(f, "Postgres({source})"),
        }
    }
}

/// Every store's backend, resolved.
#[derive(Clone, Debug, Default)]
pub struct Stores {
    /// KV binding → backend (absent: [`Backend::Local`]).
    pub kv: BTreeMap<String, Backend>,
    /// Bucket binding → its S3-compatible service (absent: moat's blob folder).
    pub blob: BTreeMap<String, S3Options>,
    /// Overrides and ctx.storage.
    pub cluster: Option<Backend>,
    /// This node's name.
    pub node: String,
}

/// A credential given as `KEY_env = "VAR"` or `KEY_file = "PATH"` (else the variable
/// `default`): its value, and where it came from (`$VAR` or the path) for messages.
fn credential(
    what: &str,
    key: &str,
    (env, file): (Option<&str>, Option<&Path>),
    default: Option<&str>,
    rel: &dyn Fn(&Path) -> PathBuf,
) -> Result<(String, String), String> {
    match (env.or(if file.is_none() { default } else { None }), file) {
        (Some(_), Some(_)) => Err(format!("{what}: set one of {key}_env, {key}_file")),
        (Some(var), None) => std::env::var(var).map(|v| (v, format!("${var}"))).map_err(|_| {
            format!("{what}: environment variable {var} is not set (export it before moat starts, or use {key}_file)")
        }),
        (None, Some(path)) => {
            let path = rel(path);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("{what}.{key}_file: cannot read {}: {e}", path.display()))?;
            Ok((text.trim_end_matches(['\r', '\n']).to_string(), path.display().to_string()))
        }
        (None, None) => Err(format!("{what}: give {key}_env = \"VAR\" or {key}_file = \"PATH\"")),
    }
}

/// `what` (`kv.KV`, `cluster.store`) resolved; `allow` lists the backends this store can have.
fn backend(what: &str, o: &BindingOptions, allow: &[&str], rel: &dyn Fn(&Path) -> PathBuf) -> Result<Backend, String> {
    let name = o.backend.as_deref().unwrap_or("redb");
    if !allow.contains(&name) {
        return Err(format!("{what}.backend {name:?} is not one moat knows: use one of {}", allow.join(", ")));
    }
    let url_given = o.url_env.is_some() || o.url_file.is_some();
    match name {
        "postgres" => {
            if !url_given {
                return Err(format!(
                    "{what}: backend \"postgres\" needs url_env = \"VAR\" or url_file = \"PATH\" (holding postgres://USER:PASSWORD@HOST:PORT/DB)"
                ));
            }
            let (url, source) = credential(what, "url", (o.url_env.as_deref(), o.url_file.as_deref()), None, rel)?;
            crate::db::pg::parse_url(&url).map_err(|e| format!("{what}: {source}: {e}"))?;
            Ok(Backend::Postgres { url, source })
        }
        _ => {
            if url_given {
                return Err(format!("{what}: only backend = \"postgres\" takes a URL"));
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
    rel: &dyn Fn(&Path) -> PathBuf,
) -> Result<Stores, String> {
    let mut stores = Stores::default();
    for (name, o) in kv {
        stores.kv.insert(name.clone(), backend(&format!("kv.{name}"), o, &["redb", "postgres"], rel)?);
    }
    for (name, o) in blob {
        if let Some(s3) = bucket(name, o, rel)? {
            stores.blob.insert(name.clone(), s3);
        }
    }
    if let Some(c) = cluster {
        if let Some(store) = &c.store {
            stores.cluster = Some(backend("cluster.store", store, &["redb", "postgres"], rel)?);
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

/// A bucket's backend: `None` for moat's blob folder.
fn bucket(name: &str, o: &BindingOptions, rel: &dyn Fn(&Path) -> PathBuf) -> Result<Option<S3Options>, String> {
    let what = format!("blob.{name}");
    let s3_only = [("bucket", o.bucket.is_some()), ("endpoint", o.endpoint.is_some()), ("region", o.region.is_some())];
    let s3_only = s3_only.into_iter().chain([
        ("access_key_env", o.access_key_env.is_some()),
        ("secret_key_env", o.secret_key_env.is_some()),
        ("access_key_file", o.access_key_file.is_some()),
        ("secret_key_file", o.secret_key_file.is_some()),
    ]);
    if o.url_env.is_some() || o.url_file.is_some() {
        return Err(format!("{what}.url_env: a bucket takes no URL (backend = \"s3\" takes endpoint, bucket, region)"));
    }
    match o.backend.as_deref() {
        None | Some("local") => match s3_only.into_iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(format!("{what}.{key}: only backend = \"s3\" takes it")),
            None => Ok(None),
        },
        Some("s3") if cfg!(feature = "s3") => {
            let bucket = o.bucket.clone().ok_or_else(|| format!("{what}: backend \"s3\" needs bucket = \"NAME\""))?;
            let (access_key, _) = credential(
                &what,
                "access_key",
                (o.access_key_env.as_deref(), o.access_key_file.as_deref()),
                Some("AWS_ACCESS_KEY_ID"),
                rel,
            )?;
            let (secret_key, _) = credential(
                &what,
                "secret_key",
                (o.secret_key_env.as_deref(), o.secret_key_file.as_deref()),
                Some("AWS_SECRET_ACCESS_KEY"),
                rel,
            )?;
            if let Some(e) = &o.endpoint {
                url::Url::parse(e)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| format!("{what}.endpoint {e:?}: write http(s)://HOST[:PORT]"))?;
            }
            let region = o.region.clone().unwrap_or_else(|| "us-east-1".into());
            Ok(Some(S3Options { bucket, endpoint: o.endpoint.clone(), region, access_key, secret_key }))
        }
        Some(other) => {
            let known = if cfg!(feature = "s3") { "local, s3" } else { "local (this moat was built without s3)" };
            Err(format!("{what}.backend {other:?} is not one moat knows: use one of {known}"))
        }
    }
}

/// The machine's host name (the default node name).
fn host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}
