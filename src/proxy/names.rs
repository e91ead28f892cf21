//! A sandbox's names (SPEC 5.2): its DNS answers every name with an address of its own from
//! the benchmarking range (198.18.0.0/15, RFC 2544: never a host's, and refused by the egress
//! address check), one address per name for the sandbox's life. A connection to such an
//! address therefore says which name the program meant, on any port: the transparent
//! listeners and the relay decide on that name, and moat resolves it itself only when it
//! dials, after the decision. Real addresses would be ambiguous (many names share one CDN
//! address, so "which name" could not be told back) and would make every query a lookup
//! before anything was decided.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use crate::identity::ContainerId;
use crate::policy::CanonicalHost;

/// Whose a sandbox's connections are (the kernel says: they arrive on its listeners), and
/// the names its DNS gave out, which tell a dialled address back as a name.
#[derive(Debug)]
pub struct Sandboxed {
    pub container: ContainerId,
    pub names: Arc<SandboxNames>,
}

/// The first address handed out; the range ends at 198.19.255.255.
const FIRST: u32 = u32::from_be_bytes([198, 18, 0, 1]);
/// Names one sandbox may ask for: past this, new names get no address (a program that asks
/// for this many distinct names is scanning, not working).
pub const CAPACITY: u32 = 65_536;

/// Every name a sandbox's DNS answered, and its address.
#[derive(Debug, Default)]
pub struct SandboxNames {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
}

impl SandboxNames {
    /// The address of `name` (lowercase, no trailing dot), handed out now if it has none;
    /// `None` once [`CAPACITY`] names have one.
    pub fn address(&self, name: &str) -> Option<Ipv4Addr> {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = t.by_name.get(name) {
            return Some(*ip);
        }
        let n = u32::try_from(t.by_name.len()).ok().filter(|&n| n < CAPACITY)?;
        let ip = Ipv4Addr::from(FIRST + n);
        t.by_name.insert(name.to_string(), ip);
        t.by_addr.insert(ip, name.to_string());
        Some(ip)
    }

    /// The host a connection to `dialled` means: the name behind one of the sandbox's
    /// addresses, else the address itself.
    pub fn host_for(&self, dialled: IpAddr) -> CanonicalHost {
        let name = match dialled.to_canonical() {
            IpAddr::V4(v4) => self.inner.lock().unwrap_or_else(|e| e.into_inner()).by_addr.get(&v4).cloned(),
            IpAddr::V6(_) => None,
        };
        name.and_then(|n| CanonicalHost::parse(&n).ok()).unwrap_or(CanonicalHost::Ip(dialled.to_canonical()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_keeps_one_address_that_tells_it_back() {
        let names = SandboxNames::default();
        let a = names.address("a.test").unwrap();
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
        let b = names.address("b.test").unwrap();
        assert_ne!(a, b);
        assert_eq!(names.address("a.test"), Some(a));
        assert_eq!(names.host_for(IpAddr::V4(b)).to_string(), "b.test");
        // An address it never handed out is just that address (which egress refuses).
        assert_eq!(names.host_for("198.18.9.9".parse().unwrap()).to_string(), "198.18.9.9");
        assert!(crate::upstream::addr::special_range(IpAddr::V4(b)).is_some());
    }
}
