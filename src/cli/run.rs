//! `moat run -- CMD`: CMD as one container in a sandbox whose only way out is this moat's
//! policy (SPEC 5.2). The policy engine runs in this process, as `moat serve` would run it
//! (same workers, handlers, bindings, hot reload and access log, on the config's data
//! folder), serving the sandbox's transparent listener only.

use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::identity::ContainerId;

/// Runs `cmd` sandboxed as container `id` (a fresh `run-…` id when `None`) on class `class`;
/// returns CMD's exit code.
pub fn run(config: Config, id: Option<&str>, class: Option<String>, cmd: &[String]) -> Result<i32, String> {
    if cmd.is_empty() {
        return Err("nothing to run: moat run [OPTIONS] -- CMD [ARGS...]".into());
    }
    if !config.has_policy() {
        return Err("no policy: pass --policy FILE or add a [[class]] to moat.toml (moat init writes one)".into());
    }
    let container = match id {
        Some(id) => ContainerId::parse(id).map_err(|e| format!("--id: {e}"))?,
        None => fresh_id()?,
    };
    eprintln!("moat run: container {container}");
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create the data folder {}: {e}", config.data_dir.display()))?;
    let handover = config.data_dir.join(format!("{container}.sandbox.sock"));
    // The data folder, and a persisted CA's folder (its private key) wherever it is.
    let mut hidden = vec![config.data_dir.as_path()];
    hidden.extend(config.ca_dir().filter(|d| !d.starts_with(&config.data_dir)));
    let sandbox = crate::sandbox::start(cmd, &sandbox_env(&config), &handover, &hidden)?;
    let mut child = sandbox.child;
    let (done, ended) = tokio::sync::oneshot::channel();
    let code = Arc::new(Mutex::new(None));
    let pid = child.id();
    let waiter = {
        let code = code.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            *code.lock().unwrap_or_else(|e| e.into_inner()) = status.ok().map(crate::sandbox::exit_code);
            let _ = done.send(());
        })
    };
    let serving = crate::serve::SandboxServing {
        http: sandbox.http,
        tls: sandbox.tls,
        handover: sandbox.handover,
        init: sandbox.init,
        dns: sandbox.dns,
        container,
        class,
        ended,
    };
    if let Err(e) = crate::serve::run_with(config, Some(serving)) {
        // moat could not serve: the sandbox must not outlive it.
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = waiter.join();
        return Err(format!("{e:#}"));
    }
    let _ = waiter.join();
    let code = *code.lock().unwrap_or_else(|e| e.into_inner());
    Ok(code.unwrap_or(1))
}

/// A readable id that no other run is likely to have: `run-` and eight hex digits.
fn fresh_id() -> Result<ContainerId, String> {
    let bytes = crate::tls::random_bytes(4).map_err(|e| format!("no random bytes: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    ContainerId::parse(&format!("run-{hex}")).map_err(|e| e.to_string())
}

/// CMD's environment: the caller's, without what moat reads its secrets from and without
/// moat's own variables (SPEC 5.2).
fn sandbox_env(config: &Config) -> Vec<(String, String)> {
    let secret_vars: Vec<&str> = config.file.secrets.values().filter_map(|s| s.env.as_deref()).collect();
    let token_vars: Vec<&str> = config.file.containers.values().filter_map(|c| c.token_env.as_deref()).collect();
    std::env::vars()
        .filter(|(k, _)| {
            !k.starts_with("MOAT_") && !secret_vars.contains(&k.as_str()) && !token_vars.contains(&k.as_str())
        })
        .collect()
}
