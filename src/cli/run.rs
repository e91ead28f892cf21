//! `moat run -- CMD`: CMD as one container in a sandbox whose only way out is this moat's
//! policy (SPEC 5.2). The policy engine runs in this process, as `moat serve` would run it
//! (same workers, handlers, bindings, hot reload and access log, on the config's data
//! folder), serving the sandbox's transparent listeners only. With `--weak`, no sandbox:
//! CMD only gets proxy variables for an explicit listener of this moat.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::identity::ContainerId;
use crate::policy::ContainerSettings;
use crate::sandbox::Become;
pub use crate::sandbox::cgroup::Limits;
use crate::serve::{Attached, Running, Serving};

/// `moat run`'s flags besides the config's.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// `--id` (default: a fresh `run-…` id).
    pub id: Option<String>,
    /// `--class`: needed when the config has several.
    pub class: Option<String>,
    /// `--env K=V`, in order.
    pub env: Vec<String>,
    /// `--internet` (true) or `--no-internet` (false); else the class's `enableInternet`.
    pub internet: Option<bool>,
    /// `--intercept-https`.
    pub intercept_https: bool,
    /// `--user NAME|UID[:GID]`.
    pub user: Option<String>,
    /// `--weak`: no sandbox.
    pub weak: bool,
    /// `--memory`, `--pids`: the sandbox's cgroup limits.
    pub limits: crate::sandbox::cgroup::Limits,
}

/// Runs `cmd` as one container; returns CMD's exit code.
pub fn run(mut config: Config, options: RunOptions, cmd: &[String]) -> Result<i32, String> {
    if cmd.is_empty() {
        return Err("nothing to run: moat run [OPTIONS] -- CMD [ARGS...]".into());
    }
    let container = match &options.id {
        Some(id) => ContainerId::parse(id).map_err(|e| format!("--id: {e}"))?,
        None => fresh_id()?,
    };
    if options.weak && options.user.is_some() {
        return Err("--user needs the sandbox: --weak runs CMD as moat's own user".into());
    }
    if options.weak && !options.limits.is_empty() {
        return Err("--memory and --pids need the sandbox: --weak runs CMD as a plain process".into());
    }
    let user = crate::sandbox::users::become_user(options.user.as_deref())?;
    let mut env = sandbox_env(&config);
    for pair in &options.env {
        let (k, v) =
            pair.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| format!("--env {pair:?}: write K=V"))?;
        set(&mut env, k, v);
    }
    for (k, v) in crate::sandbox::users::login_env(user) {
        set(&mut env, k, &v);
    }
    eprintln!("moat run: container {container}");
    let settings = ContainerSettings {
        enable_internet: options.internet,
        intercept_https: options.intercept_https.then_some(true),
    };
    if !options.weak
        && let Some(stream) = crate::sandbox::attach::connect(&config.data_dir)
    {
        return beside(stream, &config, container, &options, user, cmd, &env);
    }
    if !config.has_policy() {
        return Err("no policy: pass --policy FILE or add a [[class]] to moat.toml (moat init writes one)".into());
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create the data folder {}: {e}", config.data_dir.display()))?;
    let attached = if options.weak {
        eprintln!(
            "moat run: --weak: nothing is enforced; CMD gets proxy variables, and may ignore them and reach the network directly"
        );
        // Its own port: the class's may be a running `moat serve`'s.
        for class in &mut config.classes {
            class.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        }
        weak(&config, container, options.class, settings, cmd, env)
    } else {
        sandboxed(&config, container, options.class, settings, options.internet, options.limits, user, cmd, &env)?
    };
    let code = crate::serve::run_with(config, Some(attached)).map_err(|e| format!("{e:#}"))?;
    Ok(code.unwrap_or(1))
}

/// A moat already serves the data folder (`moat serve`, another `moat run`): the sandbox is
/// made here, as this user, and handed to that moat, whose policies and log then serve it.
fn beside(
    stream: std::os::unix::net::UnixStream,
    config: &Config,
    container: ContainerId,
    options: &RunOptions,
    user: Become,
    cmd: &[String],
    env: &[(String, String)],
) -> Result<i32, String> {
    use crate::sandbox::attach::{Reply, Request};
    let relay = relay_wanted(options.internet);
    let sandbox = start_sandbox(config, &container, relay, options.limits, user, cmd, env)?;
    // The class: the one named, else the one whose policy this run names.
    let policy = match (&options.class, config.classes.as_slice()) {
        (None, [only]) => std::path::absolute(&only.policy).ok(),
        _ => None,
    };
    let request = Request {
        container: container.to_string(),
        class: options.class.clone(),
        policy,
        internet: options.internet,
        intercept_https: options.intercept_https,
    };
    let ca_pem = match crate::sandbox::attach::attach(&stream, &request, &sandbox.sockets)? {
        Reply::Serving { ca_pem, class, pid } => {
            eprintln!(
                "moat run: the moat (pid {pid}) serving {} runs this container on class {class}; its log shows the requests",
                config.data_dir.display()
            );
            ca_pem
        }
        // Dropping the sandbox's handover ends its init step before CMD starts.
        Reply::Refused(why) => return Err(format!("the moat serving {}: {why}", config.data_dir.display())),
    };
    crate::sandbox::release(&sandbox.handover, ca_pem.as_bytes())
        .map_err(|e| format!("cannot start the command: {e}"))?;
    drop(sandbox.sockets);
    let (ended, code) = wait_in_thread(sandbox.child, sandbox.cgroup);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| signal(kind).map_err(|e| e.to_string());
        let (mut term, mut int, mut hup) =
            (listen(SignalKind::terminate())?, listen(SignalKind::interrupt())?, listen(SignalKind::hangup())?);
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let server = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
        let until = async {
            tokio::select! {
                _ = ended => {}
                // The serving moat has gone: nothing serves the sandbox, so it ends with it.
                _ = crate::sandbox::peer_closed(&server) => eprintln!("moat run: the moat serving this data folder has gone; ending the sandbox"),
            }
        };
        crate::sandbox::pass_signals_until(sandbox.init, until, &mut term, &mut int, &mut hup).await;
        Ok::<_, String>(())
    })?;
    drop(sandbox.handover);
    // The init step sees its socket close and ends the sandbox; its exit code is CMD's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(code) = *code.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(code);
        }
        if std::time::Instant::now() > deadline {
            return Ok(1);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Starts the sandbox of `container`, hiding the data folder and a persisted CA's folder
/// (its private key) wherever it is.
fn start_sandbox(
    config: &Config,
    container: &ContainerId,
    relay: bool,
    limits: crate::sandbox::cgroup::Limits,
    user: Become,
    cmd: &[String],
    env: &[(String, String)],
) -> Result<crate::sandbox::Sandbox, String> {
    let handover = config.data_dir.join(format!("{container}.sandbox.sock"));
    let hidden = crate::serve::hidden_from_sandboxes(config);
    crate::sandbox::start(&crate::sandbox::Spec {
        cmd,
        env,
        handover: &handover,
        hide: &hidden,
        relay,
        user,
        workdir: None,
        output: None,
        container: container.as_str(),
        limits,
    })
}

/// Whether the sandbox gets the relay: `--internet`/`--no-internet`, else where nft is
/// installed (the class's `enableInternet` then decides each connection).
fn relay_wanted(internet: Option<bool>) -> bool {
    internet.unwrap_or_else(|| {
        let found = crate::sandbox::find_program("nft").is_some();
        if !found {
            eprintln!(
                "moat run: other TCP ports than 80 and 443 are refused: relaying them (enableInternet) needs nftables' nft (apt-get install nftables); --no-internet silences this"
            );
        }
        found
    })
}

/// The sandbox, started now; it runs CMD once moat serves it.
#[allow(clippy::too_many_arguments)]
fn sandboxed(
    config: &Config,
    container: ContainerId,
    class: Option<String>,
    settings: ContainerSettings,
    internet: Option<bool>,
    limits: crate::sandbox::cgroup::Limits,
    user: Become,
    cmd: &[String],
    env: &[(String, String)],
) -> Result<Attached, String> {
    let relay = relay_wanted(internet);
    let sandbox = start_sandbox(config, &container, relay, limits, user, cmd, env)?;
    let (signals_to, handover) = (sandbox.init, sandbox.handover);
    let (ended, code) = wait_in_thread(sandbox.child, sandbox.cgroup);
    let start = Box::new(move |serving: &Serving| {
        crate::sandbox::release(&handover, &serving.ca_pem).map_err(|e| format!("cannot start the command: {e}"))?;
        // The socket stays open for as long as moat serves: its end ends the sandbox.
        Ok(Running { signals_to, ended, code, keep: Box::new(handover) })
    });
    Ok(Attached { container, class, settings, sandbox: Some(sandbox.sockets), start })
}

/// `--weak`: CMD as a plain child, started once moat listens, with proxy variables naming
/// `container` and CA variables for moat's CA.
fn weak(
    config: &Config,
    container: ContainerId,
    class: Option<String>,
    settings: ContainerSettings,
    cmd: &[String],
    mut env: Vec<(String, String)>,
) -> Attached {
    let token = config.containers.get(&container).map_or_else(|| "moat".to_string(), |a| a.token.clone());
    let trust_dir = config.data_dir.join(format!("{container}.trust"));
    let (id, cmd) = (container.clone(), cmd.to_vec());
    let wanted = class.clone();
    let start = Box::new(move |serving: &Serving| {
        let addr = match &wanted {
            Some(name) => serving.listeners.iter().find(|(n, _)| n == name).map(|(_, a)| *a),
            None => serving.listeners.first().map(|(_, a)| *a),
        }
        .ok_or("no listener for the container's class")?;
        let proxy = format!("http://{id}:{token}@{addr}");
        env.retain(|(k, _)| !k.eq_ignore_ascii_case("no_proxy"));
        for k in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            set(&mut env, k, &proxy);
        }
        let trust = TrustDir::write(&trust_dir, &serving.ca_pem)?;
        for (k, v) in crate::sandbox::init::trust_variables(&trust.0) {
            set(&mut env, k, &v.to_string_lossy());
        }
        let (program, args) = cmd.split_first().ok_or("no command to run")?;
        let child = std::process::Command::new(program)
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let signals_to = rustix::process::Pid::from_raw(child.id() as i32).ok_or("CMD has no process id")?;
        let (ended, code) = wait_in_thread(child, None);
        Ok(Running { signals_to, ended, code, keep: Box::new(trust) })
    });
    Attached { container, class, settings, sandbox: None, start }
}

/// A folder with moat's CA for `--weak`'s CMD, removed with this value.
struct TrustDir(PathBuf);

impl TrustDir {
    fn write(dir: &Path, ca: &[u8]) -> Result<Self, String> {
        let failed = |e: std::io::Error| format!("cannot write the CA for CMD to {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(failed)?;
        for (name, bytes) in crate::sandbox::init::trust_files(ca) {
            std::fs::write(dir.join(name), bytes).map_err(failed)?;
        }
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for TrustDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for `child` on a thread: told when it has ended, with its exit code.
fn wait_in_thread(
    mut child: std::process::Child,
    cgroup: Option<crate::sandbox::cgroup::Cgroup>,
) -> (tokio::sync::oneshot::Receiver<()>, Arc<Mutex<Option<i32>>>) {
    let (done, ended) = tokio::sync::oneshot::channel();
    let code = Arc::new(Mutex::new(None));
    let slot = code.clone();
    std::thread::spawn(move || {
        let status = child.wait();
        // Every process of the sandbox has gone with its init step: its cgroup goes.
        drop(cgroup);
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = status.ok().map(crate::sandbox::exit_code);
        let _ = done.send(());
    });
    (ended, code)
}

/// A readable id that no other run is likely to have: `run-` and eight hex digits.
fn fresh_id() -> Result<ContainerId, String> {
    let bytes = crate::tls::random_bytes(4).map_err(|e| format!("no random bytes: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    ContainerId::parse(&format!("run-{hex}")).map_err(|e| e.to_string())
}

/// CMD's environment: the caller's, without what moat reads its secrets from and without
/// moat's own variables (SPEC 5.2).
fn sandbox_env(config: &Config) -> Vec<(String, String)> {
    let secret_vars: Vec<&str> = config.file.secrets.values().filter_map(|s| s.env.as_deref()).collect();
    let token_vars: Vec<&str> = config.file.containers.values().filter_map(|c| c.token_env.as_deref()).collect();
    std::env::vars()
        .filter(|(k, _)| {
            !k.starts_with("MOAT_") && !secret_vars.contains(&k.as_str()) && !token_vars.contains(&k.as_str())
        })
        .collect()
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.to_string()));
}
