//! The parent's end of one worker's channel: length-prefixed frames over a Unix socket pair
//! whose other end the worker inherited at spawn.
//!
//! The pair has no name in any namespace, so no other process can connect to it; the
//! handshake still checks a per-pool secret and the build's registry hash.
//!
//! The socket is not tied to one Tokio runtime: it is registered with the reactor of the
//! runtime a call comes from, and registered anew when a call comes from another one. Pools
//! therefore outlive the runtime that first used them (every `#[tokio::test]` has its own).
//! Every operation here uses `MSG_DONTWAIT`, so the socket itself stays in blocking mode for
//! the worker's sake.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub(crate) mod shm;

use crate::error::ProtocolError;
use crate::protocol::{self, Attached, HEADER, Tag};

/// Reply buffers above this size are released after the call rather than kept per worker.
pub(crate) const KEEP_BUFFER: usize = 1 << 20;

/// Why a frame could not be exchanged.
#[derive(Debug)]
pub(crate) enum TransportError {
    /// The worker's end is closed: it exited or was killed.
    Closed,
    /// The worker's end was already closed when the call was to be sent: nothing was sent.
    NotSent,
    /// The socket failed otherwise.
    Io(io::Error),
    /// The worker sent something that is not a frame.
    Protocol(ProtocolError),
}

impl From<io::Error> for TransportError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => {
                TransportError::Closed
            }
            _ => TransportError::Io(e),
        }
    }
}

impl From<ProtocolError> for TransportError {
    fn from(e: ProtocolError) -> Self {
        TransportError::Protocol(e)
    }
}

/// The parent's end of a worker's socket, and the buffer replies are read into.
pub(crate) struct Channel {
    /// Declared before `stream` so that it is dropped, and deregistered, first.
    registered: Option<Registered>,
    stream: UnixStream,
    inbox: Inbox,
    /// Longest frame accepted from the worker.
    max_frame: usize,
}

impl Channel {
    pub(crate) fn new(stream: UnixStream, max_frame: usize) -> Channel {
        Channel { registered: None, stream, inbox: Inbox::default(), max_frame }
    }

    /// Waits for one frame without a runtime, for the handshake on the supervisor thread.
    pub(crate) fn recv_blocking(&mut self, patience: Duration) -> Result<(Tag, &[u8]), TransportError> {
        let deadline = Instant::now() + patience;
        loop {
            match self.inbox.next(self.max_frame)? {
                Some(Next::Frame(tag, range)) => {
                    self.stream.set_read_timeout(None)?;
                    return Ok((tag, &self.inbox.buf[range]));
                }
                Some(Next::Bulk(_)) => {
                    return Err(ProtocolError::Invalid("a bulk frame before the handshake".into()).into());
                }
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the worker did not say hello within {patience:?}"),
                )));
            }
            self.stream.set_read_timeout(Some(left))?;
            self.inbox.spare();
            let Inbox { buf, filled, fds, .. } = &mut self.inbox;
            let n = match recv_with_fds(&self.stream, &mut buf[*filled..], fds, RecvFlags::empty()) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.inbox.advance(n)?;
        }
    }

    /// Whether the worker sent something it was not asked for: a protocol violation, found
    /// before an idle worker is given a call. (A worker that died while idle is found by
    /// the failed send instead: see [`TransportError::NotSent`].)
    pub(crate) fn has_unasked_data(&self) -> bool {
        self.inbox.pending()
    }

    /// Sends as much of `message` (its parts one after another) as the socket takes now,
    /// with `fds` on its first byte.
    ///
    /// Most calls fit in the socket buffer: this writes them without waiting for readiness,
    /// which a fresh registration would only learn after a turn of the reactor. A worker
    /// that died while idle is found here: [`TransportError::NotSent`].
    pub(crate) fn start_send(&mut self, message: &[&[u8]], fds: &[OwnedFd]) -> Result<usize, TransportError> {
        if let Some(registered) = &self.registered {
            forget_stale_readable(&registered.fd);
        }
        match send_with_fds(&self.stream, message, 0, fds, SendFlags::DONTWAIT) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => match TransportError::from(e) {
                TransportError::Closed => Err(TransportError::NotSent),
                other => Err(other),
            },
        }
    }

    /// Sends the rest of `message` after [`Channel::start_send`] wrote `sent` bytes of it,
    /// and waits for the reply frame, on the current Tokio runtime. Log frames that come
    /// before the reply go to `on_log`.
    pub(crate) async fn round_trip(
        &mut self,
        message: &[&[u8]],
        fds: &[OwnedFd],
        sent: usize,
        on_log: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Reply<'_>, TransportError> {
        let Channel { registered, stream, inbox, max_frame } = self;
        inbox.shrink();
        inbox.fds.clear();
        let mut written = sent;
        let total: usize = message.iter().map(|part| part.len()).sum();
        let fd = registration(registered, stream)?;
        while written < total {
            let mut ready = fd.writable().await?;
            match ready.try_io(|_| send_with_fds(stream, message, written, fds, SendFlags::DONTWAIT)) {
                Ok(n) => written += n?,
                Err(_would_block) => continue,
            }
        }

        // Everything that comes before the reply, bulk frames included, counts against one
        // budget: a worker cannot grow the caller past its limit by sending many frames.
        let mut bulk = Vec::new();
        let mut budget = *max_frame;
        loop {
            while let Some(next) = inbox.next(budget).map_err(|e| over_budget(e, *max_frame, budget))? {
                let (tag, range) = match next {
                    Next::Frame(tag, range) => (tag, range),
                    Next::Bulk(len) => {
                        budget -= len;
                        bulk.push(read_bulk(fd, stream, inbox, len).await?);
                        continue;
                    }
                };
                if tag == Tag::Log {
                    on_log(&inbox.buf[range]);
                    continue;
                }
                let attached = Attached { fds: std::mem::take(&mut inbox.fds), bulk };
                return Ok(Reply { tag, body: &inbox.buf[range.clone()], range, attached });
            }
            let mut ready = fd.readable().await?;
            inbox.spare();
            let Inbox { buf, filled, fds, .. } = &mut *inbox;
            let n = match ready
                .try_io(|_| recv_with_fds(stream, &mut buf[*filled..], fds, RecvFlags::DONTWAIT))
            {
                Ok(n) => n?,
                Err(_would_block) => continue,
            };
            inbox.advance(n)?;
            inbox.check_fds()?;
        }
    }
}

/// Says what a frame over the reply's remaining `budget` means: the reply as a whole is
/// over the limit, `max_frame`.
fn over_budget(error: ProtocolError, max_frame: usize, budget: usize) -> ProtocolError {
    match error {
        ProtocolError::FrameTooLarge { len, .. } if budget < max_frame => ProtocolError::Invalid(format!(
            "the worker sent at least {} bytes for one reply, over the {max_frame} bytes its pool's \
             `max_payload` allows",
            (max_frame - budget) as u64 + len
        )),
        other => other,
    }
}

/// A reply frame and the descriptors (shared buffers) that came with it.
pub(crate) struct Reply<'c> {
    pub(crate) tag: Tag,
    pub(crate) body: &'c [u8],
    /// Where `body` is in the channel's buffer, for [`Channel::take_reply`].
    pub(crate) range: std::ops::Range<usize>,
    /// The shared buffers' descriptors and the bulk frames (a large byte vector it returns)
    /// that came with the reply.
    pub(crate) attached: Attached,
}

/// Reads the `len` bytes of a bulk frame whose header is next in `inbox`, into a vector of
/// their own: what `inbox` holds of them, then the rest straight from the socket.
async fn read_bulk(
    fd: &AsyncFd<RawFd>,
    stream: &UnixStream,
    inbox: &mut Inbox,
    len: usize,
) -> Result<Vec<u8>, TransportError> {
    let mut bytes = fresh_bytes(len);
    let mut done = inbox.take_bulk(&mut bytes);
    while done < len {
        let mut ready = fd.readable().await?;
        let read =
            ready.try_io(|_| recv_with_fds(stream, &mut bytes[done..], &mut inbox.fds, RecvFlags::DONTWAIT));
        match read {
            Ok(Ok(0)) => return Err(TransportError::Closed),
            Ok(n) => done += n?,
            Err(_would_block) => continue,
        }
        inbox.check_fds()?;
    }
    Ok(bytes)
}

/// Grows a read buffer holding `filled` bytes to `len`. A large one is a fresh allocation
/// with the bytes copied over: it comes from the system untouched (growing in place would
/// first write zeros over all of it) and goes back to it when dropped, where a buffer grown
/// in place can stay in the allocator's heap for the life of the process.
pub(crate) fn grow(buf: &mut Vec<u8>, filled: usize, len: usize) {
    if len <= KEEP_BUFFER {
        buf.resize(len, 0);
        return;
    }
    let mut fresh = fresh_bytes(len);
    fresh[..filled].copy_from_slice(&buf[..filled]);
    *buf = fresh;
}

/// A zeroed vector of `len` bytes to read into: fresh from the system and untouched (the
/// read touches each page once), backed by transparent huge pages where the system allows,
/// which makes filling a large one several times cheaper (32 page faults for 64 MiB instead
/// of 16,384).
pub(crate) fn fresh_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    advise_huge_pages(&mut bytes);
    bytes
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(bytes: &mut [u8]) {
    const HUGE: usize = 2 << 20;
    if bytes.len() < HUGE {
        return;
    }
    let page = rustix::param::page_size();
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    // SAFETY: the range lies within `bytes`, which this function borrows mutably, and the
    // advice does not change its contents. A hint: nothing changes if it is not taken.
    let _ = unsafe {
        rustix::mm::madvise(start as *mut std::ffi::c_void, end - start, rustix::mm::Advice::LinuxHugepage)
    };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: &mut [u8]) {}

/// What comes next in an [`Inbox`].
enum Next {
    /// A whole frame: its tag, and where its body is in the buffer.
    Frame(Tag, std::ops::Range<usize>),
    /// The header of a bulk frame of this many bytes, which are read elsewhere.
    Bulk(usize),
}

impl Channel {
    /// Takes the buffer that holds the reply last handed out (whose body is at the `range`
    /// that [`Reply`] gave), so that it can be decoded elsewhere; the channel keeps any bytes
    /// that followed the reply, and starts a new buffer.
    pub(crate) fn take_reply(&mut self) -> Vec<u8> {
        let inbox = &mut self.inbox;
        let rest = inbox.buf[inbox.consumed..inbox.filled].to_vec();
        let buf = std::mem::take(&mut inbox.buf);
        inbox.filled = rest.len();
        inbox.consumed = 0;
        inbox.buf = rest;
        buf
    }
}

/// Bytes read from the worker: whole frames, one at a time, and whatever follows them.
#[derive(Default)]
struct Inbox {
    buf: Vec<u8>,
    /// Descriptors received since the last reply.
    fds: Vec<OwnedFd>,
    /// Valid bytes in `buf`.
    filled: usize,
    /// Length of the frame last handed out, dropped from the front on the next read.
    consumed: usize,
}

impl Inbox {
    /// The next complete frame in the buffer, or the header of a bulk frame, which
    /// [`Inbox::take_bulk`] then takes.
    fn next(&mut self, max_frame: usize) -> Result<Option<Next>, ProtocolError> {
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        if self.filled < HEADER {
            return Ok(None);
        }
        let header: [u8; HEADER] = self.buf[..HEADER].try_into().expect("header length");
        let (len, tag) = protocol::parse_header(header, max_frame)?;
        if tag == Tag::Bulk {
            return Ok(Some(Next::Bulk(len)));
        }
        let total = HEADER + len;
        if self.filled < total {
            if self.buf.len() < total {
                grow(&mut self.buf, self.filled, total);
            }
            return Ok(None);
        }
        self.consumed = total;
        Ok(Some(Next::Frame(tag, HEADER..total)))
    }

    /// Takes the bulk frame whose header [`Inbox::next`] found: copies what the buffer holds
    /// of its body into the start of `bytes`, and returns how much that was.
    fn take_bulk(&mut self, bytes: &mut [u8]) -> usize {
        let have = (self.filled - HEADER).min(bytes.len());
        bytes[..have].copy_from_slice(&self.buf[HEADER..HEADER + have]);
        self.consumed = HEADER + have;
        have
    }

    /// Makes room for the next read, at `buf[filled..]`.
    fn spare(&mut self) {
        if self.buf.len() < 4096 {
            self.buf.resize(4096, 0);
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), TransportError> {
        if n == 0 {
            return Err(TransportError::Closed);
        }
        self.filled += n;
        Ok(())
    }

    /// Refuses more descriptors than one reply may carry, so that a worker cannot make the
    /// caller hold an unbounded number of them until its reply.
    fn check_fds(&self) -> Result<(), ProtocolError> {
        if self.fds.len() > protocol::fds::MAX {
            return Err(ProtocolError::Invalid(format!(
                "the worker sent {} descriptors with one reply, over the {} one reply may carry",
                self.fds.len(),
                protocol::fds::MAX
            )));
        }
        Ok(())
    }

    /// Whether bytes beyond the last frame handed out are waiting.
    fn pending(&self) -> bool {
        self.filled > self.consumed
    }

    /// Lets go of a large buffer between calls.
    fn shrink(&mut self) {
        if self.buf.len() > KEEP_BUFFER && !self.pending() {
            *self = Inbox::default();
        }
    }
}

/// Clears a readable mark the previous reply left on the socket. The worker sends only what
/// it is asked for, and that reply was read whole, so nothing is left to read: without this,
/// the first read for the next reply would be a wasted system call (`EAGAIN`), made only to
/// learn that. Called before the next call is sent, so that the reply's arrival, which comes
/// after, marks the socket readable again.
fn forget_stale_readable(fd: &AsyncFd<RawFd>) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if let std::task::Poll::Ready(Ok(mut ready)) = fd.poll_read_ready(&mut cx) {
        ready.clear_ready();
    }
}

/// The socket's registration with the current runtime's reactor, made on the first call
/// from that runtime and kept while calls come from it.
fn registration<'c>(
    registered: &'c mut Option<Registered>,
    stream: &UnixStream,
) -> io::Result<&'c AsyncFd<RawFd>> {
    let runtime = tokio::runtime::Handle::current().id();
    if registered.as_ref().is_some_and(|r| r.runtime == runtime) {
        return Ok(&registered.as_ref().expect("checked above").fd);
    }
    // Drop the old registration (deregistering it) before making the new one.
    *registered = None;
    // SAFETY: the descriptor is open and stays the same file for as long as the
    // registration exists: `registered` is declared before `stream`, so it is dropped
    // first, and the stream is never replaced.
    let fd = unsafe {
        AsyncFd::register_with_interest(stream.as_raw_fd(), Interest::READABLE | Interest::WRITABLE)
    }
    .map_err(io::Error::from)?;
    Ok(&registered.insert(Registered { runtime, fd }).fd)
}

/// A socket registered with one runtime's reactor.
struct Registered {
    runtime: tokio::runtime::Id,
    fd: AsyncFd<RawFd>,
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_descriptors_than_one_reply_may_carry_are_refused() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fds = (0..protocol::fds::MAX).map(|_| OwnedFd::from(null.try_clone().unwrap())).collect();
        let mut inbox = Inbox { fds, ..Inbox::default() };
        assert!(inbox.check_fds().is_ok());
        inbox.fds.push(OwnedFd::from(null.try_clone().unwrap()));
        let error = inbox.check_fds().unwrap_err();
        assert!(error.to_string().contains("254 descriptors"), "{error}");
    }

    #[test]
    fn a_reply_over_its_budget_names_the_limit() {
        let error = ProtocolError::FrameTooLarge { len: 600, max: 500 };
        let said = over_budget(error, 1000, 500).to_string();
        assert!(said.contains("at least 1100 bytes") && said.contains("max_payload"), "{said}");
        // The first frame of a reply is measured against the frame limit as ever.
        let first = over_budget(ProtocolError::FrameTooLarge { len: 1200, max: 1000 }, 1000, 1000);
        assert!(matches!(first, ProtocolError::FrameTooLarge { .. }));
    }
}
