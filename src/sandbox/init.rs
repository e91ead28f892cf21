//! `moat __sandbox-init SOCKET -- CMD…`: the sandbox's first process, run by `unshare` inside
//! the new namespaces as their root. It brings up the network (loopback and the AnyIP route),
//! binds the sockets moat serves (TCP 80 and 443, UDP 53), hands them over on SOCKET, waits
//! for moat's CA certificate (moat serves from then on), shows it in place of moat's data
//! folder with the CA variables set, then runs CMD as its child, forwarding SIGTERM and
//! SIGHUP to it, and exits with CMD's exit code. As PID 1 of the namespace, its end ends
//! every process CMD left behind.

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
    let tls = std::net::TcpListener::bind("0.0.0.0:443").map_err(|e| format!("cannot listen on port 443: {e}"))?;
    let dns = std::net::UdpSocket::bind("0.0.0.0:53").map_err(|e| format!("cannot listen on UDP port 53: {e}"))?;
    send_listener(&socket, &[http.as_fd(), tls.as_fd(), dns.as_fd()])?;
    drop((http, tls, dns));
    // moat answers with its CA certificate once it serves: CMD starts only then. The socket
    // stays open for as long as moat runs: its end is moat's end, whatever killed it.
    let ca = super::read_message(&socket).map_err(|e| format!("moat did not start serving: {e}"))?;
    let mut trust = Vec::new();
    for (i, dir) in hide.iter().enumerate() {
        // The first hidden folder (moat's data folder) shows the sandbox moat's CA instead.
        let files = if i == 0 { trust_files(&ca) } else { Vec::new() };
        hide_folder(dir, &files)?;
        if i == 0 {
            trust = trust_variables(dir);
        }
    }
    drop_privileges()?;
    let (program, args) = cmd.split_first().ok_or("no command to run")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .envs(trust)
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let pid = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32));
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        let moat = tokio::net::UnixStream::from_std(socket).map_err(|e| e.to_string())?;
        loop {
            let forward = tokio::select! {
                status = child.wait() => return Ok(super::exit_code(status.map_err(|e| e.to_string())?)),
                // moat is gone (killed, say): nothing serves the sandbox any more, so it ends;
                // as PID 1 exits, the kernel kills every process left in the namespace.
                _ = moat.readable() => {
                    if moat.try_read(&mut [0u8; 1]).is_ok_and(|n| n == 0) {
                        eprintln!("moat run: moat has gone; ending the sandbox");
                        return Ok(137);
                    }
                    continue;
                }
                _ = term.recv() => rustix::process::Signal::TERM,
                // From a terminal, CMD (in the same process group) has it already; passing it
                // on would make one Ctrl-C two. PID 1 must not die of it either.
                _ = int.recv() => continue,
                _ = hup.recv() => rustix::process::Signal::HUP,
            };
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, forward);
            }
        }
    })
}

/// The CA certificate moat signs intercepted hosts with, and a bundle of it over the
/// system's roots (for clients that take one file for every root).
const CA_FILE: &str = "ca.pem";
const BUNDLE_FILE: &str = "ca-bundle.pem";
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

fn trust_files(ca: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut bundle = std::fs::read(SYSTEM_ROOTS).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca);
    vec![(CA_FILE, ca.to_vec()), (BUNDLE_FILE, bundle)]
}

/// The variables that make common clients trust moat's CA (SPEC 5.2).
fn trust_variables(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let (ca, bundle) = (dir.join(CA_FILE), dir.join(BUNDLE_FILE));
    let mut vars: Vec<(&'static str, PathBuf)> = [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "CARGO_HTTP_CAINFO",
        "DENO_CERT",
        "AWS_CA_BUNDLE",
        "PIP_CERT",
        "npm_config_cafile",
    ]
    .into_iter()
    .map(|k| (k, bundle.clone()))
    .collect();
    // Node adds these to its own roots (a bundle there would only repeat them).
    vars.push(("NODE_EXTRA_CA_CERTS", ca));
    vars
}

/// Covers `dir` (moat's data folder: database, CA key, admin socket) with a tmpfs that holds
/// only `files`, read-only, in the sandbox's own mount namespace.
fn hide_folder(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<(), String> {
    use rustix::mount::{MountFlags, mount, mount_remount};
    let failed = |e: &dyn std::fmt::Display| format!("cannot hide {}: {e}", dir.display());
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount("none", dir, "tmpfs", flags, c"size=4m,mode=0555").map_err(|e| failed(&e))?;
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).map_err(|e| failed(&e))?;
    }
    mount_remount(dir, flags | MountFlags::RDONLY, "").map_err(|e| failed(&e))
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
    fds: &[std::os::fd::BorrowedFd<'_>; 3],
) -> Result<(), String> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(fds));
    rustix::net::sendmsg(socket.as_fd(), &[IoSlice::new(b"l")], &mut control, SendFlags::empty())
        .map_err(|e| format!("cannot hand the listener to moat: {e}"))?;
    Ok(())
}
