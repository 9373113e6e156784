//! Large byte vectors lent to a worker: instead of writing a call's large byte-vector
//! arguments through the socket (a copy into the kernel, and another out of it), the caller
//! sends where they are ([`Tag::BulkAt`](crate::protocol::Tag::BulkAt)), and the worker reads
//! them straight out of the caller's memory into the vector it hands the function
//! (`process_vm_readv`): one copy, made by the worker.
//!
//! A worker does so only where the system lets it read its parent, which it finds out once,
//! when it starts: it reads a known value at an address the parent gave it ([`PROBE`]), and
//! says in its hello whether it could. Where it cannot (Yama's `ptrace_scope` of 1 or more, a
//! caller made non-dumpable, a security module that says no), byte vectors go through the
//! socket as before. Nothing is made readable that was not already: offload asks for no
//! permission.
//!
//! The bytes must stay where they are, unchanged, while the worker may read them. The call
//! keeps its arguments until the reply, which the worker sends only after it has read them
//! all. A call that ends without its reply (a timeout, its future dropped) hands its
//! arguments to its worker's [`Lent`] instead of dropping them: they are dropped when the
//! worker answers a call (it has read all it was lent before), or after it is reaped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What a worker reads at the address its parent gives it, to find out whether it can read
/// its parent's memory.
pub(crate) static PROBE: [u8; 16] = *b"offload: lent ok";

/// The address of [`PROBE`] in this process.
pub(crate) fn probe_address() -> u64 {
    std::ptr::addr_of!(PROBE) as u64
}

/// A call's message, in the forms it can take.
#[derive(Clone, Copy)]
pub(crate) struct Message<'a> {
    /// With every byte in it: what a worker that cannot read this process gets, and a host
    /// elsewhere.
    pub(crate) whole: &'a [&'a [u8]],
    /// With its large byte vectors left where they are, and what keeps them there.
    pub(crate) lent: Option<(&'a [&'a [u8]], &'a Lending)>,
    /// For a call with shared buffers made in this process: set when the worker that answers
    /// says it holds none ([`Tag::Released`](crate::protocol::Tag)).
    pub(crate) released: Option<&'a AtomicBool>,
}

impl<'a> Message<'a> {
    /// A message with nothing to lend.
    pub(crate) fn whole(parts: &'a [&'a [u8]]) -> Message<'a> {
        Message { whole: parts, lent: None, released: None }
    }

    /// The form to send to a worker: lent if it reads this process (`to` is then where the
    /// call's arguments go if the call ends before the worker answers), else whole; and
    /// whether it is lent.
    pub(crate) fn for_worker(&self, to: Option<&Arc<Lent>>) -> (&'a [&'a [u8]], bool) {
        match (self.lent, to) {
            (Some((parts, lending)), Some(to)) => {
                lending.lent_to(to);
                (parts, true)
            }
            _ => (self.whole, false),
        }
    }

    /// An attempt at the call begins: what an earlier worker said of its shared buffers
    /// does not hold for the next.
    pub(crate) fn attempt(&self) {
        if let Some(released) = self.released {
            released.store(false, Ordering::Release);
        }
    }

    /// The worker that answers holds none of the shared buffers it was sent.
    pub(crate) fn release(&self) {
        if let Some(released) = self.released {
            released.store(true, Ordering::Release);
        }
    }

    /// The worker answered: it has read whatever it was lent.
    pub(crate) fn answered(&self) {
        if let Some((_, lending)) = self.lent {
            lending.returned();
        }
    }
}

/// Which worker, if any, may be reading a call's arguments now.
#[derive(Default)]
pub(crate) struct Lending(Mutex<Option<Arc<Lent>>>);

impl Lending {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Lent>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lent_to(&self, worker: &Arc<Lent>) {
        *self.slot() = Some(Arc::clone(worker));
    }

    fn returned(&self) {
        *self.slot() = None;
    }

    /// The call ends: its arguments, `args`, back if no worker may be reading them; else
    /// they go to that worker's [`Lent`], and `None` comes back.
    pub(crate) fn settle<A: Send + 'static>(&self, args: A) -> Option<A> {
        match self.slot().take() {
            None => Some(args),
            Some(worker) => {
                worker.keep(Box::new(args));
                None
            }
        }
    }
}

/// What a worker may still be reading: the arguments of calls that ended before it
/// answered. One per worker, shared with its reaper.
#[derive(Default)]
pub(crate) struct Lent {
    kept: Mutex<Vec<Box<dyn Send>>>,
    /// `kept` is not empty: read without the lock, once per call.
    holds: AtomicBool,
}

impl Lent {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn Send>>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, args: Box<dyn Send>) {
        self.kept().push(args);
        self.holds.store(true, Ordering::Release);
    }

    /// Whether it holds anything to [`Lent::release`].
    pub(crate) fn holds(&self) -> bool {
        self.holds.load(Ordering::Acquire)
    }

    /// The worker has answered a call, so it has read all it was lent for the calls before:
    /// that may go. Dropped off the runtime, if there is one: freeing large vectors takes
    /// milliseconds.
    pub(crate) fn release(&self) {
        let mut kept = self.kept();
        if kept.is_empty() {
            return;
        }
        let kept = std::mem::take(&mut *kept);
        self.holds.store(false, Ordering::Release);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(kept))),
            Err(_) => drop(kept),
        }
    }
}

/// A worker's view of its parent's memory.
#[cfg(target_os = "linux")]
pub(crate) struct Parent {
    pid: libc::pid_t,
    /// Readable once the parent has exited: checked after each read, so that bytes read
    /// from a process that took the parent's pid are never used.
    pidfd: std::os::fd::OwnedFd,
}

#[cfg(target_os = "linux")]
impl Parent {
    /// The parent `pid`, if this process can read its memory: it reads [`PROBE`] at
    /// `probe`, where the parent said it is.
    pub(crate) fn open(pid: u32, probe: u64) -> Option<Parent> {
        let raw = rustix::process::Pid::from_raw(pid as i32)?;
        let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
        let parent = Parent { pid: pid as libc::pid_t, pidfd };
        let mut seen = [0u8; 16];
        parent.read(probe, &mut seen).ok()?;
        (seen == PROBE).then_some(parent)
    }

    /// Fills `into` from the parent's memory at `address`. A large read is split between
    /// this thread and a helper where there are CPUs for both: the copy is bound by how fast
    /// one CPU moves memory, and the caller waits for it.
    pub(crate) fn read(&self, address: u64, into: &mut [u8]) -> std::io::Result<()> {
        /// Reads at least this long are split.
        const SPLIT: usize = 16 << 20;
        let parallel = std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
        if into.len() < SPLIT || !parallel {
            self.read_part(address, into)?;
        } else {
            let half = into.len() / 2;
            let second_at = address.checked_add(half as u64).ok_or_else(bad_address)?;
            let (first, second) = into.split_at_mut(half);
            let helped = std::thread::scope(|scope| -> std::io::Result<bool> {
                // Its stack holds a system call's frame only.
                let helper = std::thread::Builder::new()
                    .name("offload-read".into())
                    .stack_size(64 << 10)
                    .spawn_scoped(scope, move || self.read_part(second_at, second));
                self.read_part(address, first)?;
                match helper {
                    Ok(helper) => {
                        helper.join().unwrap_or_else(|_| Err(std::io::Error::other("a read panicked")))?;
                        Ok(true)
                    }
                    Err(_) => Ok(false),
                }
            })?;
            if !helped {
                // No thread to be had: the second half here too.
                self.read_part(second_at, &mut into[half..])?;
            }
        }
        if self.is_gone() {
            return Err(std::io::Error::other("the parent process is gone"));
        }
        Ok(())
    }

    fn read_part(&self, address: u64, into: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < into.len() {
            let local =
                libc::iovec { iov_base: into[done..].as_mut_ptr().cast(), iov_len: into.len() - done };
            let remote = libc::iovec {
                iov_base: address.checked_add(done as u64).ok_or_else(bad_address)? as usize as *mut _,
                iov_len: into.len() - done,
            };
            // SAFETY: `local` is the unfilled part of `into`, which this function borrows
            // mutably; the kernel checks `remote`, which is in another process.
            let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(bad_address()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn is_gone(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, poll};
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        !matches!(poll(&mut fds, Some(&zero)), Ok(0))
    }
}

#[cfg(target_os = "linux")]
fn bad_address() -> std::io::Error {
    std::io::Error::other("the parent lent bytes at an address it cannot read")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_ended_before_the_answer_leaves_its_arguments_with_the_worker() {
        let lent = Arc::new(Lent::default());
        let lending = Lending::default();
        let parts: &[&[u8]] = &[b"lent"];
        let whole: &[&[u8]] = &[b"whole"];
        let message = Message { whole, lent: Some((parts, &lending)), released: None };
        assert_eq!(message.for_worker(None), (whole, false), "a worker that cannot read gets it whole");
        assert_eq!(lending.settle(1u8), Some(1), "nothing lent yet");
        assert_eq!(message.for_worker(Some(&lent)), (parts, true));
        let args = Arc::new(());
        assert_eq!(lending.settle(Arc::clone(&args)), None, "kept for the worker");
        assert!(Arc::strong_count(&args) == 2 && lent.holds());
        lent.release();
        assert!(!lent.holds());
        assert_eq!(Arc::strong_count(&args), 1, "let go once the worker answered later calls");

        assert_eq!(message.for_worker(Some(&lent)).0, parts);
        message.answered();
        assert_eq!(lending.settle(2u8), Some(2), "the worker answered: back to the call");
        assert_eq!(Message::whole(whole).for_worker(Some(&lent)), (whole, false), "nothing to lend");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_reads_what_it_is_lent_and_refuses_bad_addresses() {
        // This process stands in for its own parent: the same checks apply.
        let me = Parent::open(std::process::id(), probe_address()).expect("a process may read itself");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut into = vec![0u8; bytes.len()];
        me.read(bytes.as_ptr() as u64, &mut into).unwrap();
        assert_eq!(into, bytes);
        assert!(me.read(8, &mut into[..16]).is_err(), "address 8 is never mapped");
        assert!(me.read(u64::MAX - 4, &mut into[..16]).is_err());
        assert!(Parent::open(std::process::id(), probe_address() + 1).is_none(), "the wrong bytes");
    }
}
