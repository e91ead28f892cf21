//! The `moat` command line. Parsing and printing only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use moat::config::{self, Config};
use moat::log::LogFormat;

#[derive(Parser)]
#[command(name = "moat", version, about = "A programmable egress proxy driven by Lua policies")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by the commands that read a config.
#[derive(clap::Args, Clone, Default)]
struct ConfigFlags {
    /// moat.toml to read (default: ./moat.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy script; defines one class (overrides [[class]] in the config).
    #[arg(long)]
    policy: Option<PathBuf>,
}

/// How the CLI finds a running instance's admin socket.
#[derive(clap::Args, Clone, Default)]
struct AdminFlags {
    /// moat.toml to read (default: ./moat.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The running instance's data folder (default .moat).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin socket (default unix:DATA_DIR/admin.sock).
    #[arg(long, value_name = "unix:PATH")]
    admin: Option<String>,
}

/// What `moat run` and `moat start` are told about their container.
#[derive(clap::Args)]
struct ContainerFlags {
    /// The container id (default: a fresh one, printed).
    #[arg(long)]
    id: Option<String>,
    /// The class whose policy decides its traffic (needed when there are several).
    #[arg(long)]
    class: Option<String>,
    /// A variable of its environment (repeatable); moat's own are not passed on.
    #[arg(long, value_name = "K=V")]
    env: Vec<String>,
    /// Relay every other TCP port, names looked up (enableInternet for this container;
    /// default: the class's).
    #[arg(long, overrides_with = "no_internet")]
    internet: bool,
    /// Only ports 80 and 443 (enableInternet = false for this container).
    #[arg(long)]
    no_internet: bool,
    /// Memory its processes may use together, e.g. 512MiB (a cgroup; past it the kernel
    /// ends one of them).
    #[arg(long, value_name = "SIZE", value_parser = config::size_arg)]
    memory: Option<u64>,
    /// How many processes and threads it may have at once (a cgroup).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pids: Option<u32>,
}

impl ContainerFlags {
    /// `--internet` (true), `--no-internet` (false), or neither.
    fn internet(&self) -> Option<bool> {
        (self.internet || self.no_internet).then_some(self.internet)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the explicit HTTP proxy.
    Serve {
        #[command(flatten)]
        cfg: ConfigFlags,
        /// Listener address for --policy (default 127.0.0.1:3128).
        #[arg(long)]
        listen: Option<String>,
        /// Folder for the database, blobs and admin socket (default .moat).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Static DNS answer for moat's resolver, like /etc/hosts (repeatable).
        #[arg(long, value_name = "HOST=IP")]
        resolve: Vec<String>,
        /// Admin API socket (default unix:DATA_DIR/admin.sock).
        #[arg(long, value_name = "unix:PATH")]
        admin: Option<String>,
        /// Log format.
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
    },
    /// Run CMD in a sandbox whose only way out is the policy (one container).
    Run {
        #[command(flatten)]
        cfg: ConfigFlags,
        /// Folder for the database, blobs and admin socket (default .moat).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Static DNS answer for moat's resolver, like /etc/hosts (repeatable).
        #[arg(long, value_name = "HOST=IP")]
        resolve: Vec<String>,
        #[command(flatten)]
        container: ContainerFlags,
        /// Log format.
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
        /// Intercept HTTPS for this container (interceptHttps), whatever the class says.
        #[arg(long)]
        intercept_https: bool,
        /// Run CMD as this user (NAME or UID[:GID]; default: the invoking user, SUDO_UID under sudo).
        #[arg(long)]
        user: Option<String>,
        /// No sandbox: only set proxy and CA variables for CMD (nothing is enforced).
        #[arg(long)]
        weak: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Another process in a running container (started by `moat exec`, not by hand).
    #[command(name = "__sandbox-exec", hide = true)]
    SandboxExec {
        pid: u32,
        data_dir: PathBuf,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Run CMD in a running container: same namespaces, user and environment (root only).
    Exec {
        #[command(flatten)]
        admin: AdminFlags,
        id: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The sandbox's first process (started by `moat run`, not by hand).
    #[command(name = "__sandbox-init", hide = true)]
    SandboxInit {
        handover: PathBuf,
        /// A folder to hide from CMD (repeatable).
        #[arg(long)]
        hide: Vec<PathBuf>,
        /// Who CMD runs as (same, switch:UID:GID or nest:UID:GID).
        #[arg(long, default_value = "same")]
        r#become: String,
        /// Redirect every other TCP port to the relay.
        #[arg(long)]
        relay: bool,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Load and validate policies; print what they define and what would fail.
    Check {
        #[command(flatten)]
        cfg: ConfigFlags,
        /// Warnings are errors too (exit 2).
        #[arg(long)]
        strict: bool,
    },
    /// Run policy tests (POLICY_test.lua beside each policy, or the FILES given) against the
    /// real engine, with fixtures in place of the network.
    Test {
        #[command(flatten)]
        cfg: ConfigFlags,
        /// Test files (default: each class's `tests`, else POLICY_test.lua beside its policy).
        files: Vec<PathBuf>,
    },
    /// Show which step of the decision order decides a request, without running handlers.
    Explain {
        #[command(flatten)]
        cfg: ConfigFlags,
        /// Container id (default "default").
        #[arg(long)]
        id: Option<String>,
        /// HTTP method.
        method: String,
        /// Absolute URL, e.g. http://api.github.com/user.
        url: String,
    },
    /// Start CMD as a container of the running moat (detached); prints its id.
    Start {
        #[command(flatten)]
        admin: AdminFlags,
        #[command(flatten)]
        container: ContainerFlags,
        /// Its working directory (default: the current one).
        #[arg(long)]
        workdir: Option<String>,
        /// Run it as this user (NAME or UID[:GID]; a root daemon only).
        #[arg(long)]
        user: Option<String>,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// List the running moat's containers.
    Ps {
        #[command(flatten)]
        admin: AdminFlags,
    },
    /// Stop a container: SIGTERM, SIGKILL after a grace period; prints its exit code.
    Stop {
        #[command(flatten)]
        admin: AdminFlags,
        id: String,
    },
    /// Send a container a signal (default KILL).
    Kill {
        #[command(flatten)]
        admin: AdminFlags,
        #[arg(short = 's', long, default_value = "KILL")]
        signal: String,
        id: String,
    },
    /// Wait for a container to end; prints and exits with its exit code.
    Wait {
        #[command(flatten)]
        admin: AdminFlags,
        id: String,
    },
    /// An HTTP request into a container at PORT (its own loopback); prints the answer.
    Port {
        #[command(flatten)]
        admin: AdminFlags,
        /// The request's body.
        #[arg(long)]
        data: Option<String>,
        id: String,
        port: u16,
        #[arg(default_value = "GET")]
        method: String,
        #[arg(default_value = "/")]
        path: String,
    },
    /// A container's output (stdout and stderr, the newest 1 MiB).
    Logs {
        #[command(flatten)]
        admin: AdminFlags,
        /// Keep printing what it writes until it ends.
        #[arg(short, long)]
        follow: bool,
        id: String,
    },
    /// Show the running instance: classes, generations, last reload error.
    Status {
        #[command(flatten)]
        admin: AdminFlags,
    },
    /// Change one container's policy at runtime (Cloudflare's instance methods).
    Policy {
        #[command(flatten)]
        admin: AdminFlags,
        /// The class to validate handler names against (when several are served).
        #[arg(long)]
        class: Option<String>,
        /// Container id.
        id: String,
        /// show, setOutboundHandler, setOutboundByHost, setOutboundByHosts, removeOutboundByHost,
        /// setAllowedHosts, setDeniedHosts, allowHost, denyHost, removeAllowedHost,
        /// removeDeniedHost, clearOverrides, removeOutboundHandler.
        setter: String,
        /// The setter's arguments (hosts, handler name, JSON params).
        args: Vec<String>,
    },
    /// Read and write KV namespaces (directly, or through the running moat).
    Kv {
        #[command(flatten)]
        admin: AdminFlags,
        /// get, put, delete or list.
        op: String,
        /// The binding name, e.g. KV.
        binding: String,
        /// The key (for list: a prefix).
        key: Option<String>,
        /// The value for put, or - to read standard input.
        value: Option<String>,
    },
    /// Read and write blob buckets (directly, or through the running moat).
    Blob {
        #[command(flatten)]
        admin: AdminFlags,
        /// get, put, delete or list.
        op: String,
        /// The bucket name, e.g. BUCKET.
        bucket: String,
        /// The object key (for list: a prefix).
        key: Option<String>,
        /// For put: the file to upload, or - for standard input.
        file: Option<String>,
    },
    /// Where moat's CA certificate is, for clients that must trust intercepted HTTPS.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
    /// Write a starter policy (or a recipe), its tests, moat.toml and editor types.
    Init {
        /// Folder to write into (default: the current folder).
        dir: Option<PathBuf>,
        /// Write a bundled recipe instead of the starter (agent-sandbox, github, llm-keys,
        /// registries, aws, bridges, audit-log, budgets).
        #[arg(long)]
        recipe: Option<String>,
    },
}

#[derive(Subcommand)]
enum CaAction {
    /// Print the path of the CA certificate (PEM).
    Path {
        #[command(flatten)]
        admin: AdminFlags,
    },
    /// Write the CA certificate (PEM) to --out, or to standard output.
    Export {
        #[command(flatten)]
        admin: AdminFlags,
        /// File to write.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { cfg, listen, data_dir, resolve, admin, log_format } => {
            let _log = moat::log::init(log_format);
            let flags = config::Overrides { config: cfg.config, policy: cfg.policy, listen, data_dir, resolve, admin };
            load_config(&flags).and_then(|c| {
                if !c.has_policy() {
                    return Err(usage(
                        "no policy: pass --policy FILE or add a [[class]] to moat.toml (moat init writes one)",
                    ));
                }
                moat::serve::run(c).map_err(|e| Failure::Runtime(format!("{e:#}")))
            })
        }
        Command::Run { cfg, data_dir, resolve, container, log_format, intercept_https, user, weak, cmd } => {
            let _log = moat::log::init(log_format);
            let flags =
                config::Overrides { config: cfg.config, policy: cfg.policy, data_dir, resolve, ..Default::default() };
            let internet = container.internet();
            let options = moat::cli::run::RunOptions {
                id: container.id,
                class: container.class,
                env: container.env,
                internet,
                intercept_https,
                user,
                weak,
                limits: moat::cli::run::Limits { memory: container.memory, pids: container.pids },
            };
            // A config that does not load is the user's (2); a run that fails is 1.
            return exit_with(
                load_config(&flags).and_then(|c| moat::cli::run::run(c, options, &cmd).map_err(Failure::Runtime)),
            );
        }
        Command::SandboxExec { pid, data_dir, cmd } => {
            return ExitCode::from(u8::try_from(moat::cli::sandbox_exec(pid, &data_dir, &cmd)).unwrap_or(1));
        }
        Command::Exec { admin, id, cmd } => {
            return exit_with(
                admin_config(admin).and_then(|c| moat::cli::containers::exec(&c, &id, &cmd).map_err(failure)),
            );
        }
        Command::SandboxInit { handover, hide, r#become, relay, cmd } => {
            let code = moat::cli::sandbox_init(handover, hide, &r#become, relay, cmd);
            return ExitCode::from(u8::try_from(code).unwrap_or(1));
        }
        Command::Check { cfg, strict } => {
            let flags = config::Overrides { config: cfg.config, policy: cfg.policy, ..Default::default() };
            load_config(&flags).and_then(|c| moat::cli::check(&c, strict).map_err(Failure::Usage))
        }
        Command::Test { cfg, files } => {
            moat::log::init_plain("warn,moat::console=info");
            let flags = config::Overrides { config: cfg.config, policy: cfg.policy, ..Default::default() };
            load_config(&flags).and_then(|c| match moat::cli::test(&c, &files) {
                Ok(true) => Ok(()),
                Ok(false) => Err(Failure::Runtime("some tests failed".into())),
                Err(e) => Err(Failure::Usage(e)),
            })
        }
        Command::Explain { cfg, id, method, url } => {
            let flags = config::Overrides { config: cfg.config, policy: cfg.policy, ..Default::default() };
            load_config(&flags)
                .and_then(|c| moat::cli::explain(&c, id.as_deref(), &method, &url).map_err(Failure::Usage))
        }
        Command::Start { admin, container, workdir, user, cmd } => {
            let internet = container.internet();
            let options = moat::cli::containers::StartOptions {
                id: container.id,
                class: container.class,
                env: container.env,
                internet,
                workdir,
                user,
                memory: container.memory,
                pids: container.pids,
            };
            admin_config(admin).and_then(|c| moat::cli::containers::start(&c, options, &cmd).map_err(failure))
        }
        Command::Ps { admin } => admin_config(admin).and_then(|c| moat::cli::containers::ps(&c).map_err(failure)),
        Command::Stop { admin, id } => {
            admin_config(admin).and_then(|c| moat::cli::containers::stop(&c, &id).map_err(failure))
        }
        Command::Kill { admin, signal, id } => {
            admin_config(admin).and_then(|c| moat::cli::containers::kill(&c, &id, &signal).map_err(failure))
        }
        Command::Wait { admin, id } => {
            return exit_with(admin_config(admin).and_then(|c| moat::cli::containers::wait(&c, &id).map_err(failure)));
        }
        Command::Port { admin, data, id, port, method, path } => admin_config(admin)
            .and_then(|c| moat::cli::containers::port(&c, &id, port, &method, &path, data.as_deref()).map_err(failure)),
        Command::Logs { admin, follow, id } => {
            admin_config(admin).and_then(|c| moat::cli::containers::logs(&c, &id, follow).map_err(failure))
        }
        Command::Status { admin } => {
            admin_socket(admin).and_then(|s| moat::admin::commands::status(&s).map_err(failure))
        }
        Command::Policy { admin, class, id, setter, args } => admin_socket(admin)
            .and_then(|s| moat::admin::commands::policy(&s, &id, class.as_deref(), &setter, &args).map_err(failure)),
        Command::Kv { admin, op, binding, key, value } => admin_config(admin)
            .and_then(|c| moat::cli::store::kv(&c, &op, &binding, key.as_deref(), value.as_deref()).map_err(failure)),
        Command::Blob { admin, op, bucket, key, file } => admin_config(admin)
            .and_then(|c| moat::cli::store::blob(&c, &op, &bucket, key.as_deref(), file.as_deref()).map_err(failure)),
        Command::Ca { action: CaAction::Path { admin } } => {
            admin_config(admin).and_then(|c| moat::cli::ca_path(&c).map_err(Failure::Runtime))
        }
        Command::Ca { action: CaAction::Export { admin, out } } => {
            admin_config(admin).and_then(|c| moat::cli::ca_export(&c, out.as_deref()).map_err(Failure::Runtime))
        }
        Command::Init { dir, recipe } => {
            moat::cli::init(&dir.unwrap_or_else(|| PathBuf::from(".")), recipe.as_deref()).map_err(Failure::Usage)
        }
    };
    exit_with(result.map(|()| 0))
}

/// Exit 2 (usage or config) or 1 (runtime), per SPEC 10.
enum Failure {
    Usage(String),
    Runtime(String),
}

fn usage(msg: &str) -> Failure {
    Failure::Usage(msg.to_string())
}

/// The config of the instance the CLI talks to (its data folder and admin socket).
fn admin_config(flags: AdminFlags) -> Result<Config, Failure> {
    load_config(&config::Overrides {
        config: flags.config,
        data_dir: flags.data_dir,
        admin: flags.admin,
        ..Default::default()
    })
}

/// Exits with a command's exit code (0 for most; CMD's for `moat run`, `wait`, `exec`), or
/// 2/1 with the one line that says why it could not run.
fn exit_with(result: Result<i32, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(Failure::Usage(m)) => {
            eprintln!("moat: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("moat: {m}");
            ExitCode::from(1)
        }
    }
}

fn admin_socket(flags: AdminFlags) -> Result<PathBuf, Failure> {
    Ok(admin_config(flags)?.admin_socket)
}

fn failure(e: moat::admin::commands::CommandError) -> Failure {
    if e.0 == 2 { Failure::Usage(e.1) } else { Failure::Runtime(e.1) }
}

fn load_config(flags: &config::Overrides) -> Result<Config, Failure> {
    Config::load(flags).map_err(|e| Failure::Usage(e.0))
}

// mimalloc: the proxy allocates many small, short-lived objects per request (headers, Lua
// strings); glibc malloc showed up as ~13% of a profile under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
