//! Sharing a data folder (SPEC 5.2, `moat run` beside a running moat): every moat that
//! serves a data folder (`moat serve`, or `moat run`) listens on `attach.sock` in it, and a
//! `moat run` that finds it there hands its sandbox's sockets to that moat instead of
//! opening the folder (whose database one process holds): that moat's policies, bindings,
//! overrides and access log serve the container for as long as the connection stays open.
//! The socket is in the data folder, so no sandbox sees it; it is its owner's only (0600).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Sockets;

/// The socket's name in the data folder.
pub const SOCKET: &str = "attach.sock";

/// What a `moat run` asks of the moat it attaches to.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub container: String,
    /// `--class`.
    pub class: Option<String>,
    /// `--policy`, absolute: the class whose policy is this file.
    pub policy: Option<PathBuf>,
    /// `--internet` / `--no-internet`.
    pub internet: Option<bool>,
    /// `--intercept-https`.
    pub intercept_https: bool,
}

/// The attached moat's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// It serves the sandbox: the CA certificate the sandbox should trust, the class, and
    /// the server's process id (for the user).
    Serving { ca_pem: String, class: String, pid: u32 },
    /// It does not; why, in one line.
    Refused(String),
}

/// The moat serving `data_dir`, if one listens there.
pub fn connect(data_dir: &Path) -> Option<UnixStream> {
    UnixStream::connect(data_dir.join(SOCKET)).ok()
}

/// Hands `sockets` over with `request`; returns the answer (after which `stream` must stay
/// open for as long as the sandbox runs).
pub fn attach(stream: &UnixStream, request: &Request, sockets: &Sockets) -> Result<Reply, String> {
    let failed = |e: std::io::Error| format!("cannot hand the sandbox to the moat serving this data folder: {e}");
    let json = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    super::wire::send_fds(stream, &sockets.fds()).map_err(failed)?;
    super::wire::write_message(stream, &json).map_err(failed)?;
    let reply = super::wire::read_message(stream).map_err(failed)?;
    serde_json::from_slice(&reply).map_err(|e| format!("the moat serving this data folder answered oddly: {e}"))
}

/// The server's side: the sockets and the request a `moat run` sent.
pub fn receive(stream: &UnixStream) -> Result<(Request, Sockets), String> {
    let fds = super::wire::receive_fds(stream).map_err(|e| e.to_string())?;
    let relay = fds.len() == 5;
    let sockets = super::sockets(fds, relay)?;
    let request = super::wire::read_message(stream).map_err(|e| e.to_string())?;
    let request = serde_json::from_slice(&request).map_err(|e| e.to_string())?;
    Ok((request, sockets))
}

/// The server's answer.
pub fn reply(stream: &UnixStream, reply: &Reply) -> std::io::Result<()> {
    super::wire::write_message(stream, &serde_json::to_vec(reply).map_err(std::io::Error::other)?)
}
