//! What crosses the sandbox's Unix sockets: descriptors (SCM_RIGHTS, with one byte of
//! payload) and length-prefixed messages.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use super::MAX_FDS;

/// The largest message either side reads (a CA certificate, a request): more is a peer gone wrong.
const MAX_MESSAGE: usize = 1 << 20;

/// Sends `fds` (at most [`MAX_FDS`]).
pub fn send_fds(socket: &UnixStream, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("too many descriptors"));
    }
    rustix::net::sendmsg(socket.as_fd(), &[IoSlice::new(b"f")], &mut control, SendFlags::empty())?;
    Ok(())
}

/// Receives what [`send_fds`] sent (close-on-exec).
pub fn receive_fds(socket: &UnixStream) -> std::io::Result<Vec<OwnedFd>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got =
        rustix::net::recvmsg(socket.as_fd(), &mut [IoSliceMut::new(&mut byte)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    if got.bytes == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            return Ok(fds.collect());
        }
    }
    Err(std::io::Error::other("no descriptors"))
}

/// Writes one message: its length (4 bytes, big-endian), then it.
pub fn write_message(mut socket: &UnixStream, message: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(message.len()).map_err(std::io::Error::other)?;
    socket.write_all(&len.to_be_bytes())?;
    socket.write_all(message)
}

/// Reads one message [`write_message`] wrote.
pub fn read_message(mut socket: &UnixStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    socket.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("a message of {len} bytes")));
    }
    let mut message = vec![0u8; len];
    socket.read_exact(&mut message)?;
    Ok(message)
}

/// The init step's answer to a connection request: the connected socket, or why not (one
/// byte `f` with the descriptor, or `e` and a message).
pub fn send_connected(socket: &impl AsFd, connected: Result<&std::net::TcpStream, &str>) -> std::io::Result<()> {
    match connected {
        Ok(stream) => {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [stream.as_fd()];
            control.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(socket.as_fd(), &[IoSlice::new(b"f")], &mut control, SendFlags::empty())?;
        }
        Err(why) => {
            let len = u32::try_from(why.len()).map_err(std::io::Error::other)?.to_be_bytes();
            let message = [&b"e"[..], &len, why.as_bytes()].concat();
            rustix::net::send(socket.as_fd(), &message, SendFlags::empty())?;
        }
    }
    Ok(())
}

/// Asks the init step on `socket` for a connection to `port` inside its sandbox.
pub fn request_connection(socket: &UnixStream, port: u16) -> Result<std::net::TcpStream, String> {
    let failed = |e: std::io::Error| format!("the container's init step did not answer: {e}");
    let [hi, lo] = port.to_be_bytes();
    (&*socket).write_all(&[b'c', hi, lo]).map_err(failed)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut kind = [0u8; 1];
    let got =
        rustix::net::recvmsg(socket.as_fd(), &mut [IoSliceMut::new(&mut kind)], &mut control, RecvFlags::CMSG_CLOEXEC)
            .map_err(|e| failed(e.into()))?;
    if got.bytes == 0 {
        return Err("the container has ended".into());
    }
    if kind[0] == b'e' {
        let why = read_message(socket).map_err(failed)?;
        return Err(String::from_utf8_lossy(&why).into_owned());
    }
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(std::net::TcpStream::from(fd));
        }
    }
    Err("the container's init step sent no connection".into())
}
