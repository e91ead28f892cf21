//! `moat check`: loads and validates every class as `serve` would, then looks for what
//! `serve` or the first request would hit: secrets that cannot be read, `[tls] extra_ca`
//! files that are unreadable or empty, globals the code reads that nothing defines. Each
//! problem is one line with where it is and what to do; warnings name traps that work but
//! surprise (`--strict` makes them errors).

use std::fmt::Write as _;

use super::load_all;
use crate::config::Config;
use crate::policy::{CanonicalHost, ClassPolicy};

/// Loads and validates every class, prints a summary, then the problems and warnings found
/// (on stderr). `Err` (exit 2) when there is a problem, or a warning under `strict`.
pub fn check(config: &Config, strict: bool) -> Result<(), String> {
    let generations = load_all(config)?;
    let mut problems: Vec<String> = crate::bindings::secret_problems(config);
    let extra_ca = config.file.tls.as_ref().map(|t| t.extra_ca.clone()).unwrap_or_default();
    if let Err(e) = crate::upstream::tls::UpstreamTls::new(&extra_ca) {
        problems.push(format!("{e} (list PEM files with at least one certificate)"));
    }
    let mut warnings = Vec::new();
    let mut out = String::new();
    for (g, c) in generations.iter().zip(&config.classes) {
        summary(&mut out, g, c);
        match crate::script::lint::undefined_in_generation(g, &config.limits) {
            Ok(found) => problems.extend(found.iter().map(ToString::to_string)),
            Err(e) => problems.push(format!("{}: {e}", g.path.display())),
        }
        for (key, w) in traps(&g.policy) {
            let at = line_of(&g.source, &format!("\"{key}\"")).map_or(String::new(), |l| format!(":{l}"));
            warnings.push(format!("{}{at}: warning: {w}", g.path.display()));
        }
    }
    match super::all_stored_overrides(config)? {
        Ok(stored) => problems.extend(unknown_override_handlers(&stored, &generations)),
        // Checked where the store is out of reach (a CI job, say): said, not a failure.
        Err(e) => warnings.push(format!(
            "cluster.store: warning: {e}: its overrides were not checked (run moat check where the store is reachable)"
        )),
    }
    print!("{out}");
    for line in problems.iter().chain(&warnings) {
        eprintln!("{line}");
    }
    match (problems.len(), warnings.len()) {
        (0, 0) => Ok(()),
        (0, n) if !strict => {
            eprintln!("{n} warning(s); --strict makes them errors");
            Ok(())
        }
        (p, w) => Err(format!("{p} problem(s), {w} warning(s): moat serve or the first request would meet them")),
    }
}

/// What `check` prints for one class.
fn summary(out: &mut String, g: &crate::script::Generation, c: &crate::config::ClassConfig) {
    let p = &g.policy;
    let _ = writeln!(out, "class {} ({}) on {}: ok", g.class, g.path.display(), c.listen);
    let _ = writeln!(
        out,
        "  enableInternet = {}, interceptHttps = {}, redactSecrets = {}",
        p.enable_internet, p.intercept_https, p.redact_secrets
    );
    let list = |l: &Option<crate::policy::HostList>| match l {
        None => "(not set)".to_string(),
        Some(l) => format!("[{}]", l.patterns().iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")),
    };
    let _ = writeln!(out, "  allowedHosts = {}", list(&p.allowed));
    let _ = writeln!(out, "  deniedHosts = {}", list(&p.denied));
    let keys: Vec<&str> = p.by_host.iter().map(|(k, _)| k.as_str()).collect();
    let _ = writeln!(out, "  outboundByHost = [{}]", keys.join(", "));
    let _ = writeln!(out, "  outbound = {}", if p.has_outbound { "defined" } else { "(none)" });
    let names: Vec<&str> = p.handler_names.iter().map(String::as_str).collect();
    let _ = writeln!(out, "  outboundHandlers = [{}]", names.join(", "));
    if !g.modules.is_empty() {
        let _ = writeln!(out, "  modules = [{}]", g.modules.keys().cloned().collect::<Vec<_>>().join(", "));
    }
}

/// Stored overrides (set with the admin API, `moat policy` or Lua) that name a handler no
/// class's `outboundHandlers` defines: after an edit removed it, that container's requests
/// would fail with 500 until the override is changed.
fn unknown_override_handlers(
    stored: &super::StoredOverrides,
    generations: &[crate::script::Generation],
) -> Vec<String> {
    let defined = |name: &str| generations.iter().any(|g| g.policy.handler_names.contains(name));
    let mut out = Vec::new();
    for (id, spec) in stored {
        let named = spec
            .outbound_handler
            .iter()
            .map(|h| ("setOutboundHandler".to_string(), h))
            .chain(spec.outbound_by_host.iter().map(|(host, h)| (format!("setOutboundByHost {host}"), h)));
        for (setter, h) in named {
            if !defined(&h.method) {
                out.push(format!(
                    "container {id}: its override {setter} names {:?}, which outboundHandlers does not define (define it, or moat policy {id} clearOverrides)",
                    h.method
                ));
            }
        }
    }
    out
}

/// The first line of `source` that contains `needle`.
fn line_of(source: &str, needle: &str) -> Option<usize> {
    source.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Policies that load and run, but not as their author meant: (the key, the warning).
fn traps(p: &ClassPolicy) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (key, _) in p.by_host.iter() {
        // Step 2 comes before step 4: a handler on a host the list refuses never runs
        // (Cloudflare's order, and its most common surprise).
        if let Some(allowed) = &p.allowed
            && !covers(allowed, key)
        {
            out.push((key.as_str().to_string(), format!(
                "outboundByHost[\"{}\"] never runs: allowedHosts does not include it and is checked first (add \"{}\" to allowedHosts)",
                key.as_str(),
                key.as_str()
            )));
        }
        if key.port() == Some(443) && !p.intercept_https {
            out.push((key.as_str().to_string(), format!(
                "outboundByHost[\"{}\"] never runs: that port is HTTPS and interceptHttps is false, so moat only tunnels it (set interceptHttps = true)",
                key.as_str()
            )));
        }
    }
    out
}

/// Whether `allowed` lets every host `key` names pass step 2: the same pattern, or a name
/// (not a glob) that one of its patterns matches on the key's port (or every port).
fn covers(allowed: &crate::policy::HostList, key: &crate::policy::HostPattern) -> bool {
    if allowed.patterns().iter().any(|a| a.as_str() == key.as_str()) {
        return true;
    }
    if key.as_str().contains('*') || key.ip_net().is_some() {
        return false;
    }
    let Ok((name, _)) = crate::policy::host::split_authority(key.as_str()) else { return false };
    let Ok(host) = CanonicalHost::parse(name) else { return false };
    match key.port() {
        Some(port) => allowed.matches(&host, port),
        None => [80, 443].iter().all(|&port| allowed.matches(&host, port)),
    }
}
