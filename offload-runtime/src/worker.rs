//! The child side: detect worker mode before `main`, say hello, serve calls, exit.
//!
//! A worker is the same binary re-executed with [`ENV`] set. A function in `.init_array`
//! sees the variable, serves calls on the inherited socket and exits, so neither the user's
//! `main` nor a test harness ever runs in a worker, and nothing has to be added to `main`.
//! The worker is single-threaded, builds no async runtime, and never starts workers itself.

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Payload, ProtocolError};
use crate::protocol::{
    self, Attached, FrameBuf, HEADER, Hello, MAX_FRAME, PROTOCOL_VERSION, PanicReport, SendBytes, Tag,
};
use crate::registry::Registry;
use crate::transport::{KEEP_BUFFER, recv_with_fds, send_with_fds};

/// Set in a worker's environment by its parent: `version:fd:parent-pid:secret-hex`.
pub(crate) const ENV: &str = "OFFLOAD_WORKER";

/// Exit status of a worker that could not start serving (bad environment, failed hello).
const EXIT_SETUP_FAILED: i32 = 70;

static IS_WORKER: AtomicBool = AtomicBool::new(false);

pub(crate) fn is_worker() -> bool {
    IS_WORKER.load(Ordering::Relaxed)
}

/// The pre-`main` hook. Referenced from [`crate::call`] so the linker keeps the object
/// file that holds it in every binary that can make a call.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
pub(crate) static ENTER_WORKER_MODE: extern "C" fn() = enter_worker_mode;

#[cfg(target_os = "linux")]
extern "C" fn enter_worker_mode() {
    let Some(value) = std::env::var_os(ENV) else {
        return;
    };
    IS_WORKER.store(true, Ordering::Relaxed);
    scrub_environment();
    // SAFETY: this runs before `main`, when the process has a single thread, so nothing
    // reads the environment concurrently. Removing the variable keeps it from programs the
    // user's function may start.
    unsafe { std::env::remove_var(ENV) };
    // A setuid, setgid or file-capabilities program must not take orders from a variable
    // whoever runs it can set.
    // SAFETY: a plain query of the auxiliary vector.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        eprintln!(
            "offload: {ENV} is set, but this program runs with elevated privileges (setuid, setgid \
             or file capabilities: AT_SECURE), and such a program never serves as a worker"
        );
        std::process::exit(EXIT_SETUP_FAILED);
    }
    let code = match value.to_str().and_then(WorkerEnv::parse) {
        Some(env) if start_clean(env.fd).is_err() => {
            eprintln!("offload: this process cannot serve as a worker: {}", std::io::Error::last_os_error());
            EXIT_SETUP_FAILED
        }
        None => {
            eprintln!("offload: malformed {ENV} value; this process cannot serve as a worker");
            EXIT_SETUP_FAILED
        }
        Some(env) => match serve(env) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("offload worker {}: {e}", std::process::id());
                EXIT_SETUP_FAILED
            }
        },
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Overwrites the value of [`ENV`] where the kernel put it, so that the worker's secret does
/// not stay readable in `/proc/<pid>/environ` (which shows the environment as it was at
/// exec, whatever `remove_var` does to the process's own list).
#[cfg(target_os = "linux")]
fn scrub_environment() {
    let name = std::ffi::CString::new(ENV).expect("no NUL in the name");
    // SAFETY: before `main`, single-threaded, so nothing changes the environment meanwhile.
    // `getenv` returns the value in place, NUL-terminated, in writable memory (the initial
    // stack, or the heap if something set it since); writing within its length leaves it a
    // valid C string.
    unsafe {
        let value = libc::getenv(name.as_ptr());
        if !value.is_null() {
            let len = libc::strlen(value);
            std::ptr::write_bytes(value.cast::<u8>(), b'*', len);
        }
    }
}

/// Makes the worker's process what a fresh Rust `main` would find, before any user code runs:
/// - SIGPIPE ignored, as the Rust runtime does before `main` (which a worker never reaches), so
///   writing to a closed pipe is an `EPIPE` error, not a silent death;
/// - no inherited descriptor but 0, 1, 2 and the channel, whatever the parent left without
///   close-on-exec;
/// - one malloc arena (glibc): more would only reserve address space that counts against the
///   memory limit; set here rather than in the environment, so that the function's own
///   subprocesses do not inherit it.
#[cfg(target_os = "linux")]
fn start_clean(channel: RawFd) -> Result<(), ()> {
    // SAFETY: before `main`, single-threaded: changing a signal disposition races nothing.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(());
    }
    let close = |first: RawFd, last: RawFd| {
        // SAFETY: closes descriptors nothing in this fresh process owns yet (Rust's runtime
        // opens none before `main`; the channel is outside the range).
        first > last || unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) } == 0
    };
    // A kernel older than 5.9 has no close_range: the stray descriptors then stay open.
    let _ = close(3, channel - 1) && close((channel + 1).max(3), RawFd::MAX);
    #[cfg(target_env = "gnu")]
    // SAFETY: plain tuning call; single-threaded.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    overflow::install();
    // Exec through `/proc/self/exe` names the process `exe`; name it after its program (the
    // command line, set by the parent, also names the pool).
    if let Some(name) = std::env::current_exe().ok().as_deref().and_then(std::path::Path::file_name) {
        use std::os::unix::ffi::OsStrExt;
        let bytes = name.as_bytes();
        let short = &bytes[..bytes.len().min(15)];
        if let Ok(name) = std::ffi::CString::new(short) {
            let _ = rustix::thread::set_name(&name);
        }
    }
    Ok(())
}

/// Says "stack overflow" when the function overflows the worker's stack, as Rust's runtime
/// does before `main` (which a worker never reaches, so Rust's own handler is not there):
/// a handler for SIGSEGV and SIGBUS, on a stack of its own, that writes Rust's message when
/// the fault is just below the main thread's stack, then aborts. Other faults go on to the
/// default action, as if no handler were there. The function runs on the main thread;
/// threads it starts itself get no such report (their overflow is a plain SIGSEGV).
#[cfg(target_os = "linux")]
mod overflow {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The lowest address of the main thread's stack; faults within [`GAP`] below it, or in
    /// its lowest page, are overflows.
    static STACK_LOW: AtomicUsize = AtomicUsize::new(0);
    /// The kernel keeps this much unmapped below a growing stack (`stack_guard_gap`, 256
    /// pages by default).
    const GAP: usize = 1 << 20;
    const ALT_STACK: usize = 64 << 10;

    pub(super) fn install() {
        // SAFETY: before `main`, single-threaded. The attribute is initialised by
        // `pthread_getattr_np` and destroyed after use; the alternate stack is leaked, so it
        // lives as long as the process; the handler only makes async-signal-safe calls.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
                return;
            }
            let mut low: *mut libc::c_void = std::ptr::null_mut();
            let mut size = 0;
            let got = libc::pthread_attr_getstack(&attr, &mut low, &mut size);
            libc::pthread_attr_destroy(&mut attr);
            if got != 0 || low.is_null() {
                return;
            }
            STACK_LOW.store(low as usize, Ordering::Relaxed);
            let stack = Box::leak(vec![0u8; ALT_STACK].into_boxed_slice());
            let alt = libc::stack_t { ss_sp: stack.as_mut_ptr().cast(), ss_flags: 0, ss_size: ALT_STACK };
            if libc::sigaltstack(&alt, std::ptr::null_mut()) != 0 {
                return;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_fault;
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut());
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }

    extern "C" fn on_fault(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        let low = STACK_LOW.load(Ordering::Relaxed);
        let page = 4096;
        // SAFETY: the kernel passes a valid `siginfo_t` to an `SA_SIGINFO` handler.
        let (code, address) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        // A fault the kernel raised (not a signal some process sent) just below the stack.
        if code > 0 && address < low.saturating_add(page) && address >= low.saturating_sub(GAP) {
            const MESSAGE: &[u8] =
                b"\nthread 'main' has overflowed its stack\nfatal runtime error: stack overflow, aborting\n";
            // SAFETY: `write` and `abort` are async-signal-safe.
            unsafe {
                libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
                libc::abort();
            }
        }
        // Not an overflow: the default action, as if no handler were there. The signal is
        // raised again and, blocked while this handler runs, taken as it returns.
        // SAFETY: `signal` and `raise` are async-signal-safe.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod overflow {
    pub(super) fn install() {}
}

/// What the parent put in [`ENV`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct WorkerEnv {
    pub(crate) fd: RawFd,
    pub(crate) parent: u32,
    pub(crate) secret: [u8; 16],
    /// The pool's `max_payload`: the largest encoded return value.
    pub(crate) max_payload: u64,
}

impl WorkerEnv {
    pub(crate) fn encode(&self) -> String {
        let secret: String = self.secret.iter().map(|b| format!("{b:02x}")).collect();
        format!("{PROTOCOL_VERSION}:{}:{}:{secret}:{}", self.fd, self.parent, self.max_payload)
    }

    pub(crate) fn parse(value: &str) -> Option<WorkerEnv> {
        let mut parts = value.split(':');
        let version: u32 = parts.next()?.parse().ok()?;
        let fd: RawFd = parts.next()?.parse().ok()?;
        let parent: u32 = parts.next()?.parse().ok()?;
        let hex = parts.next()?;
        let max_payload: u64 = parts.next()?.parse().ok()?;
        if version != PROTOCOL_VERSION || parts.next().is_some() || hex.len() != 32 || fd < 0 {
            return None;
        }
        let mut secret = [0u8; 16];
        for (i, byte) in secret.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(WorkerEnv { fd, parent, secret, max_payload })
    }
}

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
fn serve(env: WorkerEnv) -> std::io::Result<()> {
    use rustix::io::{FdFlags, fcntl_setfd};

    // The parent may have died between our fork and its death signal being armed.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(env.parent) {
        return Err(std::io::Error::other("the parent process is gone"));
    }
    check_channel(env.fd, env.parent)?;
    MAX_PAYLOAD.store(env.max_payload, Ordering::Relaxed);
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

    logs::install();
    panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| l.to_string());
        if cfg!(panic = "abort") {
            // The process is about to die: leave the message for the crash report.
            eprintln!("{info}");
        }
        PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
    }));

    let hello = Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
        secret: env.secret,
        registry: Registry::get().hash(),
    };
    let mut frame = FrameBuf::new(Tag::Hello);
    protocol::append(frame.body(), &hello, Payload::Message).map_err(std::io::Error::other)?;
    (&stream).write_all(&frame.finish().map_err(std::io::Error::other)?)?;

    let mut inbox = Inbox::default();
    let mut reply = Vec::new();
    loop {
        let Some(attached) = inbox.next_call(&stream)? else {
            // The parent closed the channel: it is done with us, or gone.
            return Ok(());
        };
        reply = answer(&inbox.buf[HEADER..inbox.frame_len], attached, reply);
        let reply_fds = REPLY_FDS.with(|f| std::mem::take(&mut *f.borrow_mut()));
        let reply_bulk = REPLY_BULK.with(|b| b.borrow_mut().take());
        let sent = match &reply_bulk {
            None => send_with_fds(&stream, &[&reply], 0, &reply_fds, rustix::net::SendFlags::empty()),
            Some(bytes) => {
                let header = protocol::bulk_header(bytes.len()).map_err(std::io::Error::other)?;
                send_with_fds(
                    &stream,
                    &[&header, bytes, &reply],
                    0,
                    &reply_fds,
                    rustix::net::SendFlags::empty(),
                )
            }
        };
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
        drop(std::mem::take(&mut *AFTER_REPLY.lock().unwrap_or_else(PoisonError::into_inner)));
        // What the function printed reaches the terminal now, not at some later call.
        let _ = std::io::stdout().flush();
    }
}

/// The worker's read side: one call frame at a time, with the descriptors and bulk frames
/// that came with it.
#[derive(Default)]
struct Inbox {
    buf: Vec<u8>,
    filled: usize,
    /// Header and body of the frame last returned.
    frame_len: usize,
}

impl Inbox {
    /// Reads the next call frame into `buf[..frame_len]`, and the bulk frames before it;
    /// `None` at end of stream.
    fn next_call(&mut self, stream: &UnixStream) -> std::io::Result<Option<Attached>> {
        // The parent sends one call and waits for its reply: nothing follows a frame.
        self.consume(self.frame_len);
        let mut fds = Vec::new();
        let mut bulk = Vec::new();
        let mut need = HEADER;
        loop {
            if self.filled >= HEADER && need == HEADER {
                let header: [u8; HEADER] = self.buf[..HEADER].try_into().expect("header length");
                let (len, tag) = protocol::parse_header(header, MAX_FRAME).map_err(std::io::Error::other)?;
                match tag {
                    Tag::Call => need = HEADER + len,
                    Tag::Bulk => {
                        match self.read_bulk(stream, len, &mut fds)? {
                            Some(bytes) => bulk.push(bytes),
                            None => return Ok(None),
                        }
                        continue;
                    }
                    _ => return Err(std::io::Error::other(format!("expected a call frame, got {tag:?}"))),
                }
            }
            if self.filled >= need && need > HEADER {
                self.frame_len = need;
                return Ok(Some(Attached { fds, bulk }));
            }
            let want = need.max(64 * 1024);
            if self.buf.len() < want {
                crate::transport::grow(&mut self.buf, self.filled, want);
            }
            let n = recv_with_fds(
                stream,
                &mut self.buf[self.filled..],
                &mut fds,
                rustix::net::RecvFlags::empty(),
            )?;
            if n == 0 {
                return Ok(None);
            }
            self.filled += n;
        }
    }

    /// Lets go of a large buffer once the frame in it is answered and nothing follows it.
    fn shrink(&mut self) {
        if self.buf.len() > KEEP_BUFFER && self.filled == self.frame_len {
            *self = Inbox::default();
        }
    }

    /// Drops the first `n` bytes read.
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
        self.frame_len = 0;
    }

    /// Reads the `len` bytes of a bulk frame whose header is at the start of `buf`, into a
    /// vector of their own: what is already in `buf`, then the rest straight from the
    /// socket. `None` at end of stream.
    fn read_bulk(
        &mut self,
        stream: &UnixStream,
        len: usize,
        fds: &mut Vec<OwnedFd>,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let mut bytes = crate::transport::fresh_bytes(len);
        let have = (self.filled - HEADER).min(len);
        bytes[..have].copy_from_slice(&self.buf[HEADER..HEADER + have]);
        self.consume(HEADER + have);
        let mut done = have;
        while done < len {
            let n = recv_with_fds(stream, &mut bytes[done..], fds, rustix::net::RecvFlags::empty())?;
            if n == 0 {
                return Ok(None);
            }
            done += n;
        }
        Ok(Some(bytes))
    }
}

thread_local! {
    /// Descriptors of the shared buffers in the return value being sent.
    static REPLY_FDS: RefCell<Vec<OwnedFd>> = const { RefCell::new(Vec::new()) };
    /// The returned byte vector, when it goes in a bulk frame before the reply.
    static REPLY_BULK: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

#[cfg(not(target_os = "linux"))]
fn serve(_env: WorkerEnv) -> std::io::Result<()> {
    Err(std::io::Error::other("offload workers are supported on Linux only"))
}

/// Runs one call and builds its reply in `buf`: a frame of forwarded log events if the
/// function emitted any, then the reply frame. `attached` came with the call frame.
fn answer(body: &[u8], attached: Attached, buf: Vec<u8>) -> Vec<u8> {
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
    let reply = attached.supplying(|| run(invoke, call.args, buf));
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
    match panic::catch_unwind(AssertUnwindSafe(|| invoke(args, frame.body()))) {
        Ok(Ok(())) => match frame.finish() {
            Ok(bytes) => bytes,
            Err(too_large) => fault_frame(Vec::new(), &too_large),
        },
        Ok(Err(fault)) => fault_frame(frame.into_inner(), &fault),
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
            let mut frame = FrameBuf::reuse(frame.into_inner(), Tag::Panicked);
            let report = PanicReport { message, location };
            match protocol::append(frame.body(), &report, Payload::Message).and_then(|()| frame.finish()) {
                Ok(bytes) => bytes,
                Err(fault) => fault_frame(Vec::new(), &fault),
            }
        }
    }
}

fn fault_frame(buf: Vec<u8>, fault: &ProtocolError) -> Vec<u8> {
    let mut frame = FrameBuf::reuse(buf, Tag::Fault);
    protocol::append(frame.body(), fault, Payload::Message).expect("a fault always encodes");
    frame.finish().expect("a fault is small")
}

/// Decodes an entry's arguments. Not public API: the macro's worker-side code calls it.
pub fn decode_args<T: DeserializeOwned>(input: &[u8]) -> Result<T, ProtocolError> {
    protocol::decode(input, Payload::Arguments)
}

/// Encodes an entry's return value onto the reply, refusing one over the pool's
/// `max_payload` before allocating for it. Not public API.
pub fn encode_return<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let size = protocol::checked_size(value, Payload::ReturnValue, MAX_PAYLOAD.load(Ordering::Relaxed))?;
    out.reserve(size);
    let (appended, fds) = protocol::fds::collecting(|| protocol::append(out, value, Payload::ReturnValue));
    appended?;
    REPLY_FDS.with(|f| *f.borrow_mut() = fds);
    Ok(())
}

/// Encodes a returned byte vector: in the reply if it is short, else in a bulk frame sent
/// before it, from the vector as it is. Not public API.
pub fn encode_return_bytes(value: Vec<u8>, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let bulk = protocol::bulk::is_bulk(value.len());
    let max = MAX_PAYLOAD.load(Ordering::Relaxed);
    if bulk && value.len() as u64 > max {
        return Err(ProtocolError::PayloadTooLarge {
            what: Payload::ReturnValue,
            len: value.len() as u64,
            max,
        });
    }
    encode_return(&SendBytes(&value), out)?;
    if bulk {
        REPLY_BULK.with(|b| *b.borrow_mut() = Some(value));
    }
    Ok(())
}

/// What the current call let go of that is only dropped once its reply is sent.
static AFTER_REPLY: Mutex<Vec<Box<dyn Send>>> = Mutex::new(Vec::new());

/// Drops `value` once the current call's reply is sent, not before (in a worker).
pub(crate) fn drop_after_reply(value: Box<dyn Send>) {
    AFTER_REPLY.lock().unwrap_or_else(PoisonError::into_inner).push(value);
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

/// The worker's end of its channel, for [`write_garbage_to_channel`]; -1 outside a worker.
static CHANNEL_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Fault injection for tests: writes all of `bytes`, which need not be a frame, onto this worker's
/// channel, as a buggy worker might. The parent then sees a protocol violation, kills the
/// worker and fails the call with `Error::Protocol`. Does nothing outside a worker.
/// Not public API.
pub fn write_garbage_to_channel(bytes: &[u8]) {
    let fd = CHANNEL_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: the worker's channel stays open for the whole life of the process.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut rest = bytes;
        while !rest.is_empty() {
            match rustix::io::write(fd, rest) {
                Ok(n) => rest = &rest[n..],
                Err(rustix::io::Errno::INTR) => {}
                // The parent hung up (it saw the violation): nothing more to do.
                Err(_) => return,
            }
        }
    }
}

/// The pool's `max_payload`, from the worker's environment.
static MAX_PAYLOAD: AtomicU64 = AtomicU64::new(crate::limits::DEFAULT_MAX_PAYLOAD);

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs this test binary in worker mode with `stdin` as its channel (descriptor 0); what it
    /// printed to stderr, after checking that it exited as a worker that could not start.
    #[cfg(target_os = "linux")]
    fn worker_on(stdin: std::process::Stdio) -> String {
        let env = WorkerEnv { fd: 0, parent: std::process::id(), secret: [7; 16], max_payload: 1 << 20 };
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .env(ENV, env.encode())
            .stdin(stdin)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(EXIT_SETUP_FAILED), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_channel_that_is_not_a_socket_from_the_parent_is_refused() {
        let said = worker_on(std::process::Stdio::piped());
        assert!(said.contains("descriptor 0 is not a channel from the parent: not a socket"), "{said}");
        let (datagram, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let said = worker_on(OwnedFd::from(datagram).into());
        assert!(said.contains("not a Unix stream socket"), "{said}");
        let said = worker_on(std::process::Stdio::null());
        assert!(said.contains("not a socket"), "{said}");
    }

    #[test]
    fn env_round_trips() {
        let env = WorkerEnv { fd: 7, parent: 1234, secret: *b"0123456789abcdef", max_payload: 1 << 30 };
        assert_eq!(WorkerEnv::parse(&env.encode()), Some(env));
    }

    #[test]
    fn malformed_env_is_rejected() {
        for bad in ["", "1:2:3", "1:x:3:00", "999:3:4:00112233445566778899aabbccddeeff", "1:3:4:zz"] {
            assert_eq!(WorkerEnv::parse(bad), None, "{bad}");
        }
    }
}

/// Forwarding of the function's `tracing` events to the parent.
///
/// The worker installs a subscriber of its own (the user's `main` never runs here, so no
/// other subscriber is installed). It keeps the events of the running call up to the level
/// the parent's subscribers want, which the call frame carries, and [`finish_call`] turns
/// them into a log frame sent just before the reply. The parent re-emits them inside the
/// call's span, with the call's task id and the worker's pid.
mod logs {
    use std::cell::RefCell;
    use std::fmt::{self, Write as _};
    use std::sync::atomic::{AtomicU8, Ordering};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::Interest;
    use tracing::{Event, Level, Metadata, Subscriber};

    use crate::error::Payload;
    use crate::protocol::{self, FrameBuf, LogRecord, Tag};

    /// At most this many events are kept per call; the rest are counted and dropped.
    const MAX_EVENTS: usize = 1_000;

    /// The running call's level, as [`protocol::level_to_u8`].
    static LEVEL: AtomicU8 = AtomicU8::new(0);

    thread_local! {
        static EVENTS: RefCell<(Vec<LogRecord>, usize)> = const { RefCell::new((Vec::new(), 0)) };
    }

    pub(super) fn install() {
        // Fails only if code that ran before `main` installed one; then that one wins.
        let _ = tracing::subscriber::set_global_default(Forward);
    }

    pub(super) fn start_call(level: u8) {
        LEVEL.store(level, Ordering::Relaxed);
    }

    /// The call's events as a log frame, if there were any.
    pub(super) fn finish_call() -> Option<Vec<u8>> {
        LEVEL.store(0, Ordering::Relaxed);
        let (mut events, dropped) = EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut()));
        if dropped > 0 {
            events.push(LogRecord {
                level: 2,
                target: "offload::worker".into(),
                message: format!("{dropped} more events of this call were dropped"),
                fields: String::new(),
            });
        }
        if events.is_empty() {
            return None;
        }
        let mut frame = FrameBuf::new(Tag::Log);
        protocol::append(frame.body(), &events, Payload::Message).ok()?;
        frame.finish().ok()
    }

    fn level_u8(level: &Level) -> u8 {
        match *level {
            Level::ERROR => 1,
            Level::WARN => 2,
            Level::INFO => 3,
            Level::DEBUG => 4,
            _ => 5,
        }
    }

    struct Forward;

    impl Subscriber for Forward {
        fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
            // The level changes from call to call: ask `enabled` each time.
            Interest::sometimes()
        }

        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.is_event() && level_u8(metadata.level()) <= LEVEL.load(Ordering::Relaxed)
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &Event<'_>) {
            let metadata = event.metadata();
            let mut visitor = Fields::default();
            event.record(&mut visitor);
            EVENTS.with(|events| {
                let (events, dropped) = &mut *events.borrow_mut();
                if events.len() >= MAX_EVENTS {
                    *dropped += 1;
                    return;
                }
                events.push(LogRecord {
                    level: level_u8(metadata.level()),
                    target: metadata.target().to_owned(),
                    message: visitor.message,
                    fields: visitor.fields,
                });
            });
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }

    #[derive(Default)]
    struct Fields {
        message: String,
        fields: String,
    }

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.message, "{value:?}");
            } else {
                if !self.fields.is_empty() {
                    self.fields.push(' ');
                }
                let _ = write!(self.fields, "{}={value:?}", field.name());
            }
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.message.push_str(value);
            } else {
                self.record_debug(field, &value);
            }
        }
    }
}
