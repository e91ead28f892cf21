//! `moat.toml` → typed [`Config`] (SPEC 10). Unknown keys are errors naming key and file.

mod limits;
mod stores;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::units::{parse_duration, parse_size, size_arg};
pub use limits::Limits;
pub(crate) use stores::BindingOptions;
pub use stores::{Backend, S3Options, Stores};

use crate::identity::ContainerId;

/// The default explicit-proxy listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";

/// A config problem; the CLI prints it as one line and exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Everything a running instance needs to know, after defaults and command-line flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Database, blobs, admin socket, CA if persisted.
    pub(crate) data_dir: PathBuf,
    /// One policy script per class, each with its listener.
    pub(crate) classes: Vec<ClassConfig>,
    /// Explicit-proxy authentication: container → token. Empty: no authentication.
    pub(crate) containers: BTreeMap<ContainerId, ContainerAuth>,
    /// Static answers for moat's resolver (`[dns] hosts` and `--resolve`).
    pub(crate) dns_hosts: BTreeMap<String, IpAddr>,
    /// SPEC 9.
    pub(crate) limits: Limits,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    /// `[vars]`: plain strings for `env`.
    pub(crate) vars: BTreeMap<String, String>,
    /// Where KV namespaces, overrides and ctx.storage live; this node's name.
    pub(crate) stores: Stores,
    /// The sections that later parts of moat read, kept as parsed.
    pub(crate) file: ConfigFile,
}

/// One class: a policy script served on one listener.
#[derive(Clone, Debug)]
pub(crate) struct ClassConfig {
    /// `ctx.className`: the config's name, else the policy's file stem. Shared (not copied) by
    /// every request's log line and handler scope.
    pub name: std::sync::Arc<str>,
    pub policy: PathBuf,
    pub listen: SocketAddr,
    /// `moat test` file whose tests a new generation must pass before it serves.
    pub tests: Option<PathBuf>,
}

/// How a container proves its identity on the explicit proxy.
#[derive(Clone)]
pub(crate) struct ContainerAuth {
    /// The expected `Proxy-Authorization` password.
    pub token: String,
}

impl std::fmt::Debug for ContainerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContainerAuth { token: [redacted] }")
    }
}

/// `moat.toml` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub class: Vec<ClassEntry>,
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub kv: BTreeMap<String, BindingOptions>,
    #[serde(default)]
    pub blob: BTreeMap<String, BindingOptions>,
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerEntry>,
    pub tls: Option<TlsSection>,
    pub dns: Option<DnsSection>,
    pub cluster: Option<stores::ClusterSection>,
    #[serde(default)]
    limits: limits::LimitsFile,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClassEntry {
    pub name: Option<String>,
    pub policy: PathBuf,
    pub listen: Option<String>,
    pub tests: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminSection {
    pub listen: Option<String>,
    pub tcp: Option<String>,
    pub token_env: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContainerEntry {
    pub token_env: Option<String>,
    pub token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    #[serde(default)]
    pub extra_ca: Vec<PathBuf>,
    pub ca_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DnsSection {
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
}

/// Command-line flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--config F`: the file to read instead of `./moat.toml`.
    pub config: Option<PathBuf>,
    /// `--policy F`: one class serving this policy (instead of the file's `[[class]]`).
    pub policy: Option<PathBuf>,
    /// `--listen ADDR`: the explicit proxy's address for that class.
    pub listen: Option<String>,
    /// `--data-dir D`: the data folder.
    pub data_dir: Option<PathBuf>,
    /// `--resolve HOST=IP`, repeatable: static answers for moat's resolver.
    pub resolve: Vec<String>,
    /// `--admin PATH|ADDR`: the admin socket (or TCP address) to serve or talk to.
    pub admin: Option<String>,
}

impl Config {
    /// Whether any class has a policy to serve (`moat serve` needs one).
    pub fn has_policy(&self) -> bool {
        !self.classes.is_empty()
    }

    /// `[tls] ca_dir`: where a persisted CA lives (None: an ephemeral CA per process).
    pub fn ca_dir(&self) -> Option<&Path> {
        self.file.tls.as_ref().and_then(|t| t.ca_dir.as_deref())
    }

    /// Loads `--config F`, else `./moat.toml` if present, else the embedded defaults; then
    /// applies the flags. Relative paths in the file are relative to the file's folder.
    pub fn load(flags: &Overrides) -> Result<Self, ConfigError> {
        let path = match &flags.config {
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from("moat.toml")).filter(|p| p.is_file()),
        };
        let (file, base) = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError(format!("{}: cannot read: {e}", p.display())))?;
                (parse_file(&text, p)?, p.parent().map(Path::to_path_buf).unwrap_or_default())
            }
            None => (ConfigFile::default(), PathBuf::new()),
        };
        Self::build(file, base, path, flags)
    }

    fn build(file: ConfigFile, base: PathBuf, source: Option<PathBuf>, flags: &Overrides) -> Result<Self, ConfigError> {
        let name = source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "moat.toml".into());
        let err = |msg: String| ConfigError(format!("{name}: {msg}"));
        let rel =
            |p: &Path| if p.is_absolute() || base.as_os_str().is_empty() { p.to_path_buf() } else { base.join(p) };

        let data_dir = flags.data_dir.clone().or_else(|| file.data_dir.as_deref().map(rel)).unwrap_or(".moat".into());
        let mut classes = Vec::new();
        if let Some(policy) = &flags.policy {
            let listen = flags.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
            classes.push(ClassConfig {
                name: stem(policy).into(),
                policy: policy.clone(),
                listen: parse_listen(listen).map_err(|m| ConfigError(format!("--listen: {m}")))?,
                tests: None,
            });
        } else {
            for (i, c) in file.class.iter().enumerate() {
                let listen = match (i, &flags.listen, &c.listen) {
                    (0, Some(l), _) => l.as_str(),
                    (_, _, Some(l)) => l.as_str(),
                    (_, _, None) => DEFAULT_LISTEN,
                };
                classes.push(ClassConfig {
                    name: c.name.clone().unwrap_or_else(|| stem(&c.policy)).into(),
                    policy: rel(&c.policy),
                    listen: parse_listen(listen).map_err(|m| err(format!("class[{i}].listen: {m}")))?,
                    tests: c.tests.as_deref().map(rel),
                });
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &classes {
            if !seen.insert(c.name.clone()) {
                return Err(err(format!("two classes are named {:?}; give one a `name`", c.name)));
            }
        }

        let mut containers = BTreeMap::new();
        for (id, entry) in &file.containers {
            let cid = ContainerId::parse(id).map_err(|e| err(format!("containers.{id}: {e}")))?;
            let token = match (&entry.token_env, &entry.token_file) {
                (Some(var), None) => std::env::var(var)
                    .map_err(|_| err(format!("containers.{id}.token_env: environment variable {var} is not set")))?,
                (None, Some(f)) => std::fs::read_to_string(rel(f))
                    .map_err(|e| err(format!("containers.{id}.token_file: cannot read {}: {e}", f.display())))?
                    .trim_end()
                    .to_string(),
                _ => return Err(err(format!("containers.{id}: set exactly one of token_env, token_file"))),
            };
            if token.is_empty() {
                return Err(err(format!("containers.{id}: the token is empty")));
            }
            containers.insert(cid, ContainerAuth { token });
        }

        let mut dns_hosts = BTreeMap::new();
        let static_hosts = file.dns.iter().flat_map(|d| d.hosts.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (host, ip) in static_hosts {
            let ip = ip.parse().map_err(|_| err(format!("dns.hosts.{host}: {ip:?} is not an IP address")))?;
            dns_hosts.insert(canonical_dns_key(&host).map_err(err)?, ip);
        }
        for r in &flags.resolve {
            let (host, ip) = r.split_once('=').ok_or_else(|| ConfigError(format!("--resolve {r:?}: write HOST=IP")))?;
            let ip = ip.parse().map_err(|_| ConfigError(format!("--resolve {r:?}: {ip:?} is not an IP address")))?;
            dns_hosts.insert(canonical_dns_key(host).map_err(|m| ConfigError(format!("--resolve: {m}")))?, ip);
        }

        let limits = file.limits.resolve().map_err(err)?;
        let mut file = file;
        for src in file.secrets.values_mut() {
            src.file = src.file.as_deref().map(rel);
        }
        if let Some(tls) = file.tls.as_mut() {
            tls.extra_ca = tls.extra_ca.iter().map(|p| rel(p)).collect();
            tls.ca_dir = tls.ca_dir.as_deref().filter(|p| !p.as_os_str().is_empty()).map(rel);
        }
        let admin = flags.admin.clone().or_else(|| file.admin.as_ref().and_then(|a| a.listen.clone()));
        let admin_socket = match admin {
            None => data_dir.join("admin.sock"),
            Some(a) => match a.strip_prefix("unix:") {
                Some(p) => rel(Path::new(p)),
                None => {
                    return Err(err(format!(
                        "admin.listen {a:?}: write unix:PATH (a TCP admin listener is not supported yet)"
                    )));
                }
            },
        };
        let stores = stores::resolve(&file.kv, &file.blob, file.cluster.as_ref(), &rel).map_err(err)?;
        Ok(Self {
            data_dir,
            classes,
            containers,
            dns_hosts,
            limits,
            admin_socket,
            vars: file.vars.clone(),
            stores,
            file,
        })
    }
}

impl ConfigFile {
    /// The `[limits]` section applied over the defaults; the error names the bad key.
    pub fn limits(&self) -> Result<Limits, String> {
        self.limits.resolve()
    }
}

/// Parses a config file's text; errors name the file, the line and the key.
pub(crate) fn parse_file(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        let msg = e.message().lines().next().unwrap_or("invalid").replace("field", "key");
        match line {
            Some(l) => ConfigError(format!("{}:{l}: {msg}", path.display())),
            None => ConfigError(format!("{}: {msg}", path.display())),
        }
    })
}

fn canonical_dns_key(host: &str) -> Result<String, String> {
    match crate::policy::CanonicalHost::parse(host) {
        Ok(crate::policy::CanonicalHost::Name(n)) => Ok(n),
        _ => Err(format!("{host:?} is not a host name")),
    }
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "default".into())
}

/// `127.0.0.1:3128`, `[::1]:3128`, or `:3128` (loopback).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let full = if text.starts_with(':') { format!("127.0.0.1{text}") } else { text.to_string() };
    full.parse().map_err(|_| format!("{text:?} is not an address like 127.0.0.1:3128"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let e = parse_file("data_dir = \"x\"\n[limits]\nbogus = 1\n", Path::new("conf/moat.toml")).unwrap_err();
        assert!(e.0.starts_with("conf/moat.toml:3:"), "{e}");
        assert!(e.0.contains("bogus"), "{e}");
    }

    #[test]
    fn classes_and_flags() {
        let f =
            parse_file("[[class]]\npolicy = \"p/agent.lua\"\nlisten = \"127.0.0.1:4000\"\n", Path::new("c/moat.toml"))
                .unwrap();
        let c = Config::build(f, "c".into(), None, &Overrides::default()).unwrap();
        assert_eq!(&*c.classes[0].name, "agent");
        assert_eq!(c.classes[0].policy, Path::new("c/p/agent.lua"));
        assert_eq!(c.classes[0].listen.port(), 4000);
        let bad = parse_file("[limits]\nidle_timeout = \"soon\"\n", Path::new("m.toml")).unwrap();
        let e = Config::build(bad, "".into(), None, &Overrides::default()).unwrap_err();
        assert!(e.0.contains("limits.idle_timeout"), "{e}");
    }
}
