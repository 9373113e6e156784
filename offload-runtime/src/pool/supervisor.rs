//! Starting and ending worker processes.
//!
//! Two long-lived threads per process, started on first use:
//! - the *spawner* forks every worker. Linux delivers a child's parent-death signal when the
//!   *thread* that forked it exits, so forking from one thread that never exits makes
//!   `PR_SET_PDEATHSIG` mean "when this process dies". It also runs the handshake.
//! - the *reaper* waits for every worker that ends, so none is left a zombie, and reports
//!   how it ended with the last lines of its stderr.
//!
//! Neither touches process-wide signal dispositions, so the user's own `Command`s and
//! `wait`s behave as usual.

use std::io;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::pipe::Pipe;
use crate::error::{ExitReason, Payload};
use crate::gate::Gate;
use crate::lend::Lent;
use crate::protocol::env::{ENV, WorkerEnv};
use crate::protocol::{self, FRAME_SLACK, Hello, PROTOCOL_VERSION, Tag};
use crate::registry::Registry;
use crate::stats::RestartCause;
use crate::stderr_tail::StderrTail;
use crate::transport::{Channel, TransportError};

/// How long a new worker has to say hello. Generous: a loaded machine starts slowly.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker whose channel closed gets to finish exiting before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a dead worker's stderr to drain into the crash report.
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// A running worker process and the parent's end of its channel.
pub(crate) struct Worker {
    pub(crate) pid: u32,
    /// `None` once the worker is ended: closed before the reaper waits, so that no
    /// descriptor of a reaped worker is left open.
    channel: Option<Channel>,
    /// Calls this worker has completed.
    pub(crate) calls: u64,
    /// `None` once handed to the reaper.
    child: Option<Child>,
    stderr: Arc<StderrTail>,
    /// Its gate and second handle, for calls sent ahead; set by the handshake.
    pipe: Option<Arc<Pipe>>,
    /// If it reads this process's memory (said in its handshake): what it may still be
    /// reading of the large byte vectors lent to it (see [`crate::lend`]), kept until it is
    /// reaped.
    lent: Option<Arc<Lent>>,
}

/// How a worker is to be ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// SIGKILL now: it timed out, was abandoned, or misbehaved.
    Kill,
    /// Its channel closed: it is exiting on its own; wait for it, then kill if it lingers.
    Exited,
    /// It is done (recycled, or the pool stops): closing its channel makes it exit; wait for
    /// it, then kill if it lingers.
    Retire,
}

/// Why a worker is ended, for the log line of its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// It is replaced, for this reason.
    Restart(RestartCause),
    /// Its pool stops.
    Shutdown,
    /// Nobody ended it explicitly: the call or pool that held it went away.
    Dropped,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Restart(cause) => cause.as_str(),
            Cause::Shutdown => "shutdown",
            Cause::Dropped => "dropped",
        }
    }
}

/// How a worker ended, for the caller's error.
#[derive(Debug, Clone)]
pub(crate) struct ExitInfo {
    pub(crate) reason: ExitReason,
    pub(crate) stderr: Vec<String>,
    /// The worker reported a failed allocation before it ended.
    pub(crate) alloc_failed: bool,
}

impl ExitInfo {
    /// Whether the worker died because an allocation failed: Rust's allocation error
    /// handler reports the failure, then aborts.
    pub(crate) fn ran_out_of_memory(&self) -> bool {
        self.alloc_failed && self.reason == ExitReason::Signal(6)
    }
}

impl Worker {
    pub(crate) fn channel(&mut self) -> &mut Channel {
        self.channel.as_mut().expect("open until the worker is ended")
    }

    /// Its side for calls sent ahead.
    pub(crate) fn pipe(&self) -> &Arc<Pipe> {
        self.pipe.as_ref().expect("set by the handshake")
    }

    /// Where the large byte vectors lent to it are kept, if it reads this process's memory.
    pub(crate) fn lends(&self) -> Option<&Arc<Lent>> {
        self.lent.as_ref()
    }

    /// Whether the worker is unusable: its channel is gone, or it sent unasked data.
    pub(crate) fn is_broken(&self) -> bool {
        self.channel.as_ref().is_none_or(Channel::has_unasked_data)
    }

    /// Its resident memory now, from `/proc/<pid>/statm`.
    pub(crate) fn resident_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid)).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * rustix::param::page_size() as u64)
    }

    /// Hands the worker to the reaper, which logs its exit with `cause`; the receiver says
    /// how it ended.
    pub(crate) fn end(mut self, how: Ending, cause: Cause) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        self.channel = None;
        if let Some(child) = self.child.take() {
            let (stderr, lent) = (Arc::clone(&self.stderr), self.lent.take());
            supervisor().reap(Reap { child, how, cause, stderr, lent, reply: Some(tx) });
        }
        rx
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker nobody ended explicitly was abandoned mid-call (or its pool went away):
        // its state is unknown, so kill it.
        self.channel = None;
        if let Some(child) = self.child.take() {
            let (stderr, lent) = (Arc::clone(&self.stderr), self.lent.take());
            supervisor().reap(Reap {
                child,
                how: Ending::Kill,
                cause: Cause::Dropped,
                stderr,
                lent,
                reply: None,
            });
        }
    }
}

/// What a worker is started with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    /// The pool's name, shown in the worker's command line.
    pub(crate) pool: &'static str,
    /// The pool's key in the registry, for the worker's states.
    pub(crate) key: &'static str,
    /// Address-space limit, in bytes.
    pub(crate) memory: Option<u64>,
    /// Largest encoded arguments or return value.
    pub(crate) max_payload: u64,
    /// How long an idle worker polls for its next call before it sleeps, in µs.
    pub(crate) spin_us: u64,
}

/// Starts a worker on the spawner thread. The receiver yields it after a good handshake.
pub(crate) fn spawn(config: WorkerConfig) -> oneshot::Receiver<io::Result<Worker>> {
    let (tx, rx) = oneshot::channel();
    if crate::role::is_worker() {
        // The last line of the fork-bomb guard: a worker never starts workers.
        let _ = tx.send(Err(io::Error::other("an offload worker cannot start workers of its own")));
        return rx;
    }
    LIVE.send_modify(|n| *n += 1);
    supervisor().spawn(SpawnJob { config, reply: tx });
    rx
}

/// Workers asked for and not yet reaped (or failed to start): zero means no process left.
static LIVE: LazyLock<watch::Sender<usize>> = LazyLock::new(|| watch::Sender::new(0));
/// The pids of every worker forked and not yet waited for. A pid leaves, under this lock,
/// before its process is waited for, so while the lock is held every pid here names this
/// process's own child, never a reused pid.
static UNREAPED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn unreaped() -> std::sync::MutexGuard<'static, Vec<u32>> {
    UNREAPED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes `pid` off [`UNREAPED`]: it is about to be waited for.
fn forget(pid: u32) {
    unreaped().retain(|&p| p != pid);
}

/// Kills every worker not yet reaped, wherever it is held: shutdown's last resort for workers
/// that no pool or reaper holds (a call future that is never polled again holds one). How
/// many there were.
pub(crate) fn kill_unreaped() -> usize {
    let pids = unreaped();
    for &pid in pids.iter() {
        kill(pid);
    }
    pids.len()
}
static STOPPED: AtomicBool = AtomicBool::new(false);

/// From now on the spawner starts nothing.
pub(crate) fn stop_spawning() {
    STOPPED.store(true, Ordering::Release);
}

/// Resolves when every worker ever started has been reaped.
pub(crate) async fn all_reaped() {
    let _ = LIVE.subscribe().wait_for(|n| *n == 0).await;
}

/// Sends SIGKILL to a worker the caller knows is not yet reaped and to its process group (it
/// leads one: see `start_worker`); the worker itself too, should it have failed before
/// `setpgid`.
pub(crate) fn kill(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Tells a worker the caller knows is not yet reaped that its call is cancelled: SIGURG,
/// which the worker's handler turns into `offload::cancelled()`.
pub(crate) fn signal_cancel(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::URG);
    }
}

struct SpawnJob {
    config: WorkerConfig,
    reply: oneshot::Sender<io::Result<Worker>>,
}

struct Reap {
    child: Child,
    how: Ending,
    /// Why it ends, for the log.
    cause: Cause,
    stderr: Arc<StderrTail>,
    /// What the worker may have been reading: let go once it is reaped.
    lent: Option<Arc<Lent>>,
    reply: Option<oneshot::Sender<ExitInfo>>,
}

/// Reaps one worker, logs how it ended and tells whoever waits.
fn finish(job: Reap) {
    let pid = job.child.id();
    let info = reap(job.child, job.how, &job.stderr);
    let cause = match job.cause {
        Cause::Restart(RestartCause::Crashed) if info.ran_out_of_memory() => {
            Cause::Restart(RestartCause::MemoryLimit)
        }
        cause => cause,
    };
    tracing::info!(target: "offload::supervisor", pid, exit = %info.reason, cause = cause.as_str(), "offload worker exited");
    LIVE.send_modify(|n| *n -= 1);
    if let Some(reply) = job.reply {
        let _ = reply.send(info);
    }
    drop(job.lent);
}

fn take(job: &Mutex<Option<Reap>>) -> Option<Reap> {
    job.lock().unwrap_or_else(|e| e.into_inner()).take()
}

struct Supervisor {
    spawner: Mutex<mpsc::Sender<SpawnJob>>,
    reaper: Mutex<mpsc::Sender<Reap>>,
}

fn supervisor() -> &'static Supervisor {
    static SUPERVISOR: LazyLock<Supervisor> = LazyLock::new(Supervisor::start);
    &SUPERVISOR
}

impl Supervisor {
    fn start() -> Supervisor {
        let (spawn_tx, spawn_rx) = mpsc::channel::<SpawnJob>();
        let (reap_tx, reap_rx) = mpsc::channel::<Reap>();
        // If a thread cannot be started the jobs stay queued and their callers time out;
        // there is nothing better to do without threads.
        let _ = std::thread::Builder::new().name("offload-spawner".into()).spawn(move || {
            for job in spawn_rx {
                let result = if STOPPED.load(Ordering::Acquire) {
                    Err(io::Error::other("offload is shutting down"))
                } else {
                    start_worker(job.config)
                };
                if result.is_err() {
                    LIVE.send_modify(|n| *n -= 1);
                }
                // A caller that gave up drops the receiver; the worker is then dropped here,
                // which kills and reaps it.
                let _ = job.reply.send(result);
            }
        });
        let _ = std::thread::Builder::new().name("offload-reaper".into()).spawn(move || {
            for job in reap_rx {
                if job.how == Ending::Kill {
                    // Quick: the group is gone at once, so the wait and the stderr drain are.
                    finish(job);
                } else {
                    // May take up to `EXIT_GRACE`: not in the way of the kills queued behind.
                    let job = Arc::new(Mutex::new(Some(job)));
                    let theirs = Arc::clone(&job);
                    let spawned = std::thread::Builder::new().name("offload-reap".into()).spawn(move || {
                        if let Some(job) = take(&theirs) {
                            finish(job);
                        }
                    });
                    if spawned.is_err()
                        && let Some(job) = take(&job)
                    {
                        // No thread to be had: reap it here, late rather than never.
                        finish(job);
                    }
                }
            }
        });
        Supervisor { spawner: Mutex::new(spawn_tx), reaper: Mutex::new(reap_tx) }
    }

    fn spawn(&self, job: SpawnJob) {
        let _ = self.spawner.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    }

    fn reap(&self, job: Reap) {
        let _ = self.reaper.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    }
}

#[cfg(target_os = "linux")]
fn start_worker(config: WorkerConfig) -> io::Result<Worker> {
    let WorkerConfig { pool, key, memory, max_payload, spin_us } = config;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    use rustix::io::{FdFlags, fcntl_setfd};
    use rustix::process::{
        Resource, Rlimit, Signal, getppid, set_parent_process_death_signal, setpgid, setrlimit,
    };

    let secret = random_secret()?;
    let (ours, theirs) = UnixStream::pair()?;
    let parent = std::process::id();
    let fd = theirs.as_raw_fd();
    let probe = crate::lend::probe_address();
    let env = WorkerEnv { fd, parent, secret, max_payload, spin_us, probe, pool: key.to_owned() };

    // The running image, even if the file on disk has been replaced since.
    let mut command = Command::new("/proc/self/exe");
    command.env(ENV, env.encode()).stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::piped());
    // What `ps` shows, as PostgreSQL names its helpers: `service: offload worker <pool>`.
    let program = std::env::args_os().next().unwrap_or_else(|| "offload".into());
    let mut arg0 = program;
    arg0.push(format!(": offload worker {pool}"));
    command.arg0(arg0);
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            // A process group of its own: Ctrl-C in a terminal signals the parent's group,
            // and the parent, not the terminal, decides what happens to its workers.
            setpgid(None, None)?;
            // The parent may have died before the signal was armed: then nobody would kill us.
            // (An error built from an errno: nothing between fork and exec may allocate.)
            if getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            // Only the worker's end crosses exec.
            fcntl_setfd(rustix::fd::BorrowedFd::borrow_raw(fd), FdFlags::empty())?;
            if let Some(limit) = memory {
                setrlimit(Resource::As, Rlimit { current: Some(limit), maximum: Some(limit) })?;
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    drop(theirs);
    let pid = child.id();
    unreaped().push(pid);
    let stderr = match child.stderr.take().map(|s| StderrTail::capture(pid, s)) {
        Some(Ok(tail)) => tail,
        Some(Err(e)) => {
            forget(pid);
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        None => Arc::new(StderrTail::default()),
    };
    let writer = ours.try_clone();
    let channel = Channel::new(ours, max_payload as usize + FRAME_SLACK);
    let mut worker =
        Worker { pid, channel: Some(channel), calls: 0, child: Some(child), stderr, pipe: None, lent: None };
    let shaken = handshake(worker.channel(), secret, pid).and_then(|reads_parent| {
        worker.lent = reads_parent.then(Arc::default);
        let gate = worker.channel().take_fds().into_iter().next().ok_or("sent no gate with its handshake")?;
        let gate = Gate::open(gate)?;
        let writer = writer.map_err(|e| format!("its socket could not be duplicated: {e}"))?;
        worker.pipe = Some(Arc::new(Pipe::new(gate, writer)));
        Ok(())
    });
    match shaken {
        Ok(()) => {
            tracing::info!(target: "offload::supervisor", pid, "offload worker started");
            Ok(worker)
        }
        Err(message) => {
            // Say how it ended: a worker that failed its hello usually printed why.
            let info = reap(worker.child.take().expect("not yet reaped"), Ending::Kill, &worker.stderr);
            let tail = info.stderr.join("\n  ");
            Err(io::Error::other(format!(
                "worker {pid} {message} ({}){}",
                info.reason,
                if tail.is_empty() { String::new() } else { format!("; its stderr:\n  {tail}") }
            )))
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn start_worker(_config: WorkerConfig) -> io::Result<Worker> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "offload workers are supported on Linux only"))
}

/// A fresh secret for one worker, which it presents in its handshake, from the kernel's
/// randomness. Without that randomness no worker starts: a guessable secret would be worse
/// than a failed spawn.
fn random_secret() -> io::Result<[u8; 16]> {
    let mut secret = [0u8; 16];
    let mut filled = 0;
    while filled < secret.len() {
        match rustix::rand::getrandom(&mut secret[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(io::Error::other(format!(
                    "no randomness for the worker's secret (getrandom: {e})"
                )));
            }
        }
    }
    Ok(secret)
}

/// Checks the worker's hello; whether the worker reads this process's memory.
fn handshake(channel: &mut Channel, secret: [u8; 16], pid: u32) -> Result<bool, String> {
    let (tag, body) = match channel.recv_blocking(HANDSHAKE_TIMEOUT) {
        Ok(frame) => frame,
        Err(TransportError::Closed | TransportError::NotSent) => {
            return Err("exited before its handshake".into());
        }
        Err(TransportError::Io(e)) => return Err(format!("failed its handshake: {e}")),
        Err(TransportError::Protocol(e)) => return Err(format!("failed its handshake: {e}")),
    };
    if tag != Tag::Hello {
        return Err(format!("sent {tag:?} instead of its handshake"));
    }
    let hello: Hello =
        protocol::decode(body, Payload::Message).map_err(|e| format!("sent a bad handshake: {e}"))?;
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "speaks protocol version {} but this process speaks {PROTOCOL_VERSION}",
            hello.version
        ));
    }
    if hello.secret != secret {
        return Err("did not present its pool's secret".into());
    }
    if hello.registry != Registry::get().hash() {
        return Err("was built from different code (its registry of offloaded functions differs)".into());
    }
    if hello.pid != pid {
        return Err(format!("claims to be process {}", hello.pid));
    }
    Ok(hello.reads_parent)
}

/// Waits for `child` to end, killing it first or after a grace period as `how` says.
///
/// Whatever `how` says, the worker's process group is killed before the worker is reaped:
/// a subprocess the function started (and did not move to a group of its own) ends with
/// the worker instead of living on as an orphan. Killing before reaping means the group's
/// id cannot yet belong to anybody else: the unreaped worker still holds it.
fn reap(mut child: Child, how: Ending, stderr: &StderrTail) -> ExitInfo {
    forget(child.id());
    if how != Ending::Kill {
        // It is exiting (or was asked to): give it a moment to do so cleanly.
        let _ = exits_within(&child, EXIT_GRACE);
    }
    kill(child.id());
    let reason = match child.wait() {
        Ok(status) => exit_reason(status),
        Err(_) => ExitReason::Unknown,
    };
    let (stderr, alloc_failed) = stderr.at_end(STDERR_GRACE);
    ExitInfo { reason, stderr, alloc_failed }
}

fn exit_reason(status: std::process::ExitStatus) -> ExitReason {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitReason::Code(code),
        (None, Some(signal)) => ExitReason::Signal(signal),
        (None, None) => ExitReason::Unknown,
    }
}

/// Whether `child` exits within `patience`, watched through a pidfd without reaping it.
#[cfg(target_os = "linux")]
fn exits_within(child: &Child, patience: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    use rustix::process::{Pid, PidfdFlags, pidfd_open};

    let Some(pid) = Pid::from_raw(child.id() as i32) else {
        return false;
    };
    let Ok(pidfd) = pidfd_open(pid, PidfdFlags::empty()) else {
        return false;
    };
    let timeout = Timespec { tv_sec: patience.as_secs() as _, tv_nsec: patience.subsec_nanos() as _ };
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

#[cfg(not(target_os = "linux"))]
fn exits_within(_child: &Child, _patience: Duration) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::Write;

    use super::*;

    #[test]
    fn every_worker_gets_its_own_secret() {
        let secrets: HashSet<[u8; 16]> = (0..64).map(|_| random_secret().unwrap()).collect();
        assert_eq!(secrets.len(), 64);
        assert!(!secrets.contains(&[0; 16]));
    }
    use crate::protocol::FrameBuf;

    fn hello_from_peer(hello: &Hello) -> Channel {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut frame = FrameBuf::new(Tag::Hello);
        protocol::append(frame.body(), hello, Payload::Message).unwrap();
        theirs.write_all(&frame.finish().unwrap()).unwrap();
        Channel::new(ours, 1 << 20)
    }

    fn good() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            pid: 42,
            secret: [7; 16],
            registry: Registry::get().hash(),
            reads_parent: true,
        }
    }

    #[test]
    fn handshake_accepts_the_right_worker() {
        assert_eq!(handshake(&mut hello_from_peer(&good()), [7; 16], 42), Ok(true));
        let cannot = Hello { reads_parent: false, ..good() };
        assert_eq!(handshake(&mut hello_from_peer(&cannot), [7; 16], 42), Ok(false));
    }

    #[test]
    fn handshake_rejects_mismatches_with_a_clear_message() {
        let cases = [
            (Hello { secret: [8; 16], ..good() }, "secret"),
            (Hello { registry: good().registry ^ 1, ..good() }, "built from different code"),
            (Hello { version: PROTOCOL_VERSION + 1, ..good() }, "protocol version"),
            (Hello { pid: 43, ..good() }, "claims to be process 43"),
        ];
        for (hello, expected) in cases {
            let err = handshake(&mut hello_from_peer(&hello), [7; 16], 42).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn handshake_rejects_garbage_and_silence() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"\x04\x00\x00\x00\x01xyz").unwrap();
        assert!(
            handshake(&mut Channel::new(ours, 1 << 20), [7; 16], 42).unwrap_err().contains("bad handshake")
        );

        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        assert!(handshake(&mut Channel::new(ours, 1 << 20), [7; 16], 42).unwrap_err().contains("exited"));
    }
}
