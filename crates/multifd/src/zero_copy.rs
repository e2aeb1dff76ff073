//! Zero-copy sends of guest pages (`MSG_ZEROCOPY`).
//!
//! A plain `sendmsg` copies every page into the kernel's socket buffers. With
//! `MSG_ZEROCOPY` the kernel pins the pages and the network card reads them from guest
//! memory; the call returns before they have gone, and the kernel reports later, on the
//! socket's error queue, which calls it has finished with (each call is numbered, from 0,
//! and a notification covers a range of numbers). Until then the pages are still being
//! read: a page the guest writes meanwhile may go out with the new contents, which a live
//! migration tolerates only because the write also marks the page dirty for the next
//! round. So a channel waits for every notification before it sends its round's SYNC:
//! nothing of a round is in flight once the round is declared ended, and nothing of the
//! final round (the guest stopped) is in flight when the source declares completion.
//!
//! Only the pages go zero-copy; packet headers are this thread's reused buffers and are
//! copied as usual. Where the kernel cannot avoid the copy (loopback, a device without
//! scatter-gather), it copies and says so in the notification; [`ZeroCopy`] counts those
//! sends. Compression, TLS and the CRC32C trailer all need the bytes in this process's
//! buffers, so zero-copy is refused with them (checked in the source's configuration).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use crate::transport::{advance, Stream, IOV_MAX};

/// `SO_ZEROCOPY` (Linux `asm-generic/socket.h`): lets a socket take `MSG_ZEROCOPY`.
const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` (Linux `linux/errqueue.h`): a completion notification.
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED` (same header): the kernel copied the data after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// One channel's zero-copy sends: how many were made and how many the kernel finished.
#[derive(Debug, Default)]
pub(crate) struct ZeroCopy {
    /// `sendmsg` calls made with `MSG_ZEROCOPY` that sent something.
    issued: u64,
    /// Calls the kernel reported finished.
    completed: u64,
    /// Of those, calls the kernel copied anyway.
    copied: u64,
}

impl ZeroCopy {
    /// Lets `stream` take `MSG_ZEROCOPY` sends; fails on a socket that cannot (a Unix
    /// socket).
    pub(crate) fn enable(stream: &Stream) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a valid c_int for the duration of the call, with its size.
        let result = unsafe {
            libc::setsockopt(
                stream.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ZEROCOPY,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Calls the kernel finished so far, and how many of those it copied.
    pub(crate) fn finished(&self) -> (u64, u64) {
        (self.completed, self.copied)
    }

    /// Sends every byte the iovecs describe with `MSG_ZEROCOPY`, resuming after partial
    /// sends; when the kernel has no room to pin more pages (`ENOBUFS`) it first waits
    /// for notifications. Returns once the calls are made, not once the pages have gone.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped and readable until
    /// [`ZeroCopy::wait_all`] has returned.
    pub(crate) unsafe fn send(
        &mut self,
        stream: &Stream,
        iovecs: &mut [libc::iovec],
        deadline: Instant,
    ) -> io::Result<()> {
        let fd = stream.as_fd().as_raw_fd();
        let mut remaining = iovecs;
        while !remaining.is_empty() {
            // SAFETY: an all-zero msghdr is valid (no address, no control data).
            let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
            message.msg_iov = remaining.as_mut_ptr();
            message.msg_iovlen = remaining.len().min(IOV_MAX) as _;
            // SAFETY: the iovecs point to memory the caller keeps mapped until the
            // notifications arrive (contract above); MSG_NOSIGNAL turns a vanished peer
            // into EPIPE instead of SIGPIPE.
            let sent =
                unsafe { libc::sendmsg(fd, &message, libc::MSG_ZEROCOPY | libc::MSG_NOSIGNAL) };
            if sent < 0 {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) if self.completed < self.issued => {
                        self.reap(stream, deadline)?;
                        continue;
                    }
                    _ => return Err(error),
                }
            }
            if sent == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.issued += 1;
            remaining = advance(remaining, sent as usize);
        }
        Ok(())
    }

    /// Waits until the kernel has finished every send made so far, or `deadline`.
    pub(crate) fn wait_all(&mut self, stream: &Stream, deadline: Instant) -> io::Result<()> {
        while self.completed < self.issued {
            self.reap(stream, deadline)?;
        }
        Ok(())
    }

    /// Waits for at least one notification (or `deadline`) and takes every one queued.
    fn reap(&mut self, stream: &Stream, deadline: Instant) -> io::Result<()> {
        let fd = stream.as_fd().as_raw_fd();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the kernel did not finish zero-copy sends within the idle timeout",
            ));
        }
        // The error queue signals POLLERR, which poll reports whatever `events` asks.
        let mut poll = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        let millis = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, alive across the call.
        if unsafe { libc::poll(&mut poll, 1, millis) } < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(error)
            };
        }
        while self.take_notification(fd)? {}
        Ok(())
    }

    /// Reads one message from the error queue; `false` when it is empty.
    fn take_notification(&mut self, fd: libc::c_int) -> io::Result<bool> {
        // Room for one control message holding a `sock_extended_err` (and the offender
        // address the kernel may append), aligned for `cmsghdr`.
        let mut control = [0u64; 16];
        // SAFETY: an all-zero msghdr is valid; no data iovecs, only control space.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `message` points at `control`, which outlives the call.
        let read =
            unsafe { libc::recvmsg(fd, &mut message, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if read < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::WouldBlock => Ok(false),
                io::ErrorKind::Interrupted => Ok(true),
                _ => Err(error),
            };
        }
        // SAFETY: `message` was filled by recvmsg; the CMSG macros walk within its control
        // buffer.
        let mut header = unsafe { libc::CMSG_FIRSTHDR(&message) };
        while !header.is_null() {
            // SAFETY: `header` is a control message inside the buffer (CMSG_FIRSTHDR/NXTHDR).
            let (level, kind) = unsafe { ((*header).cmsg_level, (*header).cmsg_type) };
            let recverr = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
                || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
            if recverr {
                // SAFETY: an IP(V6)_RECVERR message carries a sock_extended_err, possibly
                // unaligned within the buffer: read it unaligned.
                let error: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(header).cast()) };
                if error.ee_origin == SO_EE_ORIGIN_ZEROCOPY && error.ee_errno == 0 {
                    // Calls ee_info..=ee_data are finished.
                    let calls = u64::from(error.ee_data.wrapping_sub(error.ee_info)) + 1;
                    self.completed += calls;
                    if error.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        self.copied += calls;
                    }
                } else if error.ee_errno != 0 {
                    return Err(io::Error::from_raw_os_error(error.ee_errno as i32));
                }
            }
            // SAFETY: as above, within the buffer recvmsg filled.
            header = unsafe { libc::CMSG_NXTHDR(&message, header) };
        }
        Ok(true)
    }
}
