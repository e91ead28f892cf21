//! Containers the daemon starts (SPEC 5.3): `moat run`'s sandbox, made by `moat serve` on
//! request (admin API, CLI), served by its workers, its output kept in a bounded log under
//! the data folder, its record kept in the database across restarts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::attach::Running;
use crate::db::containers::RegistryBackend;
use crate::identity::ContainerId;
use crate::lifecycle::{Lifecycle, LifecycleError, StartSpec, State, Status};
use crate::proxy::listen::WorkerTx;
use crate::proxy::state::Shared;

/// How long `destroy` and shutdown wait after SIGTERM before SIGKILL.
pub(super) const GRACE: Duration = Duration::from_secs(10);
/// A container's log keeps at most this much of its latest output.
const LOG_BYTES: u64 = 1 << 20;

/// The daemon's containers.
pub(crate) struct Supervisor {
    shared: Arc<Shared>,
    workers: Vec<WorkerTx>,
    handle: tokio::runtime::Handle,
    /// Where the records are kept (this node's, and with a shared store the others').
    registry: Arc<dyn RegistryBackend>,
    /// Ids with a sandbox served here (attached `moat run`s too): one at a time per id.
    running: Running,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Itself, for the tasks it spawns (it lives in an `Arc`).
    me: std::sync::Weak<Supervisor>,
}

struct Entry {
    status: watch::Sender<Status>,
    /// The init step, while it runs.
    init: Option<rustix::process::Pid>,
    /// Set by `destroy`: what `monitor` reports.
    destroyed: Option<Option<String>>,
    /// The socket to its init step, while it runs (connections inside are asked for on it,
    /// one at a time).
    handover: Option<Arc<Mutex<std::os::unix::net::UnixStream>>>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Supervisor {
    /// The supervisor, with every stored record; a container that was running when moat
    /// stopped is `lost` (its sandbox ended with moat).
    pub(super) fn open(
        shared: Arc<Shared>,
        workers: Vec<WorkerTx>,
        registry: Arc<dyn RegistryBackend>,
        running: Running,
    ) -> anyhow::Result<Arc<Self>> {
        let mut entries = BTreeMap::new();
        for json in registry.mine().map_err(anyhow::Error::msg)? {
            let Ok(mut status) = serde_json::from_str::<Status>(&json) else { continue };
            if status.running {
                status.running = false;
                status.state = State::Lost;
                status.pid = None;
            }
            let (tx, _) = watch::channel(status.clone());
            entries.insert(status.id, Entry { status: tx, init: None, destroyed: None, handover: None });
        }
        let me = Arc::new_cyclic(|me| Self {
            shared,
            workers,
            handle: tokio::runtime::Handle::current(),
            registry,
            running,
            entries: Mutex::new(entries),
            me: me.clone(),
        });
        let lost: Vec<Status> = me
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.status.borrow().clone())
            .filter(|s| s.state == State::Lost)
            .collect();
        for status in lost {
            me.persist(&status);
        }
        Ok(me)
    }

    fn persist(&self, status: &Status) {
        let stored = serde_json::to_string(status)
            .map_err(|e| e.to_string())
            .and_then(|json| self.registry.save(&status.id, &json, status.running));
        if let Err(e) = stored {
            tracing::warn!(container = status.id, "container record not stored: {e}");
        }
    }

    /// SIGTERM to every running container, then waits up to `grace` for them to end.
    pub(super) async fn stop_all(&self, grace: Duration) {
        let ids: Vec<String> = self.list().into_iter().filter(|s| s.running).map(|s| s.id).collect();
        for id in &ids {
            let _ = self.signal(id, rustix::process::Signal::TERM.as_raw());
        }
        let deadline = tokio::time::Instant::now() + grace;
        while ids.iter().any(|id| self.get(id).is_some_and(|s| s.running)) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_path(&self, id: &str) -> std::path::PathBuf {
        log_path(&self.shared.config.data_dir, id)
    }

    fn start_sandbox(&self, spec: &StartSpec, container: &ContainerId) -> Result<Started, LifecycleError> {
        let failed = LifecycleError::Failed;
        let config = &self.shared.config;
        let class = super::attached::sandbox_class(&self.shared, spec.class.as_deref(), None)
            .map_err(|e| LifecycleError::Invalid(e.to_string()))?;
        let user = crate::sandbox::users::become_user(spec.user.as_deref()).map_err(LifecycleError::Invalid)?;
        // Not the daemon's environment: it holds the secrets.
        let mut env: Vec<(String, String)> =
            vec![("PATH".into(), std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()))];
        env.extend(crate::sandbox::users::login_env(user).into_iter().map(|(k, v)| (k.to_string(), v)));
        for (k, v) in &spec.env {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let relay = spec.enable_internet.unwrap_or_else(|| crate::sandbox::find_program("nft").is_some());
        let log = self.log_path(container.as_str());
        let (reader, writer) = std::io::pipe().map_err(|e| failed(format!("no pipe for its output: {e}")))?;
        let output: std::os::fd::OwnedFd = writer.into();
        let handover = config.data_dir.join(format!("{container}.sandbox.sock"));
        let hidden = super::hidden_from_sandboxes(config);
        let workdir = spec.workdir.as_deref().map(std::path::Path::new);
        let sandbox = crate::sandbox::start(&crate::sandbox::Spec {
            cmd: &spec.entrypoint,
            env: &env,
            handover: &handover,
            hide: &hidden,
            relay,
            user,
            workdir,
            output: Some(&output),
            container: container.as_str(),
            limits: limits_of(spec),
        })
        .map_err(failed)?;
        drop(output);
        keep_log(reader, log);
        Ok(Started { sandbox, class })
    }
}

/// The cgroup limits a start asks for.
fn limits_of(spec: &StartSpec) -> crate::sandbox::cgroup::Limits {
    crate::sandbox::cgroup::Limits { memory: spec.memory, pids: spec.pids }
}

/// A sandbox started for a container, not yet released.
struct Started {
    sandbox: crate::sandbox::Sandbox,
    class: crate::proxy::state::ClassId,
}

/// Where a container's output is kept.
pub(crate) fn log_path(data_dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    data_dir.join("containers").join(format!("{id}.log"))
}

/// Copies the command's output into `path` on a thread of its own, keeping the file under
/// [`LOG_BYTES`]: past that, the older half goes.
fn keep_log(mut reader: std::io::PipeReader, path: std::path::PathBuf) {
    use std::io::{Read, Seek, SeekFrom, Write};
    std::thread::spawn(move || {
        let _ = std::fs::create_dir_all(path.parent().unwrap_or(&path));
        // Read too: the newer half is read back when the file passes its bound.
        let opened = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path);
        let mut file = opened.inspect_err(|e| tracing::warn!("container log {}: {e}", path.display())).ok();
        let mut len: u64 = 0;
        let mut buf = vec![0u8; 16 * 1024];
        // Drained to the end whatever happens to the file: a closed pipe would end the
        // container's command with SIGPIPE.
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            let Some(f) = file.as_mut() else { continue };
            let mut write = || -> std::io::Result<()> {
                f.write_all(&buf[..n])?;
                len += n as u64;
                if len > LOG_BYTES {
                    // Keep the newer half: read it, and write it over the file from the start.
                    let keep = LOG_BYTES / 2;
                    let mut tail = vec![0u8; keep as usize];
                    f.seek(SeekFrom::Start(len - keep))?;
                    f.read_exact(&mut tail)?;
                    f.set_len(0)?;
                    f.seek(SeekFrom::Start(0))?;
                    f.write_all(&tail)?;
                    len = keep;
                }
                Ok(())
            };
            if let Err(e) = write() {
                tracing::warn!("container log {}: {e}; its output is dropped from here", path.display());
                file = None;
            }
        }
    });
}

impl Lifecycle for Supervisor {
    fn start(&self, spec: StartSpec) -> Result<Status, LifecycleError> {
        let container = ContainerId::parse(&spec.id).map_err(|e| LifecycleError::Invalid(format!("id: {e}")))?;
        if spec.entrypoint.is_empty() {
            return Err(LifecycleError::Invalid("entrypoint: name the command to run".into()));
        }
        limits_of(&spec).check().map_err(LifecycleError::Invalid)?;
        if !self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.id.clone()) {
            return Err(LifecycleError::Conflict(format!("container {container} is already running")));
        }
        let free_here = || {
            self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&spec.id);
        };
        // With a shared registry, the id must not run on another node (overrides are per id).
        match self.registry.claim(&spec.id) {
            Ok(Ok(())) => {}
            Ok(Err(node)) => {
                free_here();
                return Err(LifecycleError::Conflict(format!("container {container} is running on node {node}")));
            }
            Err(e) => {
                free_here();
                return Err(LifecycleError::Failed(format!("the container registry: {e}")));
            }
        }
        let free = || {
            free_here();
            if let Err(e) = self.registry.release(&spec.id) {
                tracing::warn!(container = spec.id, "container id not released in the registry: {e}");
            }
        };
        let Started { sandbox, class } = self.start_sandbox(&spec, &container).inspect_err(|_| free())?;
        let settings =
            crate::policy::ContainerSettings { enable_internet: spec.enable_internet, intercept_https: None };
        self.shared.overrides.set_settings(container.as_str(), settings);
        let crate::sandbox::Sandbox { mut child, sockets, handover, init, cgroup } = sandbox;
        let mut tasks = tokio::task::JoinSet::new();
        let served = {
            let _runtime = self.handle.enter();
            super::attached::serve_sandbox(&self.shared, &self.workers, &mut tasks, class, container.clone(), sockets)
        };
        let ca = std::fs::read(crate::tls::ca::cert_path(&self.shared.config));
        let released = served
            .map_err(|e| e.to_string())
            .and(ca.map_err(|e| e.to_string()))
            .and_then(|ca| crate::sandbox::release(&handover, &ca).map_err(|e| e.to_string()))
            .and_then(|()| crate::sandbox::started(&handover));
        if let Err(why) = released {
            // Its handover closed, the init step ends whatever it started.
            drop(handover);
            let _ = child.wait();
            tasks.abort_all();
            // Not started: intercepts set before a start stay for the next one.
            self.shared.overrides.set_settings(container.as_str(), Default::default());
            free();
            return Err(LifecycleError::Failed(why));
        }
        let status = Status {
            id: spec.id.clone(),
            class: self.shared.class(class).config.name.to_string(),
            state: State::Running,
            running: true,
            pid: Some(init.as_raw_nonzero().get() as u32),
            entrypoint: spec.entrypoint.clone(),
            started: now(),
            exited: None,
            exit_code: None,
            error: None,
            memory: spec.memory,
            pids: spec.pids,
            node: None,
        };
        self.persist(&status);
        let (tx, _) = watch::channel(status.clone());
        let handover = Arc::new(Mutex::new(handover));
        let entry = Entry { status: tx, init: Some(init), destroyed: None, handover: Some(handover.clone()) };
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.id.clone(), entry);
        tracing::info!(container = %container, class = status.class, "container started: {}", spec.entrypoint.join(" "));
        // Its end, on a thread (a blocking wait), then the record on the runtime.
        let (ended, done) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let code = child.wait().map(crate::sandbox::exit_code).unwrap_or(1);
            // Every process of the container has gone with its init step: its cgroup goes.
            drop(cgroup);
            let _ = ended.send(code);
        });
        let me = self.self_arc();
        self.handle.spawn(async move {
            let code = done.await.unwrap_or(1);
            drop(handover);
            tasks.abort_all();
            me.ended(&container, code);
        });
        Ok(status)
    }

    /// This node's containers; with a shared registry, every other node's too, each named
    /// with its node.
    fn list(&self) -> Vec<Status> {
        let mut all: Vec<Status> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| e.status.borrow().clone())
            .collect();
        if self.registry.shared() {
            let me = &self.shared.config.stores.node;
            all.iter_mut().for_each(|s| s.node = Some(me.clone()));
            match self.registry.others() {
                Ok(others) => all.extend(others.into_iter().filter_map(|(node, json)| {
                    let mut s = serde_json::from_str::<Status>(&json).ok()?;
                    s.node = Some(node);
                    Some(s)
                })),
                Err(e) => tracing::warn!("other nodes' containers not listed: {e}"),
            }
            all.sort_by(|a, b| a.id.cmp(&b.id));
        }
        all
    }

    fn get(&self, id: &str) -> Option<Status> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|e| e.status.borrow().clone())
    }

    fn signal(&self, id: &str, number: i32) -> Result<(), LifecycleError> {
        let signal = rustix::process::Signal::from_named_raw(number)
            .ok_or_else(|| LifecycleError::Invalid(format!("signal {number}: not a signal number (1..31)")))?;
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(id).ok_or_else(|| LifecycleError::NotFound(id.to_string()))?;
        let init = entry.init.ok_or_else(|| LifecycleError::Conflict(format!("container {id} is not running")))?;
        // The init step passes it on to the command (SIGKILL ends the init step, and so all).
        rustix::process::kill_process(init, signal).map_err(|e| LifecycleError::Failed(format!("signal {number}: {e}")))
    }

    fn destroy(&self, id: &str, message: Option<String>) -> Result<(), LifecycleError> {
        let init = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let entry = entries.get_mut(id).ok_or_else(|| LifecycleError::NotFound(id.to_string()))?;
            let Some(init) = entry.init else { return Ok(()) };
            entry.destroyed = Some(message);
            init
        };
        let _ = rustix::process::kill_process(init, rustix::process::Signal::TERM);
        let me = self.self_arc();
        let id = id.to_string();
        self.handle.spawn(async move {
            tokio::time::sleep(GRACE).await;
            if me.get(&id).is_some_and(|s| s.running && s.pid == Some(init.as_raw_nonzero().get() as u32)) {
                let _ = rustix::process::kill_process(init, rustix::process::Signal::KILL);
            }
        });
        Ok(())
    }

    fn connect(&self, id: &str, port: u16) -> Result<std::net::TcpStream, LifecycleError> {
        let handover = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let entry = entries.get(id).ok_or_else(|| LifecycleError::NotFound(id.to_string()))?;
            entry.handover.clone().ok_or_else(|| LifecycleError::Conflict(format!("container {id} is not running")))?
        };
        let socket = handover.lock().unwrap_or_else(|e| e.into_inner());
        crate::sandbox::connect_inside(&socket, port).map_err(LifecycleError::Failed)
    }

    fn watch(&self, id: &str) -> Option<watch::Receiver<Status>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|e| e.status.subscribe())
    }
}

impl Supervisor {
    /// This supervisor as an `Arc` (it only ever lives in one).
    fn self_arc(&self) -> Arc<Self> {
        self.me.upgrade().expect("a supervisor lives in an Arc")
    }

    /// A container's command has ended with `code`.
    fn ended(&self, container: &ContainerId, code: i32) {
        let id = container.as_str();
        self.shared.overrides.container_ended(id);
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        let status = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = entries.get_mut(id) else { return };
            entry.init = None;
            entry.handover = None;
            let destroyed = entry.destroyed.take();
            entry.status.send_modify(|s| {
                s.running = false;
                s.pid = None;
                s.exited = Some(now());
                s.exit_code = Some(code);
                s.state = if destroyed.is_some() { State::Destroyed } else { State::Exited };
                s.error = destroyed.flatten();
            });
            entry.status.borrow().clone()
        };
        self.persist(&status);
        tracing::info!(container = %container, "container ended: exit code {code}");
    }
}
