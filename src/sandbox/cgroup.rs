//! A container's memory and process limits: one cgroup per container, made before its
//! command starts and removed when it has ended.
//!
//! cgroup v2 is used where its `memory` and `pids` controllers are available (one folder,
//! `memory.max` and `pids.max`); otherwise the v1 hierarchies of those controllers (a folder
//! in each, `memory.limit_in_bytes` and `pids.max`). The folders are made below moat's own
//! cgroup, named `moat.ID`, so a container is accounted where moat itself is. Placing the
//! init step in them before it runs the command means every process of the container
//! (forks inherit their cgroup) is inside the limits from its first instruction.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a container's processes may use together; `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory (RSS and page cache); past it the kernel's OOM killer ends a process
    /// of the container (a command ended that way exits with 137).
    pub memory: Option<u64>,
    /// Processes and threads at once; a fork past it fails with EAGAIN.
    pub pids: Option<u32>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.memory.is_none() && self.pids.is_none()
    }

    /// Whether the values can be set at all (one line for the user when not).
    pub fn check(&self) -> Result<(), String> {
        if self.memory.is_some_and(|m| m < MIN_MEMORY) {
            return Err(format!("memory limit: at least {} MiB", MIN_MEMORY >> 20));
        }
        if self.pids == Some(0) {
            return Err("pids limit: at least 1".into());
        }
        Ok(())
    }
}

/// The smallest memory limit accepted: below it the init step itself could not run.
pub const MIN_MEMORY: u64 = 4 << 20;

/// A container's cgroup folders (one per hierarchy holding one of its limits); removed on
/// drop, once its processes have gone.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

/// Where the cgroup file systems are, as `/proc/self/mountinfo` and `/proc/self/cgroup` say.
#[derive(Debug, Default)]
struct Hierarchies {
    /// cgroup v2: (mount point, its root as mounted) with the controllers it offers.
    v2: Option<(PathBuf, String, Vec<String>)>,
    /// cgroup v1: one (mount point, mount root, controllers) per hierarchy.
    v1: Vec<(PathBuf, String, Vec<String>)>,
    /// moat's own cgroup: v2's path (`0::PATH`), and v1's per controller list.
    own_v2: Option<String>,
    own_v1: Vec<(Vec<String>, String)>,
}

impl Hierarchies {
    fn read() -> Self {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::parse(&mountinfo, &cgroup, |p| std::fs::read_to_string(p).ok())
    }

    /// From the two files' text; `read` reads a v2 mount's `cgroup.controllers`.
    fn parse(mountinfo: &str, cgroup: &str, read: impl Fn(&Path) -> Option<String>) -> Self {
        let mut h = Self::default();
        for line in mountinfo.lines() {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(root), Some(point), Some(fstype)) = (left.get(3), left.get(4), right.first()) else { continue };
            let point = PathBuf::from(unescape(point));
            match *fstype {
                "cgroup2" if h.v2.is_none() => {
                    let controllers = read(&point.join("cgroup.controllers")).unwrap_or_default();
                    h.v2 = Some((point, root.to_string(), words(&controllers)));
                }
                "cgroup" => {
                    let options = right.get(2).copied().unwrap_or_default();
                    let controllers = options.split(',').map(str::to_string).collect();
                    h.v1.push((point, root.to_string(), controllers));
                }
                _ => {}
            }
        }
        for line in cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
            if controllers.is_empty() {
                h.own_v2 = Some(path.to_string());
            } else {
                h.own_v1.push((controllers.split(',').map(str::to_string).collect(), path.to_string()));
            }
        }
        h
    }

    /// The folder below which a container's cgroup is made, for each hierarchy that holds a
    /// needed controller: v2 when it offers them all, else v1's. Errors name what is missing.
    fn bases(&self, needed: &[&str]) -> Result<(Version, Vec<Base>), String> {
        if let (Some((point, root, offered)), Some(own)) = (&self.v2, &self.own_v2)
            && needed.iter().all(|c| offered.iter().any(|o| o == c))
        {
            let all = needed.iter().map(|c| controller_name(c)).collect();
            return Ok((Version::V2, vec![(below(point, root, own), all)]));
        }
        let mut bases: Vec<Base> = Vec::new();
        for c in needed {
            let mount = self.v1.iter().find(|(_, _, cs)| cs.iter().any(|x| x == c));
            let own = self.own_v1.iter().find(|(cs, _)| cs.iter().any(|x| x == c));
            let (Some((point, root, _)), Some((_, own))) = (mount, own) else {
                return Err(format!(
                    "this machine has no cgroup controller for {c} (neither cgroup v2's nor a v1 hierarchy): start the container without that limit"
                ));
            };
            let base = below(point, root, own);
            match bases.iter_mut().find(|(b, _)| *b == base) {
                Some((_, cs)) => cs.push(controller_name(c)),
                None => bases.push((base, vec![controller_name(c)])),
            }
        }
        Ok((Version::V1, bases))
    }
}

/// A folder below which containers' cgroups are made, with the controllers it limits.
type Base = (PathBuf, Vec<&'static str>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

fn controller_name(c: &str) -> &'static str {
    if c == "memory" { "memory" } else { "pids" }
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The folder of cgroup `path` in a hierarchy mounted at `point` with root `root`.
fn below(point: &Path, root: &str, path: &str) -> PathBuf {
    let relative = path.strip_prefix(root).unwrap_or(path).trim_start_matches('/');
    if relative.is_empty() { point.to_path_buf() } else { point.join(relative) }
}

impl Cgroup {
    /// Makes container `id`'s cgroup with `limits` (none when they are empty).
    pub fn create(id: &str, limits: Limits) -> Result<Option<Self>, String> {
        if limits.is_empty() {
            return Ok(None);
        }
        limits.check()?;
        let mut needed = Vec::new();
        if limits.memory.is_some() {
            needed.push("memory");
        }
        if limits.pids.is_some() {
            needed.push("pids");
        }
        let (version, bases) = Hierarchies::read().bases(&needed)?;
        let mut cgroup = Self { dirs: Vec::new() };
        for (base, controllers) in bases {
            if version == Version::V2 {
                delegate(&base, &controllers)?;
            }
            let dir = base.join(format!("moat.{id}"));
            make_fresh(&dir)?;
            cgroup.dirs.push(dir.clone());
            for c in controllers {
                for (file, value) in limit_files(version, c, limits) {
                    let path = dir.join(file);
                    // v1's memory+swap limit exists only with swap accounting: best effort.
                    if file == "memory.memsw.limit_in_bytes" && !path.exists() {
                        continue;
                    }
                    std::fs::write(&path, &value).map_err(|e| format!("cannot set {}: {e}", path.display()))?;
                }
            }
        }
        Ok(Some(cgroup))
    }

    /// Moves process `pid` (and so everything it starts from now on) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, pid.to_string())
                .map_err(|e| format!("cannot move {pid} into {}: {e}", dir.display()))?;
        }
        Ok(())
    }
}

/// The files (and values) that set `controller`'s limit.
fn limit_files(version: Version, controller: &str, limits: Limits) -> Vec<(&'static str, String)> {
    match (version, controller) {
        (_, "pids") => limits.pids.map(|n| vec![("pids.max", n.to_string())]).unwrap_or_default(),
        // No swap beyond the limit either, so that the limit is what the container gets.
        (Version::V2, _) => limits
            .memory
            .map(|m| vec![("memory.max", m.to_string()), ("memory.swap.max", "0".into())])
            .unwrap_or_default(),
        (Version::V1, _) => limits
            .memory
            .map(|m| vec![("memory.limit_in_bytes", m.to_string()), ("memory.memsw.limit_in_bytes", m.to_string())])
            .unwrap_or_default(),
    }
}

/// cgroup v2 hands a controller to child cgroups only through the parent's
/// `cgroup.subtree_control`, and only from a cgroup with no processes of its own (the "no
/// internal processes" rule): when moat's cgroup has them (moat itself), moat moves into a
/// leaf of its own, `moat.daemon`, first, as delegated managers do.
fn delegate(base: &Path, controllers: &[&str]) -> Result<(), String> {
    let control = base.join("cgroup.subtree_control");
    let enabled = words(&std::fs::read_to_string(&control).unwrap_or_default());
    let missing: Vec<&&str> = controllers.iter().filter(|c| !enabled.iter().any(|e| e == **c)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let line = missing.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    let enable = || std::fs::write(&control, &line);
    match enable() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
            let leaf = base.join("moat.daemon");
            let _ = std::fs::create_dir(&leaf);
            std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
                .and_then(|()| enable())
                .map_err(|e| format!("cgroup v2: cannot give {line} to containers below {}: {e} (run moat in a cgroup delegated to it, e.g. systemd's Delegate=yes)", base.display()))
        }
        Err(e) => Err(format!(
            "cgroup v2: cannot give {line} to containers below {}: {e} (run moat as root, or in a cgroup delegated to it)",
            base.display()
        )),
    }
}

/// Makes `dir`; one left by a moat that was killed is reused when no process is in it.
fn make_fresh(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                Ok(())
            } else {
                Err(format!("{} is in use by processes of another container of that id", dir.display()))
            }
        }
        Err(e) => Err(format!("cannot make the container's cgroup {}: {e} (limits need root)", dir.display())),
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The container's processes have ended, but the last ones may still be leaving the
        // cgroup (rmdir answers EBUSY until they have): a short wait.
        let deadline = Instant::now() + Duration::from_secs(2);
        for dir in &self.dirs {
            while std::fs::remove_dir(dir).is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound) {
                if Instant::now() > deadline {
                    tracing::warn!("cgroup {} not removed: processes are still in it", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V1_OWN: &str = "8:pids:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n";

    #[test]
    fn v1_hierarchies_are_used_when_v2_offers_no_controller() {
        let h = Hierarchies::parse(V1_MOUNTS, V1_OWN, |_| Some(String::new()));
        let (version, bases) = h.bases(&["memory", "pids"]).unwrap();
        assert_eq!(version, Version::V1);
        assert_eq!(
            bases,
            vec![
                (PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"), vec!["memory"]),
                (PathBuf::from("/sys/fs/cgroup/pids"), vec!["pids"]),
            ]
        );
    }

    #[test]
    fn v2_is_used_when_it_offers_every_needed_controller() {
        let mounts = "25 20 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = "0::/system.slice/moat.service\n";
        let h = Hierarchies::parse(mounts, own, |p| {
            assert_eq!(p, Path::new("/sys/fs/cgroup/cgroup.controllers"));
            Some("cpuset cpu io memory hugetlb pids rdma\n".into())
        });
        let (version, bases) = h.bases(&["pids"]).unwrap();
        assert_eq!(version, Version::V2);
        assert_eq!(bases, vec![(PathBuf::from("/sys/fs/cgroup/system.slice/moat.service"), vec!["pids"])]);
        assert_eq!(
            limit_files(version, "memory", Limits { memory: Some(64 << 20), pids: None }),
            vec![("memory.max", (64u64 << 20).to_string()), ("memory.swap.max", "0".into())]
        );
    }

    #[test]
    fn a_missing_controller_is_named() {
        let mounts = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let h = Hierarchies::parse(mounts, "4:memory:/\n", |_| None);
        assert!(h.bases(&["memory"]).is_ok());
        let err = h.bases(&["memory", "pids"]).unwrap_err();
        assert!(err.contains("no cgroup controller for pids"), "{err}");
    }

    #[test]
    fn a_namespaced_mount_root_is_taken_off_the_own_path() {
        assert_eq!(below(Path::new("/sys/fs/cgroup"), "/a/b", "/a/b/c"), PathBuf::from("/sys/fs/cgroup/c"));
        assert_eq!(below(Path::new("/sys/fs/cgroup"), "/", "/"), PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
    }
}
