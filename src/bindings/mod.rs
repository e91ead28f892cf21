//! `env` bindings (SPEC 6): KV namespaces, blob buckets, secrets and vars.

pub mod blob;
pub mod kv;

use std::collections::BTreeMap;

use crate::config::Config;

/// Prefix of environment variables that become secrets when no config names them.
pub const SECRET_ENV_PREFIX: &str = "MOAT_SECRET_";

/// The values behind `env`, read at start. Shared by every worker. (No `Debug`: it holds
/// secret values.)
#[derive(Clone, Default)]
pub struct Bindings {
    /// `[vars]`: plain strings.
    pub vars: BTreeMap<String, String>,
    /// Secret name → value. Never logged (see [`crate::log::redact`]). Re-read at reload.
    secrets: std::sync::Arc<std::sync::RwLock<BTreeMap<String, String>>>,
    /// KV binding names (`[kv]`, or `KV` when the config has no `[kv]`).
    pub kv_names: Vec<String>,
    /// The store behind KV bindings and `ctx.storage`, once the database is open.
    pub kv: Option<std::sync::Arc<kv::KvStore>>,
    /// Bucket binding names (`[blob]`, or `BUCKET` when the config has no `[blob]`).
    pub blob_names: Vec<String>,
    /// The store behind buckets.
    pub blob: Option<std::sync::Arc<blob::BlobStore>>,
}

impl Bindings {
    /// Reads `[secrets]` (env or file), every `MOAT_SECRET_<NAME>` variable, and `[vars]`.
    pub fn load(config: &Config) -> std::result::Result<Self, String> {
        let secrets = read_secrets(config)?;
        crate::log::set_secrets(secrets.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        Self::with_secrets(config, secrets)
    }

    /// The bindings `config` declares, with these secret values (`moat test` gives its own;
    /// registering them for redaction is the caller's business).
    pub fn with_secrets(config: &Config, secrets: BTreeMap<String, String>) -> std::result::Result<Self, String> {
        let kv_names =
            if config.file.kv.is_empty() { vec!["KV".to_string()] } else { config.file.kv.keys().cloned().collect() };
        let blob_names = if config.file.blob.is_empty() {
            vec!["BUCKET".to_string()]
        } else {
            config.file.blob.keys().cloned().collect()
        };
        for (section, name) in kv_names.iter().map(|n| ("kv", n)).chain(blob_names.iter().map(|n| ("blob", n))) {
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("{section}.{name}: binding names are letters, digits and _"));
            }
        }
        let secrets = std::sync::Arc::new(std::sync::RwLock::new(secrets));
        Ok(Self { vars: config.vars.clone(), secrets, kv_names, kv: None, blob_names, blob: None })
    }

    pub fn attach_kv(&mut self, store: std::sync::Arc<kv::KvStore>) {
        self.kv = Some(store);
    }

    pub fn attach_blob(&mut self, store: std::sync::Arc<blob::BlobStore>) {
        self.blob = Some(store);
    }

    /// Reads every secret again (at reload). On error the previous values stay.
    pub fn refresh_secrets(&self, config: &Config) -> std::result::Result<(), String> {
        let fresh = read_secrets(config)?;
        crate::log::set_secrets(fresh.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        *self.secrets.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The secrets as they are now (name → value), for the `env` table of a new Lua state.
    pub fn secret_values(&self) -> BTreeMap<String, String> {
        self.secrets.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What would keep `[secrets]` from being read at start: one line each (`moat check`).
pub fn secret_problems(config: &Config) -> Vec<String> {
    config.file.secrets.iter().filter_map(|(name, src)| read_secret(name, src).err()).collect()
}

/// One `[secrets]` entry's value, from its variable or file.
fn read_secret(name: &str, src: &crate::config::SecretSource) -> std::result::Result<String, String> {
    match (&src.env, &src.file) {
        (Some(var), None) => std::env::var(var).map_err(|_| {
            format!("secrets.{name}: environment variable {var} is not set (export it before moat starts)")
        }),
        (None, Some(path)) => {
            std::fs::read_to_string(path).map(|text| text.trim_end_matches(['\r', '\n']).to_string()).map_err(|e| {
                format!(
                    "secrets.{name}: cannot read {}: {e} (create it, or point file at the right place)",
                    path.display()
                )
            })
        }
        _ => Err(format!("secrets.{name}: set exactly one of env, file")),
    }
}

/// Every `MOAT_SECRET_<NAME>` variable, then `[secrets]` (env or file).
fn read_secrets(config: &Config) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut secrets = BTreeMap::new();
    for (name, value) in std::env::vars() {
        if let Some(n) = name.strip_prefix(SECRET_ENV_PREFIX).filter(|n| !n.is_empty()) {
            secrets.insert(n.to_string(), value);
        }
    }
    for (name, src) in &config.file.secrets {
        secrets.insert(name.clone(), read_secret(name, src)?);
    }
    Ok(secrets)
}
