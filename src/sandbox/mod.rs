//! `moat run`'s sandbox (SPEC 5.2): CMD in new user, network, mount and PID namespaces whose
//! only way out is moat.
//!
//! The design is SPEC 5.2's lighter variant, which leaves no state on the host: the network
//! namespace has loopback and nothing else, and an AnyIP route (`local 0.0.0.0/0 dev lo`)
//! makes every IPv4 address local inside it. A listener on `0.0.0.0:80` therefore receives a
//! connection to any address on port 80, with the dialled address as the accepted socket's
//! local address, and a connection to any other port is refused at once: there is no
//! interface to leave by, so nothing is a bypass (IPv6 has no route at all). The namespaces
//! are made by util-linux's `unshare` (an essential Debian package), which runs `moat
//! __sandbox-init` ([`init`]) as the PID namespace's first process; the init step sets up
//! the network, binds the listener and hands its descriptor to moat (SCM_RIGHTS) over a Unix
//! socket moat listens on in its data folder for that moment only. moat accepts on it from its own namespace and dials upstreams from
//! there, so the sandbox's identity is simply "which listener".

pub mod init;

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// How long the init step may take to hand over its listener.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running sandbox: its process tree (through `unshare`) and the sockets it handed over.
pub struct Sandbox {
    /// `unshare`, whose child is the init step; it exits with CMD's exit code.
    pub child: Child,
    /// The sandbox's port 80: every TCP connection CMD makes to port 80 of any address.
    pub http: std::net::TcpListener,
    /// The sandbox's port 443, likewise.
    pub tls: std::net::TcpListener,
    /// The sandbox's UDP port 53: every DNS query CMD sends, to whatever server it names
    /// (the host's `resolv.conf` included: its address is local in the sandbox too).
    pub dns: std::net::UdpSocket,
    /// The init step waits on this for moat's CA certificate before it runs CMD (see
    /// [`release`]).
    pub handover: UnixStream,
    /// The init step's process id as moat sees it (signals to the command go through it).
    pub init: rustix::process::Pid,
}

impl Sandbox {
    /// Passes `signal` to the command (through the init step, which forwards SIGTERM and
    /// SIGHUP; SIGINT from a terminal reaches the command directly, as its process group's).
    pub fn signal(init: rustix::process::Pid, signal: rustix::process::Signal) {
        let _ = rustix::process::kill_process(init, signal);
    }
}

/// Lets the sandbox's command start, now that moat serves: sends the CA certificate it
/// should trust (PEM). `handover` must then stay open for as long as moat serves the
/// sandbox: its closing (moat's exit, however it happens) ends the sandbox.
pub fn release(mut handover: &UnixStream, ca_pem: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let len = u32::try_from(ca_pem.len()).map_err(std::io::Error::other)?;
    handover.write_all(&len.to_be_bytes())?;
    handover.write_all(ca_pem)
}

/// Reads one message [`release`] wrote.
fn read_message(mut socket: &UnixStream) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut len = [0u8; 4];
    socket.read_exact(&mut len)?;
    let mut message = vec![0u8; u32::from_be_bytes(len) as usize];
    socket.read_exact(&mut message)?;
    Ok(message)
}

/// Starts `cmd` in a new sandbox with `env` as its whole environment; `handover` is a path
/// for the Unix socket the init step sends its listener on (removed before this returns).
/// `hide` are folders the sandbox must not see (moat's data folder).
pub fn start(cmd: &[String], env: &[(String, String)], handover: &Path, hide: &[&Path]) -> Result<Sandbox, String> {
    let _ = std::fs::remove_file(handover);
    let socket = UnixListener::bind(handover).map_err(|e| format!("cannot listen on {}: {e}", handover.display()))?;
    let result = start_with(cmd, env, handover, hide, &socket);
    let _ = std::fs::remove_file(handover);
    result
}

fn start_with(
    cmd: &[String],
    env: &[(String, String)],
    handover: &Path,
    hide: &[&Path],
    socket: &UnixListener,
) -> Result<Sandbox, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find moat's own binary: {e}"))?;
    let mut command = Command::new("unshare");
    command
        // --mount-proc: a /proc of the new PID namespace, in which no host process (moat's
        // environment, with the secrets it read) is visible.
        .args(["--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc"])
        .args(["--kill-child=SIGTERM", "--"])
        .arg(exe)
        .arg("__sandbox-init")
        .arg(handover);
    for dir in hide {
        let dir = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        command.arg("--hide").arg(dir);
    }
    command.arg("--").args(cmd).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "moat run needs util-linux's unshare (apt-get install util-linux)".to_string(),
        _ => format!("cannot start the sandbox: {e}"),
    })?;
    match accept_listener(socket, &mut child) {
        Ok((handover, [http, tls, dns])) => {
            let init = rustix::net::sockopt::socket_peercred(&handover).map_err(|e| format!("init step: {e}"))?.pid;
            Ok(Sandbox { child, http: http.into(), tls: tls.into(), dns: dns.into(), handover, init })
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "the sandbox did not start: {e}; where user namespaces are disabled (kernel.unprivileged_userns_clone, AppArmor's restrict_unprivileged_userns) run as root"
            ))
        }
    }
}

/// Waits for the init step to connect and send its listener, while it runs.
fn accept_listener(socket: &UnixListener, child: &mut Child) -> Result<(UnixStream, [OwnedFd; 3]), String> {
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match socket.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                let fds = receive_listener(&stream)?;
                stream.set_read_timeout(None).map_err(|e| e.to_string())?;
                return Ok((stream, fds));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("its init step ended ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("no listener within {SETUP_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A process's exit code, or 128 + the signal that ended it (as shells report it).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Reads the descriptors the init step sends: its TCP ports 80 and 443, its UDP port 53.
fn receive_listener(socket: &UnixStream) -> Result<[OwnedFd; 3], String> {
    socket.set_read_timeout(Some(SETUP_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got =
        rustix::net::recvmsg(socket.as_fd(), &mut [IoSliceMut::new(&mut byte)], &mut control, RecvFlags::CMSG_CLOEXEC)
            .map_err(|e| format!("no listener from the init step: {e}"))?;
    if got.bytes == 0 {
        return Err("the init step ended before handing over its listener".into());
    }
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let (Some(http), Some(tls), Some(dns)) = (fds.next(), fds.next(), fds.next())
        {
            return Ok([http, tls, dns]);
        }
    }
    Err("the init step sent no listener".into())
}
