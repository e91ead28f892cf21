//! Who a sandbox's command runs as (SPEC 5.2: the invoking user), from `--user`, `sudo`'s
//! variables and /etc/passwd.

use super::Become;

/// Who CMD runs as (SPEC 5.2: the invoking user): `--user`, else under sudo the user who ran
/// sudo, else moat's own user.
pub fn become_user(wanted: Option<&str>) -> Result<Become, String> {
    let root = rustix::process::geteuid().is_root();
    let target = match wanted {
        Some(spec) => Some(lookup_user(spec)?),
        None if root => sudo_user(),
        None => None,
    };
    let (uid, gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
    Ok(match target {
        _ if !root => match target {
            Some((u, _)) if u != uid => {
                return Err(format!("--user: only root can run CMD as another user (moat runs as uid {uid})"));
            }
            _ => Become::Nest { uid, gid },
        },
        None | Some((0, 0)) => Become::Same,
        Some((uid, gid)) => Become::Switch { uid, gid },
    })
}

/// `SUDO_UID`/`SUDO_GID`, when both are set.
fn sudo_user() -> Option<(u32, u32)> {
    let var = |k: &str| std::env::var(k).ok()?.parse().ok();
    Some((var("SUDO_UID")?, var("SUDO_GID")?))
}

/// `NAME`, `UID` or either with `:GID`; a user without `:GID` gets its passwd group (its
/// uid when it has no passwd entry).
fn lookup_user(spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => {
            (u, Some(g.parse::<u32>().map_err(|_| format!("--user {spec:?}: the group must be a number"))?))
        }
        None => (spec, None),
    };
    let entries = passwd();
    let entry = entries.iter().find(|e| e.name == user || e.uid.to_string() == user);
    let uid = match (user.parse::<u32>(), entry) {
        (Ok(uid), _) => uid,
        (Err(_), Some(e)) => e.uid,
        (Err(_), None) => return Err(format!("--user {spec:?}: no such user in /etc/passwd")),
    };
    Ok((uid, group.or(entry.map(|e| e.gid)).unwrap_or(uid)))
}

/// One line of /etc/passwd.
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

pub fn passwd() -> Vec<PasswdEntry> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5)?.to_string(),
            })
        })
        .collect()
}

/// `HOME`, `USER` and `LOGNAME` of the user a command is switched to (none otherwise, or
/// for a user without a passwd entry).
pub fn login_env(user: Become) -> Vec<(&'static str, String)> {
    let Become::Switch { uid, .. } = user else { return Vec::new() };
    passwd()
        .into_iter()
        .find(|e| e.uid == uid)
        .map(|e| vec![("HOME", e.home), ("USER", e.name.clone()), ("LOGNAME", e.name)])
        .unwrap_or_default()
}
