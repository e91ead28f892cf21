//! `moat __sandbox-exec PID DATA_DIR -- CMD…` (`moat exec`): another process in a running
//! container, with its identity: the namespaces of its init step (PID), its user, its
//! environment and working directory, and no privileges, exactly as its command. Root only
//! (entering another process's namespaces needs it). Run as a fresh process, with one thread
//! (setns requires it); its exit code is CMD's.

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
    // All opened first: inside the mount namespace, /proc is the container's.
    let mut spaces = Vec::new();
    for (ns, kind) in
        [("net", LinkNameSpaceType::Network), ("mnt", LinkNameSpaceType::Mount), ("pid", LinkNameSpaceType::ProcessID)]
    {
        spaces.push((ns, kind, std::fs::File::open(format!("{proc}/ns/{ns}")).map_err(|e| failed(ns, &e))?));
    }
    for (ns, kind, file) in &spaces {
        move_into_link_name_space(file.as_fd(), Some(*kind))
            .map_err(|e| format!("cannot enter the container's {ns} namespace: {e} (moat exec needs root)"))?;
    }
    // Its mount namespace's view of the folder (the old one is another namespace's dentry).
    std::env::set_current_dir(&cwd).or_else(|_| std::env::set_current_dir("/")).map_err(|e| failed("folder", &e))?;
    let user = if uid == 0 && gid == 0 { Become::Same } else { Become::Switch { uid, gid } };
    super::init::drop_privileges(user)?;
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
