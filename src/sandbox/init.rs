//! `moat __sandbox-init SOCKET -- CMD…`: the sandbox's first process, run by `unshare` inside
//! the new namespaces as their root. It brings up the network (loopback and the AnyIP route),
//! binds the sockets moat serves (TCP 80, UDP 53), hands them over on SOCKET, then runs CMD
//! as its child, forwarding SIGINT, SIGTERM and SIGHUP to it, and exits with CMD's exit code.
//! As PID 1 of the namespace, its end ends every process CMD left behind.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Runs the init step; returns the exit code for the process.
pub fn main(handover: &Path, hide: &[PathBuf], cmd: &[String]) -> i32 {
    match run(handover, hide, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat run: {e}");
            126
        }
    }
}

fn run(handover: &Path, hide: &[PathBuf], cmd: &[String]) -> Result<i32, String> {
    network_up()?;
    let socket = std::os::unix::net::UnixStream::connect(handover)
        .map_err(|e| format!("cannot reach moat on {}: {e}", handover.display()))?;
    let http = std::net::TcpListener::bind("0.0.0.0:80").map_err(|e| format!("cannot listen on port 80: {e}"))?;
    let dns = std::net::UdpSocket::bind("0.0.0.0:53").map_err(|e| format!("cannot listen on UDP port 53: {e}"))?;
    send_listener(&socket, &[http.as_fd(), dns.as_fd()])?;
    drop((http, dns));
    drop(socket);
    for dir in hide {
        hide_folder(dir)?;
    }
    drop_privileges()?;
    let (program, args) = cmd.split_first().ok_or("no command to run")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let pid = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32));
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        loop {
            let forward = tokio::select! {
                status = child.wait() => return Ok(super::exit_code(status.map_err(|e| e.to_string())?)),
                _ = term.recv() => rustix::process::Signal::TERM,
                _ = int.recv() => rustix::process::Signal::INT,
                _ = hup.recv() => rustix::process::Signal::HUP,
            };
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, forward);
            }
        }
    })
}

/// Mounts an empty, read-only tmpfs over `dir` (moat's data folder: database, CA key, admin
/// socket), in the sandbox's own mount namespace.
fn hide_folder(dir: &Path) -> Result<(), String> {
    use rustix::mount::{MountFlags, mount};
    mount("none", dir, "tmpfs", MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV, c"size=4k,mode=0500")
        .map_err(|e| format!("cannot hide {}: {e}", dir.display()))
}

/// CMD gets no capability in the sandbox's namespaces, and cannot gain one: without that,
/// root of the user namespace could unmount what hides moat's data folder. The bounding set
/// is emptied, root's exec gains nothing (securebits), and `no_new_privs` is set.
fn drop_privileges() -> Result<(), String> {
    use rustix::thread::{CapabilitiesSecureBits as Bits, CapabilitySet, CapabilitySets};
    let failed = |what: &str, e: rustix::io::Errno| format!("cannot drop privileges ({what}): {e}");
    rustix::thread::set_capabilities_secure_bits(
        Bits::NO_ROOT | Bits::NO_ROOT_LOCKED | Bits::NO_SETUID_FIXUP | Bits::NO_SETUID_FIXUP_LOCKED,
    )
    .map_err(|e| failed("securebits", e))?;
    for cap in CapabilitySet::all().iter() {
        // Capabilities the kernel does not know are not in the set to begin with.
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(failed("bounding set", e)),
        }
    }
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, none).map_err(|e| failed("capabilities", e))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| failed("no_new_privs", e))
}

/// Brings up loopback and makes every IPv4 address local (the AnyIP route).
fn network_up() -> Result<(), String> {
    for args in [&["link", "set", "lo", "up"][..], &["route", "add", "local", "0.0.0.0/0", "dev", "lo"][..]] {
        let out = Command::new("ip").args(args).output().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "moat run needs iproute2's ip (apt-get install iproute2)".to_string(),
            _ => format!("ip {}: {e}", args.join(" ")),
        })?;
        if !out.status.success() {
            return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
    }
    Ok(())
}

/// Sends `fds` over `socket` with one byte of payload.
fn send_listener(
    socket: &std::os::unix::net::UnixStream,
    fds: &[std::os::fd::BorrowedFd<'_>; 2],
) -> Result<(), String> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(fds));
    rustix::net::sendmsg(socket.as_fd(), &[IoSlice::new(b"l")], &mut control, SendFlags::empty())
        .map_err(|e| format!("cannot hand the listener to moat: {e}"))?;
    Ok(())
}
