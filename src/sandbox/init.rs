//! `moat __sandbox-init SOCKET -- CMD…`: the sandbox's first process, run by `unshare` inside
//! the new namespaces as their root. It brings up the network (loopback, the AnyIP route and,
//! with the relay, one nftables ruleset), binds the sockets moat serves (TCP 80 and 443, UDP
//! and TCP 53, the relay's port), hands them over on SOCKET, waits for moat's CA certificate
//! (moat serves from then on), shows it in place of moat's data folder with the CA variables
//! set, becomes the user CMD runs as and drops every privilege, then runs CMD as its child,
//! forwarding SIGTERM and SIGHUP to it, reaping whatever else ends, and exits with CMD's exit
//! code. As PID 1 of the namespace, its end ends every process CMD left behind.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the init step is told on its command line.
pub struct InitArgs {
    /// The Unix socket moat waits on for the sockets.
    pub handover: PathBuf,
    /// Folders to hide from CMD; the first is moat's data folder.
    pub hide: Vec<PathBuf>,
    /// Redirect every other TCP port to the relay (internet on).
    pub relay: bool,
    /// Who CMD runs as.
    pub user: Become,
    pub cmd: Vec<String>,
}

/// Who CMD runs as, and how the init step becomes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Become {
    /// Whoever the init step is (root of the namespaces, without a capability).
    Same,
    /// moat runs as root: the init step, real root, switches to this user.
    Switch { uid: u32, gid: u32 },
    /// An ordinary user's sandbox: its user namespace maps only that user, as root; a nested
    /// user namespace shows CMD its own ids again.
    Nest { uid: u32, gid: u32 },
}

impl Become {
    /// The command-line form (`--become`): `same`, `switch:UID:GID` or `nest:UID:GID`.
    pub fn to_arg(self) -> String {
        match self {
            Self::Same => "same".into(),
            Self::Switch { uid, gid } => format!("switch:{uid}:{gid}"),
            Self::Nest { uid, gid } => format!("nest:{uid}:{gid}"),
        }
    }

    /// Parses [`Become::to_arg`]'s form.
    pub fn parse(arg: &str) -> Result<Self, String> {
        let bad = || format!("--become {arg:?}: expected same, switch:UID:GID or nest:UID:GID");
        let mut parts = arg.split(':');
        let kind = parts.next().ok_or_else(bad)?;
        if kind == "same" {
            return Ok(Self::Same);
        }
        let uid = parts.next().and_then(|u| u.parse().ok()).ok_or_else(bad)?;
        let gid = parts.next().and_then(|g| g.parse().ok()).ok_or_else(bad)?;
        match kind {
            "switch" => Ok(Self::Switch { uid, gid }),
            "nest" => Ok(Self::Nest { uid, gid }),
            _ => Err(bad()),
        }
    }
}

/// The port the relay listens on inside the sandbox: below 1024, so CMD (without
/// capabilities) could not take it even if it were free.
pub const RELAY_PORT: u16 = 1;

/// Runs the init step; returns the exit code for the process.
pub fn main(args: &InitArgs) -> i32 {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat run: {e}");
            126
        }
    }
}

fn run(args: &InitArgs) -> Result<i32, String> {
    let InitArgs { handover, hide, relay, user, cmd } = args;
    network_up(*relay)?;
    let socket = std::os::unix::net::UnixStream::connect(handover)
        .map_err(|e| format!("cannot reach moat on {}: {e}", handover.display()))?;
    let tcp = |port: u16| {
        std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("cannot listen on port {port}: {e}"))
    };
    let (http, tls, dns_tcp) = (tcp(80)?, tcp(443)?, tcp(53)?);
    let dns = std::net::UdpSocket::bind("0.0.0.0:53").map_err(|e| format!("cannot listen on UDP port 53: {e}"))?;
    let relay = if *relay { Some(tcp(RELAY_PORT)?) } else { None };
    let mut fds = vec![http.as_fd(), tls.as_fd(), dns.as_fd(), dns_tcp.as_fd()];
    fds.extend(relay.as_ref().map(|r| r.as_fd()));
    super::wire::send_fds(&socket, &fds).map_err(|e| format!("cannot hand the sockets to moat: {e}"))?;
    drop((http, tls, dns, dns_tcp, relay));
    // moat answers with its CA certificate once it serves: CMD starts only then. The socket
    // stays open for as long as moat runs: its end is moat's end, whatever killed it.
    let ca = super::wire::read_message(&socket).map_err(|e| format!("moat did not start serving: {e}"))?;
    let mut trust = Vec::new();
    for (i, dir) in hide.iter().enumerate() {
        // The first hidden folder (moat's data folder) shows the sandbox moat's CA instead.
        let files = if i == 0 {
            let mut files = trust_files(&ca);
            files.push((RESOLV_CONF, RESOLVER.as_bytes().to_vec()));
            files
        } else {
            Vec::new()
        };
        if dir.is_dir() {
            hide_folder(dir, &files)?;
        } else {
            hide_file(dir)?;
        }
        if i == 0 {
            trust = trust_variables(dir);
        }
    }
    if let Some(data) = hide.first() {
        point_resolv_conf_at_moat(&data.join(RESOLV_CONF));
    }
    // An ordinary user's sandbox: this process nests a user namespace for CMD and enters
    // it too. Kept open, the outer one stays where `moat exec` finds it (see
    // [`super::exec`]): entering the inner one would not let it into the network, mount and
    // PID namespaces, which the outer one owns.
    let _outer_user_namespace = match user {
        Become::Nest { .. } => {
            Some(std::fs::File::open("/proc/self/ns/user").map_err(|e| format!("user namespace: {e}"))?)
        }
        _ => None,
    };
    // Opened while this process may: its score is raised and restored around CMD's start
    // below, after privileges are gone.
    let oom = OomScore::open()?;
    let proc = std::fs::File::open("/proc").map_err(|e| format!("/proc: {e}"))?;
    drop_privileges(*user, &proc)?;
    let (program, args) = cmd.split_first().ok_or("no command to run")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        use rustix::process::{Signal, WaitOptions};
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind| signal(kind).map_err(|e| e.to_string());
        // Before CMD exists: its end must find the handler.
        let (mut chld, mut term, mut int, mut hup) = (
            listen(SignalKind::child())?,
            listen(SignalKind::terminate())?,
            listen(SignalKind::interrupt())?,
            listen(SignalKind::hangup())?,
        );
        // Passed on as they come (a daemon's `signal`); SIGKILL ends this process, and with it
        // the namespace.
        let (mut quit, mut usr1, mut usr2, mut winch) = (
            listen(SignalKind::quit())?,
            listen(SignalKind::user_defined1())?,
            listen(SignalKind::user_defined2())?,
            listen(SignalKind::window_change())?,
        );
        // Not tokio's: as PID 1 this process reaps every orphan of the namespace, and CMD's
        // end is one of the exits it reaps.
        let spawned = oom.first_to_go(|| std::process::Command::new(program).args(args).envs(trust).spawn())?;
        // moat learns whether CMD runs: an empty message, or why not.
        let told = match &spawned {
            Ok(_) => String::new(),
            Err(e) => format!("cannot run {program}: {e}"),
        };
        let _ = super::wire::write_message(&socket, told.as_bytes());
        let child = spawned.map_err(|_| told)?;
        let pid = rustix::process::Pid::from_raw(child.id() as i32).ok_or("CMD has no process id")?;
        drop(child);
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        let moat = tokio::net::UnixStream::from_std(socket).map_err(|e| e.to_string())?;
        loop {
            // Whatever has ended is reaped; CMD's end is the sandbox's.
            while let Ok(Some((ended, status))) = rustix::process::wait(WaitOptions::NOHANG) {
                if ended == pid {
                    return Ok(status.exit_status().unwrap_or_else(|| 128 + status.terminating_signal().unwrap_or(0)));
                }
            }
            let forward = tokio::select! {
                _ = chld.recv() => continue,
                // moat is gone (killed, say): nothing serves the sandbox any more, so it ends;
                // as PID 1 exits, the kernel kills every process left in the namespace.
                // Or it asks for a connection inside (getTcpPort): `c` and a port.
                _ = moat.readable() => {
                    let mut request = [0u8; 3];
                    match moat.try_read(&mut request) {
                        Ok(0) => {
                            eprintln!("moat run: moat has gone; ending the sandbox");
                            return Ok(137);
                        }
                        Ok(3) if request[0] == b'c' => {
                            connect_inside(&moat, u16::from_be_bytes([request[1], request[2]])).await;
                        }
                        _ => {}
                    }
                    continue;
                }
                _ = term.recv() => Signal::TERM,
                // From a terminal, CMD has it already. PID 1 must not die of it.
                _ = int.recv() => {
                    if super::interrupts_reach_the_command() {
                        continue;
                    }
                    Signal::INT
                }
                _ = hup.recv() => Signal::HUP,
                _ = quit.recv() => Signal::QUIT,
                _ = usr1.recv() => Signal::USR1,
                _ = usr2.recv() => Signal::USR2,
                _ = winch.recv() => Signal::WINCH,
            };
            let _ = rustix::process::kill_process(pid, forward);
        }
    })
}

/// The init step's OOM score (`/proc/self/oom_score_adj`).
///
/// CMD, and all it starts, are the OOM killer's first choice (1000), the init step keeps its
/// own: under a container's memory limit the killer would otherwise take the largest process,
/// at first the init step (moat's binary), and the container would end without its command's
/// exit code; on a host out of memory, the untrusted program should go first anyway. Raising
/// a score needs no privilege, and a process may lower its own back to the value it started
/// with, so the init step raises its own, starts CMD (which inherits it) and restores its own.
struct OomScore {
    file: std::fs::File,
    own: String,
}

impl OomScore {
    const PATH: &str = "/proc/self/oom_score_adj";

    fn open() -> Result<Self, String> {
        let failed = |e: std::io::Error| format!("{}: {e}", Self::PATH);
        let own = std::fs::read_to_string(Self::PATH).map_err(failed)?.trim().to_string();
        let file = std::fs::OpenOptions::new().write(true).open(Self::PATH).map_err(failed)?;
        Ok(Self { file, own })
    }

    /// Runs `start` (CMD's spawn) with the highest score, then restores this process's.
    fn first_to_go<T>(&self, start: impl FnOnce() -> T) -> Result<T, String> {
        use std::io::Write;
        let set = |value: &str| (&self.file).write_all(value.as_bytes()).map_err(|e| format!("{}: {e}", Self::PATH));
        set("1000")?;
        let started = start();
        set(&self.own)?;
        Ok(started)
    }
}

/// Connects to `port` of the sandbox's loopback for moat (the daemon's `getTcpPort`) and
/// sends it the connected socket, or why there is none.
async fn connect_inside(moat: &tokio::net::UnixStream, port: u16) {
    let dialled = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)),
    )
    .await;
    let _ = match dialled {
        Ok(Ok(stream)) => match stream.into_std() {
            Ok(s) => super::wire::send_connected(moat, Ok(&s)),
            Err(e) => super::wire::send_connected(moat, Err(&e.to_string())),
        },
        Ok(Err(e)) => super::wire::send_connected(moat, Err(&format!("port {port} of the container: {e}"))),
        Err(_) => super::wire::send_connected(moat, Err(&format!("port {port} of the container: no answer within 5s"))),
    };
}

/// The CA certificate moat signs intercepted hosts with, and a bundle of it over the
/// system's roots (for clients that take one file for every root).
const CA_FILE: &str = "ca.pem";
const BUNDLE_FILE: &str = "ca-bundle.pem";
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

pub fn trust_files(ca: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut bundle = std::fs::read(SYSTEM_ROOTS).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca);
    vec![(CA_FILE, ca.to_vec()), (BUNDLE_FILE, bundle)]
}

/// The variables that make common clients trust moat's CA (SPEC 5.2).
pub fn trust_variables(dir: &Path) -> Vec<(&'static str, PathBuf)> {
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

/// The sandbox's resolv.conf: any IPv4 address reaches moat's DNS inside, and this one is
/// valid everywhere. The host's may name only IPv6 servers, or none.
const RESOLVER: &str =
    "# moat run: every DNS query goes to moat, whatever address it is sent to\nnameserver 127.0.0.1\n";
const RESOLV_CONF: &str = "resolv.conf";

/// Shows `file` as /etc/resolv.conf. Where that cannot be (a symlink to a missing file, say),
/// the host's stays: every query to an IPv4 server reaches moat anyway.
fn point_resolv_conf_at_moat(file: &Path) {
    if let Err(e) = rustix::mount::mount_bind(file, "/etc/resolv.conf") {
        eprintln!("moat run: /etc/resolv.conf stays the host's ({e}); queries to IPv4 servers still reach moat");
    }
}

/// Covers `file` (an admin socket outside the data folder) with /dev/null: nothing to
/// connect to there.
fn hide_file(file: &Path) -> Result<(), String> {
    rustix::mount::mount_bind("/dev/null", file).map_err(|e| format!("cannot hide {}: {e}", file.display()))
}

/// CMD gets no capability in the sandbox's namespaces, and cannot gain one: without that,
/// root of the user namespace could unmount what hides moat's data folder. The init step
/// first becomes `user` (see [`Become`]); then the bounding set is emptied, root's exec gains
/// nothing (securebits), and `no_new_privs` is set.
pub(super) fn drop_privileges(user: Become, proc: &std::fs::File) -> Result<(), String> {
    use rustix::process::{Gid, Uid};
    use rustix::thread::{CapabilitiesSecureBits as Bits, CapabilitySet, CapabilitySets};
    let failed = |what: &str, e: rustix::io::Errno| format!("cannot drop privileges ({what}): {e}");
    if let Become::Nest { uid, gid } = user {
        // A new user namespace has every capability in it, and a full bounding set: it comes
        // first, so that what follows removes those too.
        nest_user_namespace(uid, gid, proc)?;
    }
    // Kept across the switch below (NO_SETUID_FIXUP), so that they can be dropped after it.
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
    if let Become::Switch { uid, gid } = user {
        // One thread: the per-thread calls are the process's.
        let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
        rustix::thread::set_thread_groups(&[gid]).map_err(|e| failed("groups", e))?;
        rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(|e| failed("gid", e))?;
        rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(|e| failed("uid", e))?;
    }
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, none).map_err(|e| failed("capabilities", e))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| failed("no_new_privs", e))
}

/// Moves into a new user namespace in which `uid`/`gid` (the user outside, who is root of
/// the sandbox's first user namespace) are this process's ids again.
/// `proc`: a /proc in which this process is visible (`moat exec` is in the container's mount
/// namespace by then, whose /proc is of a PID namespace it is not in).
fn nest_user_namespace(uid: u32, gid: u32, proc: &std::fs::File) -> Result<(), String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("cannot show CMD its own user ({what}): {e}");
    // Safe with this flag: only FILES (sharing descriptor tables between threads) is not;
    // and this process has one thread.
    #[allow(deprecated)]
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWUSER).map_err(|e| failed("unshare", &e))?;
    // Without CAP_SETGID outside, a gid map needs setgroups denied first (user_namespaces(7)).
    for (file, line) in
        [("setgroups", "deny".to_string()), ("uid_map", format!("{uid} 0 1")), ("gid_map", format!("{gid} 0 1"))]
    {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::openat(proc, format!("self/{file}"), OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| failed(file, &e))?;
        rustix::io::write(&fd, line.as_bytes()).map_err(|e| failed(file, &e))?;
    }
    Ok(())
}

/// Brings up loopback and makes every IPv4 address local (the AnyIP route); with `relay`,
/// redirects every TCP port but 53, 80 and 443 of every address but loopback's to the relay.
fn network_up(relay: bool) -> Result<(), String> {
    for args in [&["link", "set", "lo", "up"][..], &["route", "add", "local", "0.0.0.0/0", "dev", "lo"][..]] {
        tool("ip", args, None, "moat run needs iproute2's ip (apt-get install iproute2)")?;
    }
    if relay {
        let rules = format!(
            "table ip moat {{ chain output {{ type nat hook output priority -100; policy accept; \
             ip daddr 127.0.0.0/8 return; tcp dport {{ 53, 80, 443 }} return; \
             meta l4proto tcp redirect to :{RELAY_PORT}; }}; }}"
        );
        let missing =
            "internet on needs nftables' nft to relay other ports (apt-get install nftables), or pass --no-internet";
        tool("nft", &["-f", "-"], Some(&rules), missing)?;
    }
    Ok(())
}

/// Runs `program args` (with `input` on its stdin); `missing` is the error when it is not
/// installed.
fn tool(program: &str, args: &[&str], input: Option<&str>, missing: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::Stdio;
    let shown = || format!("{program} {}", args.join(" "));
    let found = super::find_program(program).ok_or_else(|| missing.to_string())?;
    let mut child = Command::new(found)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => missing.to_string(),
            _ => format!("{}: {e}", shown()),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", shown()))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{}: {e}", shown()))?;
    if !out.status.success() {
        return Err(format!("{}: {}", shown(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}
