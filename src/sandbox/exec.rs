//! `moat __sandbox-exec PID DATA_DIR -- CMD…` (`moat exec`): another process in a running
//! container, with its identity: the namespaces of its init step (PID), its user, its
//! environment and working directory, and no privileges, exactly as its command. Run as a
//! fresh process, with one thread (setns requires it); its exit code is CMD's.
//!
//! A root daemon's containers have no user namespace of their own: root enters the others.
//! An ordinary user's containers do (mapping that user as root, with a nested one for the
//! command): the same user enters it first, which gives it the capabilities the other
//! namespaces ask for, and then nests a user namespace as the init step does.

use std::os::fd::AsFd;
use std::path::Path;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::Become;

/// Runs CMD in the container whose init step is `pid`; returns its exit code.
pub fn main(pid: u32, data_dir: &Path, cmd: &[String]) -> i32 {
    match run(pid, data_dir, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat exec: {e}");
            126
        }
    }
}

fn run(pid: u32, data_dir: &Path, cmd: &[String]) -> Result<i32, String> {
    let proc = format!("/proc/{pid}");
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("container's {what}: {e}");
    let status = std::fs::read_to_string(format!("{proc}/status")).map_err(|e| failed("status", &e))?;
    let id = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| format!("container's {field} unknown"))
    };
    // The init step runs as the container's user (its effective ids), as its command does.
    let (uid, gid) = (id("Uid:")?, id("Gid:")?);
    let environ = std::fs::read(format!("{proc}/environ")).map_err(|e| failed("environment", &e))?;
    let mut env: Vec<(String, String)> = environ
        .split(|&b| b == 0)
        .filter_map(|kv| String::from_utf8_lossy(kv).split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    env.extend(
        super::init::trust_variables(data_dir).into_iter().map(|(k, v)| (k.to_string(), v.display().to_string())),
    );
    let cwd = std::fs::read_link(format!("{proc}/cwd")).map_err(|e| failed("working directory", &e))?;
    // Its own user namespace (an ordinary user's sandbox), or moat's (a root daemon's).
    let user_ns = |p: &str| std::fs::read_link(format!("{p}/ns/user")).map_err(|e| failed("user namespace", &e));
    let nested = user_ns(&proc)? != user_ns("/proc/self")?;
    let mut kinds = vec![
        ("net", LinkNameSpaceType::Network),
        ("mnt", LinkNameSpaceType::Mount),
        ("pid", LinkNameSpaceType::ProcessID),
    ];
    if nested {
        // First: in it this process has the capabilities that entering the others needs.
        kinds.insert(0, ("user", LinkNameSpaceType::User));
    }
    // All opened first: inside the mount namespace, /proc is the container's.
    let mut spaces = Vec::new();
    for (ns, kind) in kinds {
        let path = match ns {
            // The init step has nested one for the command: the outer one, which it keeps
            // open, owns the others.
            "user" => outer_user_namespace(&proc).unwrap_or_else(|| format!("{proc}/ns/user").into()),
            _ => format!("{proc}/ns/{ns}").into(),
        };
        spaces.push((ns, kind, std::fs::File::open(path).map_err(|e| failed(ns, &e))?));
    }
    // Opened here: once in the container's mount namespace, /proc is of its PID namespace,
    // where this process is not.
    let host_proc = std::fs::File::open("/proc").map_err(|e| failed("/proc", &e))?;
    let who = if rustix::process::geteuid().is_root() { "root" } else { "the user that runs its moat" };
    for (ns, kind, file) in &spaces {
        move_into_link_name_space(file.as_fd(), Some(*kind))
            .map_err(|e| format!("cannot enter the container's {ns} namespace: {e} (moat exec must run as {who})"))?;
    }
    // Its mount namespace's view of the folder (the old one is another namespace's dentry).
    std::env::set_current_dir(&cwd).or_else(|_| std::env::set_current_dir("/")).map_err(|e| failed("folder", &e))?;
    let user = match (nested, uid, gid) {
        // The ids seen from outside are the user's: the command sees them again.
        (true, ..) => Become::Nest { uid, gid },
        (false, 0, 0) => Become::Same,
        (false, ..) => Become::Switch { uid, gid },
    };
    super::init::drop_privileges(user, &host_proc)?;
    let (program, args) = cmd.split_first().ok_or("no command to run")?;
    // A child: only it is in the container's PID namespace (setns applies to children).
    let status = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(env)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    Ok(super::exit_code(status))
}

/// The user namespace the init step `proc` keeps open (an ordinary user's sandbox: see
/// `init`), as a path that opens it.
fn outer_user_namespace(proc: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir(format!("{proc}/fd"))
        .ok()?
        .flatten()
        .map(|fd| fd.path())
        .find(|fd| std::fs::read_link(fd).is_ok_and(|target| target.to_string_lossy().starts_with("user:[")))
}
