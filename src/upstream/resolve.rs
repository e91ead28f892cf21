//! moat's own resolver: static answers (`[dns] hosts`, `--resolve`) first, then DNS.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use tokio::sync::OnceCell;

use crate::policy::CanonicalHost;

/// Per-worker resolver (hickory's connections belong to the runtime that made them).
pub struct Resolver {
    static_hosts: Arc<BTreeMap<String, IpAddr>>,
    dns: OnceCell<Result<TokioResolver, String>>,
    /// Set for `moat test`: the answer for every name `static_hosts` does not have (no DNS).
    rest: Option<IpAddr>,
}

impl Resolver {
    /// A resolver that answers `static_hosts` (`[dns] hosts`, `--resolve`) itself and asks the system for the rest.
    pub fn new(static_hosts: Arc<BTreeMap<String, IpAddr>>) -> Self {
        Self { static_hosts, dns: OnceCell::new(), rest: None }
    }

    /// Answers every name that `static_hosts` does not with `ip`, and never asks DNS.
    pub fn answer_rest_with(&mut self, ip: IpAddr) {
        self.rest = Some(ip);
    }

    /// Every address the host resolves to. IP literals resolve to themselves.
    pub async fn resolve(&self, host: &CanonicalHost) -> Result<Vec<IpAddr>, String> {
        let name = match host {
            CanonicalHost::Ip(ip) => return Ok(vec![*ip]),
            CanonicalHost::Name(n) => n,
        };
        if let Some(ip) = self.static_hosts.get(name).or(self.rest.as_ref()) {
            return Ok(vec![*ip]);
        }
        let dns = self.dns().await.map_err(|e| format!("could not resolve {name}: {e}"))?;
        // A trailing dot makes the name absolute, so resolv.conf search domains never apply.
        let lookup = dns.lookup_ip(format!("{name}.")).await.map_err(|e| format!("could not resolve {name}: {e}"))?;
        let addrs: Vec<IpAddr> = lookup.iter().map(|ip| ip.to_canonical()).collect();
        if addrs.is_empty() {
            return Err(format!("{name} has no addresses"));
        }
        Ok(addrs)
    }

    /// Whether `name` exists: `Some(false)` when DNS says it does not (NXDOMAIN, or no
    /// address), `None` when that cannot be known (DNS disabled or failing).
    pub async fn name_exists(&self, name: &str) -> Option<bool> {
        if self.static_hosts.contains_key(name) || self.rest.is_some() {
            return Some(true);
        }
        match self.dns().await.ok()?.lookup_ip(format!("{name}.")).await {
            Ok(found) => Some(found.iter().next().is_some()),
            Err(e) if e.is_no_records_found() => Some(false),
            Err(_) => None,
        }
    }

    /// The DNS resolver, made on first use; none in closed test environments.
    async fn dns(&self) -> Result<&TokioResolver, String> {
        // For closed test environments: static answers only, never a DNS packet.
        if std::env::var_os("MOAT_NO_DNS").is_some_and(|v| v == "1") {
            return Err("DNS is disabled (MOAT_NO_DNS=1) and no --resolve entry names it".into());
        }
        self.dns
            .get_or_init(|| async {
                TokioResolver::builder_tokio()
                    .and_then(|b| b.build())
                    .map_err(|e| format!("no usable DNS configuration: {e}"))
            })
            .await
            .as_ref()
            .map_err(Clone::clone)
    }
}
