//! Containers under the daemon (SPEC 5.3, 7.3): what can be asked of them and what they
//! report, as plain data. The admin API (and later Lua) ask through [`Lifecycle`]; `serve`
//! implements it with the sandbox of `moat run`, started by the daemon.

use serde::{Deserialize, Serialize};

/// `POST /v1/containers`: what to start.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartSpec {
    pub id: String,
    /// The class whose policy decides its traffic (the only one when absent).
    #[serde(default)]
    pub class: Option<String>,
    /// The command and its arguments.
    pub entrypoint: Vec<String>,
    /// Its whole environment besides `PATH` and the CA variables: the daemon's own (with its
    /// secrets) is never passed on.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// This container's `enableInternet` (the class's when absent).
    #[serde(default)]
    pub enable_internet: Option<bool>,
    /// Its working directory (the daemon's when absent).
    #[serde(default)]
    pub workdir: Option<String>,
    /// `NAME` or `UID[:GID]` (root daemons only).
    #[serde(default)]
    pub user: Option<String>,
    /// Memory its processes may use together: bytes, or a size such as `"256MiB"` (a cgroup;
    /// none when absent).
    #[serde(default, deserialize_with = "size", skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// How many processes and threads it may have at once (a cgroup; none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// A size as a number of bytes or as text (`"64MiB"`, [`crate::units::size_arg`]).
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(n)) => Ok(Some(n)),
        Some(Size::Text(t)) => crate::units::size_arg(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    /// Its command ended by itself (or by a signal).
    Exited,
    /// Ended by `destroy`.
    Destroyed,
    /// moat stopped while it ran; its sandbox ended with moat.
    Lost,
}

/// `GET /v1/containers/{id}`: one container's record (kept across restarts).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub id: String,
    pub class: String,
    pub state: State,
    pub running: bool,
    /// Its init step's process id, while it runs.
    pub pid: Option<u32>,
    pub entrypoint: Vec<String>,
    /// Unix seconds.
    pub started: u64,
    pub exited: Option<u64>,
    pub exit_code: Option<i32>,
    /// The message `destroy` was given (what `monitor` reports as its error).
    pub error: Option<String>,
    /// Its memory limit in bytes, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Its limit of processes and threads, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// The node it runs on, when nodes share one registry (`[cluster] store`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Why a lifecycle request changed nothing; the message is one line for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// 400: the request itself is wrong (bad id, signal out of range, empty entrypoint).
    #[error("{0}")]
    Invalid(String),
    /// 404.
    #[error("no container {0}")]
    NotFound(String),
    /// 409: it already runs (start), or it does not (signal).
    #[error("{0}")]
    Conflict(String),
    /// 500: the sandbox could not be made, the command could not run.
    #[error("{0}")]
    Failed(String),
}

/// What the daemon can do with its containers.
pub trait Lifecycle: Send + Sync {
    /// Starts a container; returns its record once its command runs.
    fn start(&self, spec: StartSpec) -> Result<Status, LifecycleError>;
    /// Every container moat has a record of, by id.
    fn list(&self) -> Vec<Status>;
    fn get(&self, id: &str) -> Option<Status>;
    /// Sends signal `number` (1..=64) to its command.
    fn signal(&self, id: &str, number: i32) -> Result<(), LifecycleError>;
    /// Ends it (SIGTERM, SIGKILL after a grace period); `message` is what `monitor` reports.
    fn destroy(&self, id: &str, message: Option<String>) -> Result<(), LifecycleError>;
    /// A connection to `port` of its loopback, made inside its sandbox (`getTcpPort`); blocks
    /// for up to 5 s. `Failed` says why there is none (nobody listens, say).
    fn connect(&self, id: &str, port: u16) -> Result<std::net::TcpStream, LifecycleError>;
    /// A receiver that sees its record change (its end); `None` for an unknown id.
    fn watch(&self, id: &str) -> Option<tokio::sync::watch::Receiver<Status>>;
}
