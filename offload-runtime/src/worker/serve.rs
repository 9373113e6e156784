//! The worker's life after its clean start: check the channel, say hello, then read a
//! call, run it, send the reply, until the parent closes the channel.

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use crate::error::{Payload, ProtocolError};
use crate::gate::Gate;
use crate::protocol::env::WorkerEnv;
use crate::protocol::reader::{FrameReader, KEEP_BUFFER, Next};
use crate::protocol::{self, Attached, FrameBuf, Hello, MAX_FRAME, PROTOCOL_VERSION, PanicReport, Tag};
use crate::registry::Registry;
use crate::socket::{recv_with_fds, send_with_fds};

use super::logs;

/// Checks that descriptor `fd` is what the parent hands a worker before trusting it: an open
/// Unix stream socket whose other end the parent process made.
#[cfg(target_os = "linux")]
fn check_channel(fd: RawFd, parent: u32) -> std::io::Result<()> {
    let refuse = |why: String| {
        std::io::Error::other(format!("descriptor {fd} is not a channel from the parent: {why}"))
    };
    // SAFETY: only asks whether the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(refuse("it is not open".into()));
    }
    // SAFETY: open, as just checked, and nothing closes it while it is borrowed here.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let domain =
        rustix::net::sockopt::socket_domain(borrowed).map_err(|e| refuse(format!("not a socket ({e})")))?;
    let kind =
        rustix::net::sockopt::socket_type(borrowed).map_err(|e| refuse(format!("not a socket ({e})")))?;
    if domain != rustix::net::AddressFamily::UNIX || kind != rustix::net::SocketType::STREAM {
        return Err(refuse(format!("a {domain:?} {kind:?} socket, not a Unix stream socket")));
    }
    let peer =
        rustix::net::sockopt::socket_peercred(borrowed).map_err(|e| refuse(format!("no peer ({e})")))?;
    if peer.pid.as_raw_nonzero().get() as u32 != parent {
        return Err(refuse(format!(
            "its other end belongs to process {}, not {parent}",
            peer.pid.as_raw_nonzero()
        )));
    }
    Ok(())
}

thread_local! {
    /// Location of the last panic, recorded by the hook for the report.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

#[cfg(target_os = "linux")]
pub(super) fn serve(env: WorkerEnv) -> std::io::Result<()> {
    use rustix::io::{FdFlags, fcntl_setfd};

    // The parent may have died between our fork and its death signal being armed.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(env.parent) {
        return Err(std::io::Error::other("the parent process is gone"));
    }
    check_channel(env.fd, env.parent)?;
    MAX_PAYLOAD.store(env.max_payload, Ordering::Relaxed);
    // On one CPU, polling only keeps the caller from sending the call polled for.
    let alone = std::thread::available_parallelism().map_or(true, |n| n.get() == 1);
    SPIN_US.store(if alone { 0 } else { env.spin_us }, Ordering::Relaxed);
    CHANNEL_FD.store(env.fd, Ordering::Relaxed);
    // A process the function forks without exec must not hold the channel: if it did, the
    // worker's death would not close it, and a crash would look like a hang to the parent.
    // SAFETY: registers a handler that only makes an async-signal-safe `close`.
    if unsafe { libc::pthread_atfork(None, None, Some(close_channel_in_child)) } != 0 {
        return Err(std::io::Error::other("could not register the fork handler"));
    }
    // SAFETY: the parent created this descriptor for us and passed its number; nothing
    // else in this fresh process owns it.
    let stream = unsafe { UnixStream::from_raw_fd(env.fd) };
    // Programs the user's function starts must not inherit the channel.
    fcntl_setfd(&stream, FdFlags::CLOEXEC)?;

    // Before the hello: a worker is only given calls once its states are built.
    if let Err(message) = super::state::build_all(&env.pool) {
        // Said before the channel closes: the parent reaps the worker as soon as it does.
        eprintln!("offload worker {}: {message}", std::process::id());
        let _ = std::io::stderr().flush();
        std::process::exit(super::EXIT_SETUP_FAILED);
    }
    logs::install();
    panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| l.to_string());
        if cfg!(panic = "abort") {
            // The process is about to die: leave the message for the crash report.
            eprintln!("{info}");
        }
        PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
    }));

    // Whether large byte vectors can be read from where they are in the parent.
    let parent = crate::lend::Parent::open(env.parent, env.probe);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        secret: env.secret,
        registry: Registry::get().hash(),
        reads_parent: parent.is_some(),
    };
    let mut frame = FrameBuf::new(Tag::Hello);
    protocol::append(frame.body(), &hello, Payload::Message).map_err(std::io::Error::other)?;
    // The gate goes with the hello: every call passes it before it runs (see `crate::gate`).
    let gate = Gate::create()?;
    let hello = frame.finish().map_err(std::io::Error::other)?;
    let mut sent = 0;
    while sent < hello.len() {
        let fds = if sent == 0 { std::slice::from_ref(gate.fd()) } else { &[] };
        sent += send_with_fds(&stream, &[&hello], sent, fds, rustix::net::SendFlags::empty())?;
    }

    let mut inbox = FrameReader::default();
    let mut reply = Vec::new();
    let mut calls = 0;
    // The last call run, and whether its reply is not yet known to be found well formed.
    let mut last_run = 0;
    let mut unchecked = None;
    loop {
        let Some((tag, body, attached)) = next_call(&mut inbox, &stream, parent.as_ref())? else {
            // The parent closed the channel: it is done with us, or gone.
            return Ok(());
        };
        calls += 1;
        // After a reply the caller may yet find wrong (see `crate::gate`), the next call waits
        // until it has not.
        if SENT_BESIDE.swap(false, Ordering::Relaxed) && last_run > 0 {
            unchecked = Some(last_run);
        }
        if let Some(after) = unchecked {
            let spin = std::time::Duration::from_micros(SPIN_US.load(Ordering::Relaxed));
            let closed = || {
                let mut byte = [0u8; 1];
                let peek = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
                matches!(rustix::net::recv(&stream, &mut byte, peek), Ok((0, _)))
            };
            if !gate.await_acceptance(after, calls, spin, &closed) {
                return Ok(());
            }
            if gate.accepted() >= after {
                unchecked = None;
            }
        }
        if !gate.claim(calls).map_err(std::io::Error::other)? {
            // Sent ahead, behind the call before it, and withdrawn by the parent since (or
            // its deadline passed): it never runs, and nobody waits for an answer.
            drop(attached);
            continue;
        }
        let shared = !attached.fds.is_empty();
        reply = answer(tag, inbox.frame(body), attached, reply);
        let reply_fds = REPLY_FDS.with(|f| std::mem::take(&mut *f.borrow_mut()));
        let reply_bulk = REPLY_BULK.with(|b| b.borrow_mut().take());
        last_run = calls;
        if !reply_fds.is_empty() || reply_bulk.is_some() {
            unchecked = Some(calls);
        }
        // A call that came with shared buffers: if this worker holds none of those it was
        // ever sent, the parent may use them again.
        let released: &[u8] = if crate::shm::released() && shared { &RELEASED } else { &[] };
        let writing = lock_writes();
        let sent = match &reply_bulk {
            None => {
                send_with_fds(&stream, &[released, &reply], 0, &reply_fds, rustix::net::SendFlags::empty())
            }
            Some(bytes) => {
                let header = protocol::bulk_header(bytes.len()).map_err(std::io::Error::other)?;
                send_with_fds(
                    &stream,
                    &[released, &header, bytes, &reply],
                    0,
                    &reply_fds,
                    rustix::net::SendFlags::empty(),
                )
            }
        };
        drop(writing);
        match sent {
            Ok(_) => {}
            // The parent closed the channel while we worked (it gave up on the call, or is
            // gone): nothing to report to anyone.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        drop(reply_fds);
        drop(reply_bulk);
        // A large call or reply leaves a buffer of its size behind: let it go rather than keep
        // it resident for the rest of the worker's life.
        inbox.shrink();
        if reply.capacity() > KEEP_BUFFER {
            reply = Vec::new();
        }
        // Unmapping and freeing large shared buffers takes milliseconds: done now, while the
        // parent already has its answer.
        crate::shm::release_deferred();
        super::spare::call_done();
        // What the function printed reaches the terminal now, not at some later call.
        let _ = std::io::stdout().flush();
    }
}

/// Reads the next call or batch frame, and the bulk frames before it: its tag, where its
/// body is in `inbox`, and what came with it. `None` at end of stream. The parent may have
/// sent the next call behind it (see `crate::gate`). Bytes lent by the parent are read
/// from `parent`, if it can be read.
#[cfg(target_os = "linux")]
fn next_call(
    inbox: &mut FrameReader,
    stream: &UnixStream,
    parent: Option<&crate::lend::Parent>,
) -> std::io::Result<Option<(Tag, std::ops::Range<usize>, Attached)>> {
    let mut bulk = Vec::new();
    loop {
        match inbox.next(MAX_FRAME).map_err(std::io::Error::other)? {
            Some(Next::Frame(tag @ (Tag::Call | Tag::Batch), body)) => {
                return Ok(Some((tag, body, Attached { fds: inbox.take_fds(), bulk })));
            }
            Some(Next::Frame(Tag::BulkAt, body)) => {
                let (address, len) =
                    protocol::parse_bulk_at(inbox.frame(body)).map_err(std::io::Error::other)?;
                let Some(parent) = parent else {
                    return Err(std::io::Error::other(
                        "the parent lent bytes to a worker that cannot read them",
                    ));
                };
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&len| len as u64 <= MAX_PAYLOAD.load(Ordering::Relaxed))
                    .ok_or_else(|| {
                        std::io::Error::other(format!("the parent lent {len} bytes, over the limit"))
                    })?;
                let mut bytes = super::spare::vector(len);
                parent.read(address, &mut bytes)?;
                bulk.push(bytes);
            }
            Some(Next::Frame(tag, _)) => {
                return Err(std::io::Error::other(format!("expected a call frame, got {tag:?}")));
            }
            Some(Next::Bulk(len)) => {
                let mut bytes = super::spare::vector(len);
                let mut done = inbox.take_bulk(&mut bytes);
                while done < len {
                    match recv_with_fds(
                        stream,
                        &mut bytes[done..],
                        inbox.fds_mut(),
                        rustix::net::RecvFlags::empty(),
                    )? {
                        0 => return Ok(None),
                        n => done += n,
                    }
                }
                bulk.push(bytes);
            }
            None => {
                let (space, fds) = inbox.space();
                match recv_spinning(stream, space, fds)? {
                    0 => return Ok(None),
                    n => inbox.advance(n),
                }
            }
        }
    }
}

/// A [`Tag::Released`] frame.
const RELEASED: [u8; protocol::HEADER] = [1, 0, 0, 0, Tag::Released as u8];

thread_local! {
    /// Descriptors of the shared buffers in the return value being sent.
    pub(super) static REPLY_FDS: RefCell<Vec<OwnedFd>> = const { RefCell::new(Vec::new()) };
    /// The returned byte vector, when it goes in a bulk frame before the reply.
    pub(super) static REPLY_BULK: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

#[cfg(not(target_os = "linux"))]
pub(super) fn serve(_env: WorkerEnv) -> std::io::Result<()> {
    Err(std::io::Error::other("offload workers are supported on Linux only"))
}

/// Runs one call, or each call of a batch, and builds its reply in `buf`: a frame of
/// forwarded log events if the function emitted any, then the reply frame. `attached` came
/// with the call frame.
fn answer(tag: Tag, body: &[u8], attached: Attached, buf: Vec<u8>) -> Vec<u8> {
    let result = protocol::split_call(body).and_then(|call| {
        Registry::get().lookup(call.name).map(|entry| (entry.invoke, call)).ok_or_else(|| {
            ProtocolError::Invalid(format!("no offloaded function is registered as `{}`", call.name))
        })
    });
    let (invoke, call) = match result {
        Ok(found) => found,
        Err(fault) => return fault_frame(buf, &fault),
    };
    logs::start_call(call.log_level);
    begin_call();
    let reply = match tag {
        // Batch items travel inline: nothing is attached.
        Tag::Batch => super::batch::run(invoke, call.args, buf),
        _ => attached.supplying(|| run(invoke, call.args, buf)),
    };
    match logs::finish_call() {
        None => reply,
        Some(mut log_frame) => {
            log_frame.extend_from_slice(&reply);
            log_frame
        }
    }
}

fn run(invoke: crate::registry::Invoke, args: &[u8], buf: Vec<u8>) -> Vec<u8> {
    let mut frame = FrameBuf::reuse(buf, Tag::Return);
    match invoke_caught(invoke, args, frame.body()) {
        Ran::Returned => match frame.finish() {
            Ok(bytes) => bytes,
            Err(too_large) => fault_frame(Vec::new(), &too_large),
        },
        Ran::Faulted(fault) => fault_frame(frame.into_inner(), &fault),
        Ran::Panicked(report) => {
            let mut frame = FrameBuf::reuse(frame.into_inner(), Tag::Panicked);
            match protocol::append(frame.body(), &report, Payload::Message).and_then(|()| frame.finish()) {
                Ok(bytes) => bytes,
                Err(fault) => fault_frame(Vec::new(), &fault),
            }
        }
    }
}

/// A call (or a batch) begins: no cancellation or progress report of an earlier one counts.
fn begin_call() {
    super::cancel::reset();
    super::progress::reset();
}

/// How the user's function ended.
pub(super) enum Ran {
    /// It returned, and its value was appended.
    Returned,
    /// Its arguments did not decode, or its value did not encode.
    Faulted(ProtocolError),
    Panicked(PanicReport),
}

/// Runs `invoke` on `args`, appending the encoded return value to `out`, and catches a panic.
pub(super) fn invoke_caught(invoke: crate::registry::Invoke, args: &[u8], out: &mut Vec<u8>) -> Ran {
    IN_CALL.store(true, Ordering::Relaxed);
    let ran = panic::catch_unwind(AssertUnwindSafe(|| invoke(args, out)));
    IN_CALL.store(false, Ordering::Relaxed);
    match ran {
        Ok(Ok(())) => Ran::Returned,
        Ok(Err(fault)) => Ran::Faulted(fault),
        Err(payload) => {
            let message = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_owned()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "Box<dyn Any>".to_owned()
            };
            let location = PANIC_LOCATION.with(|slot| slot.borrow_mut().take());
            // Dropping a panic payload can itself panic; don't let that kill the worker.
            let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
            Ran::Panicked(PanicReport { message, location })
        }
    }
}

pub(super) fn fault_frame(buf: Vec<u8>, fault: &ProtocolError) -> Vec<u8> {
    let mut frame = FrameBuf::reuse(buf, Tag::Fault);
    protocol::append(frame.body(), &protocol::Fault::from(fault), Payload::Message)
        .expect("a fault always encodes");
    frame.finish().expect("a fault is small")
}

/// How long to poll for the next bytes before sleeping on the socket (`spin_us`): a worker
/// that has just answered is likely to get its next call within microseconds under load, and
/// waking a sleeping CPU costs tens of them on a VM. Zero: sleep at once.
pub(super) static SPIN_US: AtomicU64 = AtomicU64::new(0);

/// Receives into `buf`: first polling without blocking, yielding the CPU between polls, for
/// up to [`SPIN_US`]; then blocking. It sleeps in `poll` for readability rather than in a
/// blocking `recv`: a task blocked in `recv` on a Unix stream socket is also woken each time
/// the peer reads from its own end (the kernel's wake-up for room to write does not say
/// what it is for), which the caller does once per call; `poll` is woken only for data.
fn recv_spinning(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let spin = SPIN_US.load(Ordering::Relaxed);
    if spin > 0 {
        let until = std::time::Instant::now() + std::time::Duration::from_micros(spin);
        loop {
            match recv_with_fds(stream, buf, fds, rustix::net::RecvFlags::DONTWAIT) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            if std::time::Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        }
    }
    let fd = std::os::fd::AsFd::as_fd(stream);
    let mut readable = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    // While no call comes, the buffer for the next large argument is made ready, a chunk at
    // a time.
    let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    while super::spare::unready() && matches!(rustix::event::poll(&mut readable, Some(&now)), Ok(0)) {
        super::spare::prepare();
    }
    // An error (EINTR from the cancellation signal) falls through to the blocking `recv`.
    let _ = rustix::event::poll(&mut readable, None);
    recv_with_fds(stream, buf, fds, rustix::net::RecvFlags::empty())
}

/// Whether the function is running a call: frames it sends mid-call belong to that call.
static IN_CALL: AtomicBool = AtomicBool::new(false);

pub(super) fn in_call() -> bool {
    IN_CALL.load(Ordering::Relaxed)
}

/// Something was sent on the channel besides the replies since the last call was claimed.
static SENT_BESIDE: AtomicBool = AtomicBool::new(false);

/// One frame at a time on the channel: the reply, or one a thread of the function sends.
static WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock_writes() -> std::sync::MutexGuard<'static, ()> {
    WRITES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes `frame` onto the channel now, in the middle of a call, whole, between other
/// frames; blocks while the channel is full. False if the parent is gone (it hung up, or
/// gave up on the call).
pub(super) fn send_now(frame: &[u8]) -> bool {
    let _writing = lock_writes();
    SENT_BESIDE.store(true, Ordering::Relaxed);
    let fd = CHANNEL_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return false;
    }
    // SAFETY: the worker's channel stays open for the whole life of the process.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut rest = frame;
    while !rest.is_empty() {
        match rustix::io::write(fd, rest) {
            Ok(n) => rest = &rest[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Runs in the child of a `fork` in a worker: that child is not the worker, so it gives up the
/// channel (a reply it might try to send then fails instead of garbling the worker's).
extern "C" fn close_channel_in_child() {
    let fd = CHANNEL_FD.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: `close` is async-signal-safe, and this process no longer uses the channel.
        unsafe { libc::close(fd) };
    }
}

/// The worker's end of its channel, for [`super::write_garbage_to_channel`]; -1 outside a worker.
pub(super) static CHANNEL_FD: AtomicI32 = AtomicI32::new(-1);

/// The pool's `max_payload`, from the worker's environment.
pub(super) static MAX_PAYLOAD: AtomicU64 = AtomicU64::new(crate::settings::DEFAULT_MAX_PAYLOAD);

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write;

    use super::*;

    /// `next_call` on a channel the test writes `frames` to, with what it may read lent
    /// bytes from.
    fn next_call_after(
        frames: &[&[u8]],
        parent: Option<&crate::lend::Parent>,
    ) -> std::io::Result<Option<(Tag, std::ops::Range<usize>, Attached)>> {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        for frame in frames {
            theirs.write_all(frame).unwrap();
        }
        drop(theirs);
        next_call(&mut FrameReader::default(), &ours, parent)
    }

    fn refusal(frames: &[&[u8]], parent: Option<&crate::lend::Parent>) -> String {
        match next_call_after(frames, parent) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("the worker took lent bytes it should have refused"),
        }
    }

    #[test]
    fn lent_bytes_are_read_from_where_they_are_or_refused_clearly() {
        let call = protocol::encode_call("f", 0, &(), None, 0, u64::MAX).unwrap().0;
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let at = protocol::bulk_at_frame(bytes.as_ptr() as u64, bytes.len() as u64);

        // This process stands in for the parent.
        let me = crate::lend::Parent::open(std::process::id(), crate::lend::probe_address()).unwrap();
        let (tag, _, attached) = next_call_after(&[&at, &call], Some(&me)).unwrap().unwrap();
        assert_eq!(tag, Tag::Call);
        assert_eq!(attached.bulk, vec![bytes.clone()]);

        let refused = refusal(&[&at, &call], None);
        assert!(refused.contains("cannot read them"), "{refused}");

        let unmapped = protocol::bulk_at_frame(8, 4096);
        let refused = refusal(&[&unmapped, &call], Some(&me));
        assert!(refused.contains("Bad address"), "{refused}");

        let too_long = protocol::bulk_at_frame(bytes.as_ptr() as u64, u64::MAX);
        let refused = refusal(&[&too_long, &call], Some(&me));
        assert!(refused.contains("over the limit"), "{refused}");
    }
}
