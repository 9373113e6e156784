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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::error::ProtocolError;
use crate::protocol::reader::{FrameReader, Next, fresh_bytes};
use crate::protocol::{Attached, Tag};
use crate::socket::{recv_with_fds, send_with_fds};

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
    inbox: FrameReader,
    /// Longest frame accepted from the worker.
    max_frame: usize,
    /// The whole call is written and its reply not yet read: the worker is running it.
    awaiting_reply: bool,
    /// Part of a frame was read, and the rest not: the stream cannot be picked up again.
    mid_frame: bool,
    /// Replies on the way to calls that ended without them (their worker had gone on to a
    /// call sent ahead, see `pool::pipe`): set aside before the next reply.
    stale: usize,
}

impl Channel {
    pub(crate) fn new(stream: UnixStream, max_frame: usize) -> Channel {
        Channel {
            registered: None,
            stream,
            inbox: FrameReader::default(),
            max_frame,
            awaiting_reply: false,
            mid_frame: false,
            stale: 0,
        }
    }

    /// Waits for one frame without a runtime, for the handshake on the supervisor thread.
    pub(crate) fn recv_blocking(&mut self, patience: Duration) -> Result<(Tag, &[u8]), TransportError> {
        let deadline = Instant::now() + patience;
        loop {
            match self.inbox.next(self.max_frame)? {
                Some(Next::Frame(tag, range)) => {
                    self.stream.set_read_timeout(None)?;
                    return Ok((tag, self.inbox.frame(range)));
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
            let (space, fds) = self.inbox.space();
            let n = match recv_with_fds(&self.stream, space, fds, RecvFlags::empty()) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.inbox.advance(n);
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

    /// Sends the rest of `message` after [`Channel::start_send`] wrote `sent` bytes of it:
    /// then the worker has the whole call.
    pub(crate) async fn finish_send(
        &mut self,
        message: &[&[u8]],
        fds: &[OwnedFd],
        sent: usize,
    ) -> Result<(), TransportError> {
        let total: usize = message.iter().map(|part| part.len()).sum();
        if sent < total {
            write_rest(&self.stream, message, fds, sent).await?;
        }
        self.awaiting_reply = true;
        Ok(())
    }

    /// Waits for the reply frame of the call the worker has, on the current Tokio runtime.
    /// Log, progress and item frames that come before the reply go to `on_frame`, which says
    /// whether to read on.
    pub(crate) async fn read_reply(
        &mut self,
        on_frame: &mut (dyn FnMut(Tag, &[u8]) -> Pace + Send),
    ) -> Result<Reply<'_>, TransportError> {
        let Channel { registered, stream, inbox, max_frame, awaiting_reply, mid_frame, stale } = self;
        inbox.shrink();
        drop(inbox.take_fds());
        let fd = registration(registered, stream)?;

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
                        // Mid-body, the stream cannot be picked up again by another read.
                        *awaiting_reply = false;
                        *mid_frame = true;
                        bulk.push(read_bulk(fd, stream, inbox, len).await?);
                        *mid_frame = false;
                        *awaiting_reply = true;
                        continue;
                    }
                };
                let terminal = !matches!(tag, Tag::Log | Tag::Progress | Tag::Item | Tag::Released);
                if *stale > 0 {
                    // A call that ended without its reply: nothing of it reaches anyone.
                    if terminal {
                        *stale -= 1;
                        bulk.clear();
                        budget = *max_frame;
                        drop(inbox.take_fds());
                    }
                    continue;
                }
                if !terminal {
                    if let Pace::Yield = on_frame(tag, inbox.frame(range)) {
                        // Whoever awaits the reply has enough for now: it polls again when it
                        // wants more, and until then nothing more is read, so the worker's
                        // writes block once the socket's buffer is full.
                        tokio::task::yield_now().await;
                    }
                    continue;
                }
                let attached = Attached { fds: inbox.take_fds(), bulk };
                *awaiting_reply = false;
                return Ok(Reply { tag, body: inbox.frame(range.clone()), range, attached, pid: None });
            }
            let mut ready = fd.readable().await?;
            let (space, fds) = inbox.space();
            let n = match ready.try_io(|_| recv_with_fds(stream, space, fds, RecvFlags::DONTWAIT)) {
                Ok(Ok(0)) => return Err(TransportError::Closed),
                Ok(n) => n?,
                Err(_would_block) => continue,
            };
            inbox.advance(n);
            inbox.check_fds()?;
        }
    }
}

impl Channel {
    /// The descriptors that came with the frame last received (the handshake's).
    pub(crate) fn take_fds(&mut self) -> Vec<OwnedFd> {
        self.inbox.take_fds()
    }

    /// Whether the whole call was written and its reply is still to come: the worker has the
    /// call, and a reply, if it comes, can be read and set aside.
    pub(crate) fn awaiting_reply(&self) -> bool {
        self.awaiting_reply
    }

    /// Whether what comes next on the channel starts a frame: no read stopped in the middle
    /// of one.
    pub(crate) fn at_frame_start(&self) -> bool {
        !self.mid_frame
    }

    /// The call whose reply comes next ended without it: the reply is set aside when it comes,
    /// before the next call's.
    pub(crate) fn skip_reply(&mut self) {
        self.stale += 1;
    }

    /// Takes the buffer that holds the reply last handed out (whose body is at the `range`
    /// that [`Reply`] gave), so that it can be decoded elsewhere; the channel keeps any bytes
    /// that followed the reply, and starts a new buffer.
    pub(crate) fn take_reply(&mut self) -> Vec<u8> {
        self.inbox.take_buffer()
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

/// What [`Channel::read_reply`] does after a frame that comes before the reply.
pub(crate) enum Pace {
    /// Reads on.
    Continue,
    /// Lets the task that awaits the reply run before reading on.
    Yield,
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
    /// The worker that answered, where the place learns it only from the answer (a remote
    /// host's).
    pub(crate) pid: Option<u32>,
}

/// Reads the `len` bytes of a bulk frame whose header is next in `inbox`, into a vector of
/// their own: what `inbox` holds of them, then the rest straight from the socket.
async fn read_bulk(
    fd: &AsyncFd<RawFd>,
    stream: &UnixStream,
    inbox: &mut FrameReader,
    len: usize,
) -> Result<Vec<u8>, TransportError> {
    let mut bytes = fresh_bytes(len);
    let mut done = inbox.take_bulk(&mut bytes);
    while done < len {
        let mut ready = fd.readable().await?;
        let read =
            ready.try_io(|_| recv_with_fds(stream, &mut bytes[done..], inbox.fds_mut(), RecvFlags::DONTWAIT));
        match read {
            Ok(Ok(0)) => return Err(TransportError::Closed),
            Ok(n) => done += n?,
            Err(_would_block) => continue,
        }
        inbox.check_fds()?;
    }
    Ok(bytes)
}

/// Writes `message` from byte `written` on, waiting for room in the socket's buffer.
///
/// The socket's registration asks only for readability: every read the worker makes frees
/// room in this end's buffer, and a registration for writability would wake the runtime for
/// each of them, a wasted wake-up per call (it cost a quarter of a round trip on one CPU).
/// A message that does not fit at once (a large one) waits for room on a registration of
/// its own, of a duplicate of the descriptor, made for this write only.
async fn write_rest(
    stream: &UnixStream,
    message: &[&[u8]],
    fds: &[OwnedFd],
    mut written: usize,
) -> Result<(), TransportError> {
    let total: usize = message.iter().map(|part| part.len()).sum();
    let dup = stream.try_clone()?;
    // SAFETY: `dup` is an open descriptor owned by the registration, closed only when it is
    // dropped.
    let room =
        unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }.map_err(io::Error::from)?;
    while written < total {
        let mut ready = room.writable().await?;
        match ready.try_io(|room| send_with_fds(room.get_ref(), message, written, fds, SendFlags::DONTWAIT)) {
            Ok(n) => written += n?,
            Err(_would_block) => continue,
        }
    }
    Ok(())
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
    let fd = unsafe { AsyncFd::register_with_interest(stream.as_raw_fd(), Interest::READABLE) }
        .map_err(io::Error::from)?;
    Ok(&registered.insert(Registered { runtime, fd }).fd)
}

/// A socket registered with one runtime's reactor.
struct Registered {
    runtime: tokio::runtime::Id,
    fd: AsyncFd<RawFd>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message many times the socket's buffer waits for room on its own registration, and
    /// its reply is then read on the registration for readability.
    #[test]
    fn a_message_larger_than_the_socket_buffer_is_written_whole() {
        use std::io::{Read, Write};
        const LEN: usize = 16 << 20;
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut got = vec![0u8; LEN];
            theirs.read_exact(&mut got).unwrap();
            let mut reply = crate::protocol::FrameBuf::new(Tag::Return);
            reply.body().extend_from_slice(b"done");
            theirs.write_all(&reply.finish().unwrap()).unwrap();
            got.iter().map(|&b| u64::from(b)).sum::<u64>()
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let message = vec![1u8; LEN];
        rt.block_on(async {
            let mut channel = Channel::new(ours, 1 << 20);
            let sent = channel.start_send(&[&message], &[]).unwrap();
            assert!(
                sent < LEN,
                "the socket took {sent} bytes at once: the test needs a message that does not fit"
            );
            let exchange = async {
                channel.finish_send(&[&message], &[], sent).await?;
                channel.read_reply(&mut |_, _| Pace::Continue).await
            };
            let reply = tokio::time::timeout(Duration::from_secs(20), exchange)
                .await
                .expect("the rest is written and the reply read")
                .unwrap();
            assert_eq!((reply.tag, reply.body), (Tag::Return, &b"done"[..]));
        });
        assert_eq!(peer.join().unwrap(), LEN as u64);
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
