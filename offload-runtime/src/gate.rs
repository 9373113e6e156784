//! The gate a worker passes each call through before it runs it, shared with its caller: one
//! word in a sealed page of shared memory, so that a call sent ahead (pipelined behind the
//! one the worker is running, see `pool::pipe`) can be withdrawn exactly, before it starts or
//! never.
//!
//! Both sides count the call frames on the worker's channel: the n-th frame is call `n`. The
//! word holds the number of the last call decided and how: `n << 1` when the worker claimed
//! it (it runs), `n << 1 | 1` when the caller withdrew it (the worker reads its frame and
//! drops it, answering nothing). The worker claims call `n`, and the caller withdraws it, by
//! a compare-and-swap from "`n - 1` decided": exactly one of them wins.
//!
//! The worker claims call `n` only once the caller has *accepted* the reply to call `n - 1`
//! (read it whole and found it well formed; a second word says up to which call). So
//! whatever goes wrong with a call before its reply is accepted (it times out, its worker
//! crashes or writes garbage on the channel, its caller drops it), the call behind it has
//! not started and can be withdrawn. The worker waits for the acceptance by polling the word
//! for its `spin_us` (yielding the CPU between polls), then on a futex the caller wakes.
//!
//! The worker makes the page and sends its descriptor with its hello; the caller checks that
//! it is sealed against shrinking before it maps it, so the worker cannot turn the caller's
//! reads into a SIGBUS. A worker that lies about its gate harms only its own calls.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The page's size: four words are used.
const LEN: usize = 4096;

const WITHDRAWN: u64 = 1;

/// The words in the page, at these offsets: the last call decided (`u64`), the last reply
/// accepted (`u64`), a futex the caller bumps to wake the worker (`u32`), and whether the
/// worker sleeps on it (`u32`).
const DECIDED: usize = 0;
const ACCEPTED: usize = 8;
const SIGNAL: usize = 16;
const SLEEPING: usize = 20;

/// How long a worker sleeps on the futex before it looks whether its channel closed.
const NAP: std::time::Duration = std::time::Duration::from_millis(100);

/// One side's mapping of a worker's gate.
pub(crate) struct Gate {
    /// Raw: the words are shared with another process and touched only through atomics.
    map: memmap2::MmapRaw,
    fd: OwnedFd,
}

impl Gate {
    /// Makes a new gate, before any call: the worker's side.
    #[cfg(target_os = "linux")]
    pub(crate) fn create() -> std::io::Result<Gate> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create("offload-gate", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, LEN as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        Gate::map(fd)
    }

    /// Maps the gate a worker sent with its hello: the caller's side.
    #[cfg(target_os = "linux")]
    pub(crate) fn open(fd: OwnedFd) -> Result<Gate, String> {
        use rustix::fs::SealFlags;
        let seals =
            rustix::fs::fcntl_get_seals(&fd).map_err(|e| format!("its gate is not a memory file ({e})"))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::SEAL) {
            return Err("its gate is not sealed against shrinking".into());
        }
        let size = rustix::fs::fstat(&fd).map_err(|e| format!("its gate: {e}"))?.st_size;
        if size < LEN as i64 {
            return Err(format!("its gate is {size} bytes, not {LEN}"));
        }
        Gate::map(fd).map_err(|e| format!("its gate could not be mapped: {e}"))
    }

    #[cfg(target_os = "linux")]
    fn map(fd: OwnedFd) -> std::io::Result<Gate> {
        // A memory file sealed against shrinking: the mapping stays backed for as long as it
        // exists, whatever the other side does. Only atomics touch its bytes.
        let map = memmap2::MmapOptions::new().len(LEN).map_raw(&fd)?;
        Ok(Gate { map, fd })
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn create() -> std::io::Result<Gate> {
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "offload's workers need Linux"))
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn open(_: OwnedFd) -> Result<Gate, String> {
        Err("offload's workers need Linux".into())
    }

    /// The descriptor, to send to the caller.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn word(&self) -> &AtomicU64 {
        self.u64_at(DECIDED)
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned and `LEN` bytes long, the offset is a multiple
        // of 8 within it, and the mapping lives as long as `self`; the other process accesses
        // these words only atomically as well.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as for `u64_at`, at a multiple of 4.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// The caller's side: the reply to call `n` was read whole and is well formed; the
    /// worker may start the call behind it.
    pub(crate) fn accept(&self, n: u64) {
        self.u64_at(ACCEPTED).store(n, Ordering::SeqCst);
        self.wake();
    }

    /// Wakes the worker if it sleeps waiting for an acceptance or a withdrawal.
    fn wake(&self) {
        if self.u32_at(SLEEPING).load(Ordering::SeqCst) != 0 {
            let signal = self.u32_at(SIGNAL);
            signal.fetch_add(1, Ordering::SeqCst);
            let _ = rustix::thread::futex::wake(signal, rustix::thread::futex::Flags::empty(), 1);
        }
    }

    /// Whether call `n` may be decided: the reply before it was accepted; or the call before
    /// it was withdrawn (never answered), and the reply before that accepted; or it was
    /// withdrawn itself.
    fn may_decide(&self, n: u64) -> bool {
        let accepted = self.u64_at(ACCEPTED).load(Ordering::SeqCst);
        let decided = self.word().load(Ordering::SeqCst);
        accepted >= n - 1
            || decided == n << 1 | WITHDRAWN
            || (decided == (n - 1) << 1 | WITHDRAWN && accepted + 2 >= n)
    }

    /// The worker's side: waits until call `n` may be decided, polling for `spin` and then
    /// sleeping; `closed` says whether the channel closed meanwhile (then `false`).
    fn wait_to_decide(&self, n: u64, spin: std::time::Duration, closed: &dyn Fn() -> bool) -> bool {
        let until = std::time::Instant::now() + spin;
        while !self.may_decide(n) {
            if std::time::Instant::now() < until {
                // Polling, but not at the expense of the caller if it shares this CPU.
                std::thread::yield_now();
                continue;
            }
            let signal = self.u32_at(SIGNAL);
            let seen = signal.load(Ordering::SeqCst);
            self.u32_at(SLEEPING).store(1, Ordering::SeqCst);
            if !self.may_decide(n) {
                let nap = rustix::thread::futex::Timespec { tv_sec: 0, tv_nsec: NAP.as_nanos() as i64 };
                let _ = rustix::thread::futex::wait(
                    signal,
                    rustix::thread::futex::Flags::empty(),
                    seen,
                    Some(&nap),
                );
            }
            self.u32_at(SLEEPING).store(0, Ordering::SeqCst);
            if closed() {
                return false;
            }
        }
        true
    }

    /// The worker's side: claims call `n` before running it, once the reply before it is
    /// accepted (see [`Gate::wait_to_decide`]). `Ok(true)`: run it; `Ok(false)`: the caller
    /// withdrew it, or the channel closed; `Err`: the word is out of step with the calls
    /// (the caller broke the protocol).
    pub(crate) fn claim(
        &self,
        n: u64,
        spin: std::time::Duration,
        closed: &dyn Fn() -> bool,
    ) -> Result<bool, String> {
        if !self.wait_to_decide(n, spin, closed) {
            return Ok(false);
        }
        let word = self.word();
        let mut current = word.load(Ordering::Acquire);
        loop {
            if current == n << 1 | WITHDRAWN {
                return Ok(false);
            }
            if current >> 1 != n - 1 {
                return Err(format!("the gate says call {} where call {n} comes", current >> 1));
            }
            match word.compare_exchange(current, n << 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(true),
                Err(now) => current = now,
            }
        }
    }

    /// The caller's side: withdraws call `n` unless the worker claimed it.
    pub(crate) fn withdraw(&self, n: u64) -> Withdrawal {
        let word = self.word();
        let mut current = word.load(Ordering::Acquire);
        loop {
            if current == n << 1 | WITHDRAWN {
                return Withdrawal::Withdrawn;
            }
            if current >> 1 >= n {
                return Withdrawal::Claimed;
            }
            if current >> 1 < n - 1 {
                // The call before is not decided yet (the worker has not read it): nothing
                // can be written for call `n` until it is. Call `n` cannot start before the
                // reply to the call before is accepted, so withdrawing it then is as good.
                return Withdrawal::Undecided;
            }
            match word.compare_exchange(current, n << 1 | WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.wake();
                    return Withdrawal::Withdrawn;
                }
                Err(now) => current = now,
            }
        }
    }
}

/// What [`Gate::withdraw`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Withdrawal {
    /// The call never runs.
    Withdrawn,
    /// The worker claimed it: it runs, or ran.
    Claimed,
    /// The worker has not decided the call before it yet. The call cannot start before the
    /// reply to that one is accepted: withdraw it again then, before accepting (it will
    /// succeed).
    Undecided,
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn pair() -> (Gate, Gate) {
        let worker = Gate::create().unwrap();
        let caller = Gate::open(worker.fd().try_clone().unwrap()).unwrap();
        (worker, caller)
    }

    const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

    fn open() -> bool {
        false
    }

    #[test]
    fn claimed_calls_run_and_withdrawn_ones_do_not() {
        let (worker, caller) = pair();
        assert_eq!(worker.claim(1, SPIN, &open), Ok(true));
        assert_eq!(caller.withdraw(1), Withdrawal::Claimed, "too late: it runs");
        assert_eq!(caller.withdraw(3), Withdrawal::Undecided, "call 2 is not decided yet");
        assert_eq!(caller.withdraw(2), Withdrawal::Withdrawn);
        assert_eq!(worker.claim(2, SPIN, &open), Ok(false));
        caller.accept(2);
        assert_eq!(worker.claim(3, SPIN, &open), Ok(true));
        caller.accept(4);
        assert!(worker.claim(5, SPIN, &open).unwrap_err().contains("call 3 where call 5"));
    }

    /// A call behind one whose reply is not accepted waits, asleep, until it is, or until
    /// it is withdrawn; a closed channel ends the wait.
    #[test]
    fn a_call_waits_for_the_reply_before_it_to_be_accepted() {
        let (worker, caller) = pair();
        let worker = Arc::new(worker);
        assert_eq!(worker.claim(1, SPIN, &open), Ok(true));
        let waiting = Arc::clone(&worker);
        let claim = std::thread::spawn(move || waiting.claim(2, SPIN, &open));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!claim.is_finished(), "call 2 started before the reply to call 1 was accepted");
        caller.accept(1);
        assert_eq!(claim.join().unwrap(), Ok(true));
        // Withdrawn while it waits: it is skipped.
        let waiting = Arc::clone(&worker);
        let claim = std::thread::spawn(move || waiting.claim(3, SPIN, &open));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(caller.withdraw(3), Withdrawal::Withdrawn);
        assert_eq!(claim.join().unwrap(), Ok(false));
        // After a withdrawn call, the next one waits for the reply before that only.
        caller.accept(3);
        assert_eq!(worker.claim(4, SPIN, &open), Ok(true));
        assert_eq!(caller.withdraw(5), Withdrawal::Withdrawn);
        assert_eq!(worker.claim(5, SPIN, &open), Ok(false));
        caller.accept(4);
        assert_eq!(worker.claim(6, SPIN, &open), Ok(true));
        // The channel closes while it waits.
        let started = std::time::Instant::now();
        assert_eq!(worker.claim(7, SPIN, &|| true), Ok(false));
        assert!(started.elapsed() < 10 * NAP);
    }

    /// The worker and the caller race for each of many calls: each call is decided once,
    /// by exactly one of them.
    #[test]
    fn each_call_is_decided_once() {
        const CALLS: u64 = 20_000;
        let (worker, caller) = pair();
        caller.accept(CALLS);
        let claimer = std::thread::spawn(move || {
            (1..=CALLS).filter(|&n| worker.claim(n, SPIN, &open).unwrap()).count()
        });
        let mut withdrawn = 0;
        for n in 1..=CALLS {
            // Withdraw only a call the worker has not passed yet: wait until it is next.
            while caller.word().load(Ordering::Acquire) >> 1 < n - 1 {
                std::hint::spin_loop();
            }
            if n % 2 == 0 && caller.withdraw(n) == Withdrawal::Withdrawn {
                withdrawn += 1;
            }
        }
        let claimed = claimer.join().unwrap();
        assert_eq!(claimed + withdrawn, CALLS as usize);
    }

    #[test]
    fn an_unsealed_or_short_file_is_refused() {
        use rustix::fs::MemfdFlags;
        let plain = rustix::fs::memfd_create("plain", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&plain, LEN as u64).unwrap();
        assert!(Gate::open(plain).err().unwrap().contains("not sealed"));
        let short =
            rustix::fs::memfd_create("short", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::fcntl_add_seals(&short, rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::SEAL)
            .unwrap();
        assert!(Gate::open(short).err().unwrap().contains("0 bytes"));
    }
}
