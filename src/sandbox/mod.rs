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

pub mod attach;
pub mod cgroup;
pub mod exec;
pub mod init;
pub mod users;
mod wire;

pub use init::Become;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long the init step may take to hand over its listener.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors the init step hands over: ports 80, 443, UDP and TCP 53, and the relay's.
const MAX_FDS: usize = 5;

/// A running sandbox: its process tree (through `unshare`) and the sockets it handed over.
pub struct Sandbox {
    /// `unshare`, whose child is the init step; it exits with CMD's exit code.
    pub child: Child,
    pub sockets: Sockets,
    /// The init step waits on this for moat's CA certificate before it runs CMD (see
    /// [`release`]).
    pub handover: UnixStream,
    /// The init step's process id as moat sees it (signals to the command go through it).
    pub init: rustix::process::Pid,
    /// Its memory and process limits, when it has any: keep it until the sandbox has ended
    /// (dropping it removes the cgroup).
    pub cgroup: Option<cgroup::Cgroup>,
}

/// The sockets moat serves a sandbox on, made inside its network namespace.
pub struct Sockets {
    /// The sandbox's port 80: every TCP connection CMD makes to port 80 of any address.
    pub http: std::net::TcpListener,
    /// The sandbox's port 443, likewise.
    pub tls: std::net::TcpListener,
    /// The sandbox's UDP port 53: every DNS query CMD sends, to whatever server it names
    /// (the host's `resolv.conf` included: its address is local in the sandbox too).
    pub dns_udp: std::net::UdpSocket,
    /// TCP port 53, likewise.
    pub dns_tcp: std::net::TcpListener,
    /// With internet on: every other TCP connection, redirected by the sandbox's firewall.
    pub relay: Option<std::net::TcpListener>,
}

/// What to start.
pub struct Spec<'a> {
    pub cmd: &'a [String],
    /// CMD's whole environment (the CA variables are added).
    pub env: &'a [(String, String)],
    /// A path for the Unix socket the init step sends its sockets on (removed before
    /// [`start`] returns).
    pub handover: &'a Path,
    /// Folders the sandbox must not see (moat's data folder first).
    pub hide: &'a [&'a Path],
    /// Relay every other TCP port (internet on).
    pub relay: bool,
    /// Who CMD runs as.
    pub user: Become,
    /// Its working directory (moat's when `None`).
    pub workdir: Option<&'a Path>,
    /// Where its stdout and stderr go (with stdin from /dev/null); moat's own when `None`.
    pub output: Option<&'a OwnedFd>,
    /// Its container id (names its cgroup).
    pub container: &'a str,
    /// What its processes may use together (a cgroup, when not empty).
    pub limits: cgroup::Limits,
}

/// Whether a SIGINT this process got came from its terminal, and so reached the sandbox's
/// command too (the terminal signals its whole foreground process group): passing it on
/// would make one Ctrl-C two. A SIGINT from `kill` is passed on.
pub fn interrupts_reach_the_command() -> bool {
    rustix::termios::tcgetpgrp(std::io::stdin()).is_ok_and(|fg| fg == rustix::process::getpgrp())
}

/// Lets the sandbox's command start, now that moat serves: sends the CA certificate it
/// should trust (PEM). `handover` must then stay open for as long as moat serves the
/// sandbox: its closing (moat's exit, however it happens) ends the sandbox.
pub fn release(handover: &UnixStream, ca_pem: &[u8]) -> std::io::Result<()> {
    wire::write_message(handover, ca_pem)
}

/// After [`release`]: whether the command runs (`Err` says why not, as the OS said it).
pub fn started(handover: &UnixStream) -> Result<(), String> {
    handover.set_read_timeout(Some(SETUP_TIMEOUT)).map_err(|e| e.to_string())?;
    let told =
        wire::read_message(handover).map_err(|e| format!("the sandbox did not say whether its command runs: {e}"));
    let _ = handover.set_read_timeout(None);
    match String::from_utf8_lossy(&told?).into_owned() {
        ok if ok.is_empty() => Ok(()),
        why => Err(why),
    }
}

/// A connection to `port` of the sandbox's loopback, made by its init step on `handover`
/// (one request at a time per sandbox: the caller serializes).
pub fn connect_inside(handover: &UnixStream, port: u16) -> Result<std::net::TcpStream, String> {
    wire::request_connection(handover, port)
}

/// Starts a new sandbox running `spec.cmd`.
pub fn start(spec: &Spec<'_>) -> Result<Sandbox, String> {
    let _ = std::fs::remove_file(spec.handover);
    let socket =
        UnixListener::bind(spec.handover).map_err(|e| format!("cannot listen on {}: {e}", spec.handover.display()))?;
    let result = start_with(spec, &socket);
    let _ = std::fs::remove_file(spec.handover);
    result
}

fn start_with(spec: &Spec<'_>, socket: &UnixListener) -> Result<Sandbox, String> {
    // Made first: a limit that cannot be had fails the start before any process exists.
    let cgroup = cgroup::Cgroup::create(spec.container, spec.limits)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find moat's own binary: {e}"))?;
    let mut command = Command::new("unshare");
    // Root needs no user namespace of its own to make the others, and only without one can
    // CMD run as another real user (the invoking one). An ordinary user's sandbox is root of
    // a user namespace mapping that user alone.
    if !rustix::process::geteuid().is_root() {
        command.args(["--user", "--map-root-user"]);
    }
    command
        // --mount-proc: a /proc of the new PID namespace, in which no host process (moat's
        // environment, with the secrets it read) is visible.
        .args(["--net", "--mount", "--pid", "--fork", "--mount-proc"])
        .args(["--kill-child=SIGTERM", "--"])
        .arg(exe)
        .arg("__sandbox-init")
        .arg(spec.handover)
        .arg("--become")
        .arg(spec.user.to_arg());
    if spec.relay {
        command.arg("--relay");
    }
    for dir in spec.hide {
        let dir = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        command.arg("--hide").arg(dir);
    }
    command.arg("--").args(spec.cmd).env_clear().envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = spec.workdir {
        command.current_dir(dir);
    }
    if let Some(out) = spec.output {
        let copy =
            || out.try_clone().map(std::process::Stdio::from).map_err(|e| format!("cannot pass the output on: {e}"));
        command.stdin(std::process::Stdio::null()).stdout(copy()?).stderr(copy()?);
    }
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "moat run needs util-linux's unshare (apt-get install util-linux)".to_string(),
        _ => format!("cannot start the sandbox: {e}"),
    })?;
    match accept_listener(socket, &mut child).and_then(|(handover, fds)| Ok((handover, sockets(fds, spec.relay)?))) {
        Ok((handover, sockets)) => {
            let init = rustix::net::sockopt::socket_peercred(&handover).map_err(|e| format!("init step: {e}"))?.pid;
            // Before the command starts (the init step waits for `release`), so that it and
            // all it forks are inside from the start.
            if let Some(cgroup) = &cgroup
                && let Err(e) = cgroup.add(init.as_raw_nonzero().get() as u32)
            {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            Ok(Sandbox { child, sockets, handover, init, cgroup })
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "the sandbox did not start: {e}; where user namespaces are disabled (kernel.unprivileged_userns_clone, AppArmor's restrict_unprivileged_userns) run as root, or pass --weak (nothing enforced)"
            ))
        }
    }
}

/// The descriptors in the order the init step sends them.
fn sockets(fds: Vec<OwnedFd>, relay: bool) -> Result<Sockets, String> {
    if fds.len() != 4 + usize::from(relay) {
        return Err(format!("{} sockets from the init step, not {}", fds.len(), 4 + usize::from(relay)));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted");
    let (http, tls, dns_udp, dns_tcp) = (next(), next(), next(), next());
    let relay = relay.then(|| next().into());
    Ok(Sockets { http: http.into(), tls: tls.into(), dns_udp: dns_udp.into(), dns_tcp: dns_tcp.into(), relay })
}

impl Sockets {
    /// The descriptors, in the order [`sockets`] reads them.
    fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        let mut fds = vec![self.http.as_fd(), self.tls.as_fd(), self.dns_udp.as_fd(), self.dns_tcp.as_fd()];
        fds.extend(self.relay.as_ref().map(|r| r.as_fd()));
        fds
    }
}

/// Waits for the init step to connect and send its listener, while it runs.
fn accept_listener(socket: &UnixListener, child: &mut Child) -> Result<(UnixStream, Vec<OwnedFd>), String> {
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match socket.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream.set_read_timeout(Some(SETUP_TIMEOUT)).map_err(|e| e.to_string())?;
                let fds = wire::receive_fds(&stream).map_err(|e| format!("no sockets from the init step: {e}"))?;
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

/// Passes SIGTERM, SIGHUP and SIGINT (one not from the terminal: see
/// [`interrupts_reach_the_command`]) as they arrive to `pid`, until `ended` completes.
pub async fn pass_signals_until(
    pid: rustix::process::Pid,
    ended: impl std::future::Future<Output = ()>,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
    hup: &mut tokio::signal::unix::Signal,
) {
    use rustix::process::Signal;
    let pass = |signal| {
        let _ = rustix::process::kill_process(pid, signal);
    };
    let mut ended = std::pin::pin!(ended);
    loop {
        tokio::select! {
            _ = &mut ended => return,
            _ = term.recv() => pass(Signal::TERM),
            _ = hup.recv() => pass(Signal::HUP),
            _ = int.recv() => if !interrupts_reach_the_command() { pass(Signal::INT) },
        }
    }
}

/// Completes when the peer of `stream` has closed it (what it sends meanwhile is dropped).
pub async fn peer_closed(stream: &tokio::net::UnixStream) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut [0u8; 64]) {
            Ok(0) => return,
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return,
            _ => {}
        }
    }
}

/// Where `program` is: a folder of `PATH`, else the system folders an ordinary user's
/// `PATH` often lacks (nft and ip are in /usr/sbin on Debian).
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(std::path::PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A process's exit code, or 128 + the signal that ended it (as shells report it).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
