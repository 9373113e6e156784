//! Sending and receiving on a channel socket, with descriptors (`SCM_RIGHTS`) alongside:
//! used by both ends, the parent's without blocking and the worker's blocking.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

use crate::protocol;

/// Sends `message` (its parts one after another) from byte `skip` on: all of it, unless
/// `flags` has `DONTWAIT` and the socket fills up. `fds` go with the message's first byte,
/// if `skip` is 0. Returns how many bytes were sent; `WouldBlock` if none could be. Never
/// raises SIGPIPE.
pub(crate) fn send_with_fds(
    stream: &UnixStream,
    message: &[&[u8]],
    skip: usize,
    fds: &[OwnedFd],
    flags: SendFlags,
) -> io::Result<usize> {
    let flags = flags | SendFlags::NOSIGNAL;
    let total: usize = message.iter().map(|part| part.len()).sum();
    let mut sent = 0;
    if skip == 0 && !fds.is_empty() && total > 0 {
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        loop {
            match rustix::net::sendmsg(stream, &io_slices(message, 0), &mut control, flags) {
                Ok(n) => {
                    sent = n;
                    break;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => return Err(e.into()),
            }
        }
    }
    while skip + sent < total {
        let result = match message {
            [frame] => rustix::net::send(stream, &frame[skip + sent..], flags),
            _ => rustix::net::sendmsg(
                stream,
                &io_slices(message, skip + sent),
                &mut SendAncillaryBuffer::default(),
                flags,
            ),
        };
        match result {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::AGAIN) if sent > 0 => break,
            Err(rustix::io::Errno::AGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sent)
}

/// The parts of `message` from byte `skip` on, for one `sendmsg`.
fn io_slices<'a>(message: &[&'a [u8]], mut skip: usize) -> Vec<IoSlice<'a>> {
    let mut slices = Vec::with_capacity(message.len());
    for part in message {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        slices.push(IoSlice::new(&part[skip..]));
        skip = 0;
    }
    slices
}

/// Receives into `buf`, appending any descriptors that came along to `fds`.
///
/// Descriptors the kernel had to drop for want of room (`MSG_CTRUNC`: more than one
/// message may carry) are an `InvalidData` error: the data they came with would refer to
/// buffers that are not there.
pub(crate) fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: RecvFlags,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(protocol::fds::MAX))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            flags | RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other?,
        }
    };
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if received.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "descriptors were dropped: more came with one message than the {} it may carry",
                protocol::fds::MAX
            ),
        ));
    }
    Ok(received.bytes)
}
