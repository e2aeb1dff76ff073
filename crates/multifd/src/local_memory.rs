//! Local migration: guest memory handed over as file descriptors instead of pages.
//!
//! When source and destination run on the same host (a VMM upgrade, a restart into a new
//! binary), copying the guest's memory is wasted work: the destination can map the very
//! memory the source uses. A source whose RAM blocks are file-backed (a memfd, a file on
//! hugetlbfs or tmpfs, see [`crate::RamBlock::map_file`]) negotiates the local-memory
//! extension and, right after its announcement, sends one byte on the Unix control
//! connection carrying a descriptor per block in `SCM_RIGHTS`. The destination checks
//! each descriptor's size against the announced block and maps it shared; no page moves
//! over the channels, only device state does. The source must not run the guest once the
//! destination confirmed completion: both map the same pages.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::transport::Stream;

/// Most blocks a local migration hands over: one `sendmsg` carries at most 253
/// descriptors (Linux's `SCM_MAX_FD`); VMs have a handful of RAM blocks.
pub(crate) const MAX_LOCAL_BLOCKS: usize = 253;

/// The byte that carries the descriptors (a message with ancillary data needs one).
const CARRIER: u8 = b'M';

/// Sends `files` over the Unix connection `stream`, in order.
pub(crate) fn send(stream: &Stream, files: &[BorrowedFd<'_>]) -> io::Result<()> {
    let Stream::Unix(socket) = stream else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "local memory needs a Unix socket",
        ));
    };
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(files.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(files)) {
        return Err(io::Error::other(
            "too many memory descriptors for one message",
        ));
    }
    let sent = sendmsg(
        socket,
        &[IoSlice::new(&[CARRIER])],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent == 1 {
        Ok(())
    } else {
        Err(io::ErrorKind::WriteZero.into())
    }
}

/// Receives the descriptors of `count` blocks by `deadline`.
pub(crate) fn receive(stream: &Stream, count: usize, deadline: Instant) -> io::Result<Vec<File>> {
    let Stream::Unix(socket) = stream else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "local memory needs a Unix socket",
        ));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    socket.set_read_timeout(Some(left))?;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_LOCAL_BLOCKS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let received = recvmsg(
        socket.as_fd(),
        &mut [IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|error| match io::Error::from(error) {
        error if error.kind() == io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
        error => error,
    })?;
    if received.bytes == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut files: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(descriptors) = message {
            files.extend(descriptors);
        }
    }
    if byte[0] != CARRIER || received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the memory descriptors did not arrive whole",
        ));
    }
    if files.len() != count {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} memory descriptors for {count} blocks", files.len()),
        ));
    }
    Ok(files.into_iter().map(File::from).collect())
}
