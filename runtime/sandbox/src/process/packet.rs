//! `SOCK_SEQPACKET` messages with file descriptors attached, the transport
//! between the runtime, the zygote and each call's waiting process.
//!
//! One packet is one JSON message; descriptors travel as `SCM_RIGHTS` and
//! arrive close-on-exec. Packets larger than [`MAX_PACKET`] are refused on
//! both ends.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::spec::MAX_PACKET;

/// Most descriptors one packet carries (stdin, stdout, stderr, code).
const MAX_FDS: usize = 4;

/// A connected, close-on-exec `SOCK_SEQPACKET` pair.
pub(crate) fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)
}

/// Sends `message` as one packet, with `fds` attached.
pub(crate) fn send<T: Serialize>(
    socket: BorrowedFd<'_>,
    message: &T,
    fds: &[RawFd],
) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    send_bytes(socket, &bytes, fds)
}

/// Sends raw bytes as one packet, with `fds` attached.
pub(crate) fn send_bytes(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[RawFd],
) -> std::io::Result<()> {
    if bytes.len() > MAX_PACKET {
        return Err(std::io::Error::other(format!(
            "sandbox request of {} bytes is over the {MAX_PACKET}-byte limit",
            bytes.len()
        )));
    }
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

/// One received packet: its bytes and the descriptors that came with it.
pub(crate) struct Packet {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Packet {
    /// Parses the bytes as a JSON message.
    pub(crate) fn decode<T: DeserializeOwned>(&self) -> std::io::Result<T> {
        serde_json::from_slice(&self.bytes).map_err(std::io::Error::other)
    }
}

/// Receives one packet; `Ok(None)` at end of stream (the peer is gone).
/// With `nonblocking`, an empty queue is an error of kind `WouldBlock`.
pub(crate) fn recv(socket: BorrowedFd<'_>, nonblocking: bool) -> std::io::Result<Option<Packet>> {
    thread_local! {
        // One receive buffer per thread: a fresh MAX_PACKET allocation per
        // packet would cost an mmap and page faults every time.
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.len() < MAX_PACKET {
            buffer.resize(MAX_PACKET, 0);
        }
        recv_into(socket, nonblocking, &mut buffer)
    })
}

fn recv_into(
    socket: BorrowedFd<'_>,
    nonblocking: bool,
    buffer: &mut [u8],
) -> std::io::Result<Option<Packet>> {
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
    let flags = if nonblocking {
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT
    } else {
        MsgFlags::MSG_CMSG_CLOEXEC
    };
    loop {
        let mut iov = [IoSliceMut::new(buffer)];
        let message = match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut control), flags) {
            Ok(message) => message,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => return Err(err.into()),
        };
        let mut fds = Vec::new();
        for cmsg in message.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if message
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        {
            return Err(std::io::Error::other("sandbox packet was truncated"));
        }
        let len = message.bytes;
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Packet {
            bytes: buffer[..len].to_vec(),
            fds,
        }));
    }
}
