//! `moat check`, `moat explain`, `moat init`: commands that inspect or scaffold policies;
//! [`store`]: `moat kv` and `moat blob`.

mod check;
pub mod containers;
mod init;
pub mod run;

pub use check::check;
pub use init::init;

/// `moat __sandbox-init SOCKET -- CMD`: the sandbox's first process (see `sandbox::init`);
/// returns its exit code.
/// `moat __sandbox-exec PID DATA_DIR -- CMD`: another process in a running container (see
/// `sandbox::exec`); returns its exit code.
pub fn sandbox_exec(pid: u32, data_dir: &std::path::Path, cmd: &[String]) -> i32 {
    crate::sandbox::exec::main(pid, data_dir, cmd)
}

pub fn sandbox_init(
    handover: std::path::PathBuf,
    hide: Vec<std::path::PathBuf>,
    user: &str,
    relay: bool,
    cmd: Vec<String>,
) -> i32 {
    let user = match crate::sandbox::Become::parse(user) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("moat: {e}");
            return 2;
        }
    };
    crate::sandbox::init::main(&crate::sandbox::init::InitArgs { handover, hide, relay, user, cmd })
}
pub mod store;

use std::path::Path;

use crate::config::Config;
use crate::identity::ContainerId;
use crate::policy::overrides::OverrideSpec;
use crate::policy::{CanonicalHost, Decision, decide, host::split_authority};
use crate::script::{Generation, load_generation};

pub(crate) fn load_all(config: &Config) -> Result<Vec<Generation>, String> {
    if config.classes.is_empty() {
        return Err("no policy: pass --policy FILE or add a [[class]] to moat.toml".into());
    }
    config
        .classes
        .iter()
        .map(|c| load_generation(&c.name, &c.policy, 1, &config.limits).map_err(|e| e.to_string()))
        .collect()
}

/// Prints which step decides `METHOD URL` for a container, without running any handler.
pub fn explain(config: &Config, id: Option<&str>, method: &str, url: &str) -> Result<(), String> {
    let id = ContainerId::parse(id.unwrap_or("default")).map_err(|e| format!("--id: {e}"))?;
    let gens = load_all(config)?;
    let g = gens.first().ok_or("no class")?;
    // `CONNECT host:port`, as a client sends it: explained as the https URL of that authority.
    let shown = url;
    let connect_url;
    let url = if method.eq_ignore_ascii_case("CONNECT") && !url.contains("://") {
        connect_url = format!("https://{url}/");
        connect_url.as_str()
    } else {
        url
    };
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not an absolute URL: {e}"))?;
    let (https, default_port) = match parsed.scheme() {
        "http" => (false, 80),
        "https" => (true, 443),
        s => return Err(format!("unsupported scheme {s:?}: use http:// or https://")),
    };
    // Take the authority as written so that every numeric IPv4 form canonicalises as moat would.
    let after = &url[url.find("://").map_or(0, |i| i + 3)..];
    let authority = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
    let (host, port) = split_authority(authority).map_err(|e| e.to_string())?;
    let host = CanonicalHost::parse(host).map_err(|e| e.to_string())?;
    let port = port.unwrap_or(default_port);
    let (spec, unread) = stored_overrides(config, &id)?;
    let (overrides, dropped) = spec.compile(&g.policy);
    let inst = (!spec.is_empty()).then_some(&overrides);
    let v = decide(&host, port, &g.policy, inst);
    println!("{} {shown}", method.to_ascii_uppercase());
    match inst {
        None => println!("  container: {id} (class {}, no runtime overrides)", g.class),
        Some(_) => println!(
            "  container: {id} (class {}, runtime overrides: {})",
            g.class,
            serde_json::to_string(&spec).unwrap_or_default()
        ),
    }
    if let Some(reason) = unread {
        println!("  note: the [cluster] store cannot be read ({reason}): shown without runtime overrides");
    }
    for name in dropped {
        println!("  note: override names handler {name:?}, which the policy no longer has; it is ignored");
    }
    println!("  canonical host: {host}, port {port}");
    println!("  {}", v.explain());
    let outcome = match &v.decision {
        Decision::Deny(r) => format!("deny: 520 Origin is disallowed, moat-denied: {r}"),
        Decision::Handler(h) => format!("handler {} (not run by explain)", h.label()),
        Decision::Egress => "egress: moat resolves the host, checks every address, and forwards".to_string(),
    };
    println!("  decision: {outcome}");
    if https && !g.policy.intercept_https {
        let t = crate::policy::decide_tunnel(&host, port, &g.policy, inst);
        let tunnel = match t.decision {
            Decision::Deny(r) => format!("refused ({r})"),
            _ => "allowed (spliced, not intercepted)".into(),
        };
        println!("  note: interceptHttps is false, so handlers do not run for https; the CONNECT tunnel is {tunnel}");
    }
    Ok(())
}

/// Every container's stored overrides: from the `[cluster]` store when there is one, else
/// from the running moat when it holds the database, else from the database.
/// `Ok(Err(reason))` when they are in a `[cluster]` store that cannot be read from here.
pub(crate) fn all_stored_overrides(config: &Config) -> Result<Result<StoredOverrides, String>, String> {
    if let Some(store) = crate::serve::stores::cluster_overrides(config) {
        return Ok(store.map(|store| every_spec(&store)).map_err(|e| format!("{e:#}")));
    }
    local_stored_overrides(config).map(Ok)
}

/// Every container's overrides, by container id.
pub(crate) type StoredOverrides = Vec<(String, OverrideSpec)>;

fn every_spec(store: &crate::proxy::overrides::OverrideStore) -> StoredOverrides {
    store.containers().into_iter().map(|id| (id.clone(), store.spec(&id))).collect()
}

fn local_stored_overrides(config: &Config) -> Result<StoredOverrides, String> {
    if !config.data_dir.join("moat.redb").exists() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = match crate::db::open(&config.data_dir) {
        Ok(db) => {
            let store =
                crate::proxy::overrides::OverrideStore::open(db, &config.data_dir).map_err(|e| e.to_string())?;
            return Ok(every_spec(&store));
        }
        Err(crate::db::OpenError::InUse) => {
            let (code, body) = crate::admin::client::call(&config.admin_socket, "GET", "/v1/containers", None)?;
            if code != 200 {
                return Err(format!("the running moat answered {code} for /v1/containers: {body}"));
            }
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("admin API: {e}"))?;
            serde_json::from_value(v["containers"].clone()).map_err(|e| format!("admin API: {e}"))?
        }
        Err(e) => return Err(e.to_string()),
    };
    ids.into_iter()
        .map(|id| {
            let cid = ContainerId::parse(&id).map_err(|e| format!("{id}: {e}"))?;
            Ok((id, local_overrides(config, &cid)?))
        })
        .collect()
}

/// The overrides `id` has: read from the `[cluster]` store when there is one (none, and the
/// reason, when it cannot be read), else as [`local_overrides`].
fn stored_overrides(config: &Config, id: &ContainerId) -> Result<(OverrideSpec, Option<String>), String> {
    if let Some(store) = crate::serve::stores::cluster_overrides(config) {
        return Ok(match store {
            Ok(store) => (store.spec(id.as_str()), None),
            Err(e) => (OverrideSpec::default(), Some(format!("{e:#}"))),
        });
    }
    local_overrides(config, id).map(|spec| (spec, None))
}

/// The overrides `id` has in this node's database: asked of the running moat when it holds
/// the database, else read from it; none when there is no database yet (nothing was ever set).
fn local_overrides(config: &Config, id: &ContainerId) -> Result<OverrideSpec, String> {
    if !config.data_dir.join("moat.redb").exists() {
        return Ok(OverrideSpec::default());
    }
    match crate::db::open(&config.data_dir) {
        Ok(db) => Ok(crate::proxy::overrides::OverrideStore::open(db, &config.data_dir)
            .map_err(|e| e.to_string())?
            .spec(id.as_str())),
        Err(crate::db::OpenError::InUse) => {
            let path = format!("/v1/containers/{id}");
            let (code, body) = crate::admin::client::call(&config.admin_socket, "GET", &path, None)?;
            if code != 200 {
                return Err(format!("the running moat answered {code} for {path}: {body}"));
            }
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("admin API: {e}"))?;
            serde_json::from_value(v["overrides"].clone()).map_err(|e| format!("admin API: {e}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `moat test`: runs `files` (default: the classes' test files) and prints one line per test
/// and a summary. `Ok(false)` when a test failed; `Err` when there is nothing to run.
pub fn test(config: &Config, files: &[std::path::PathBuf]) -> Result<bool, String> {
    let files = if files.is_empty() { crate::policytest::discover(config) } else { files.to_vec() };
    if files.is_empty() {
        return Err("no test files: write POLICY_test.lua beside the policy, or name files (moat test FILE...)".into());
    }
    let tally = crate::policytest::run_files(config, &files, &mut |line, _| println!("{line}"));
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(tally.failed == 0)
}

/// The CA certificate of the instance with this config: the persisted CA (made now when
/// `[tls] ca_dir` is set and holds none yet), else the one the running instance wrote.
fn ca_cert(config: &Config) -> Result<(std::path::PathBuf, String), String> {
    if let Some(dir) = config.ca_dir() {
        let ca = crate::tls::Ca::load_or_create(dir)?;
        return Ok((absolute(&dir.join(crate::tls::ca::CERT_FILE)), ca.cert_pem.clone()));
    }
    let path = absolute(&crate::tls::ca::cert_path(config));
    match std::fs::read_to_string(&path) {
        Ok(pem) => Ok((path, pem)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "no CA certificate at {}: start moat serve with this data folder first (its CA changes on every start unless [tls] ca_dir is set)",
            path.display()
        )),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// `moat ca path`.
pub fn ca_path(config: &Config) -> Result<(), String> {
    println!("{}", ca_cert(config)?.0.display());
    Ok(())
}

/// `moat ca export [--out F]`.
pub fn ca_export(config: &Config, out: Option<&Path>) -> Result<(), String> {
    let (_, pem) = ca_cert(config)?;
    match out {
        Some(f) => std::fs::write(f, pem).map_err(|e| format!("cannot write {}: {e}", f.display())),
        None => {
            print!("{pem}");
            Ok(())
        }
    }
}

fn absolute(p: &Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
