//! The gate a worker passes each call through before it runs it, shared with its caller: a
//! sealed page of shared memory with one slot per call, so that a call sent ahead (queued
//! behind the one the worker is running, see `pool::pipe`) can be withdrawn exactly, before
//! it starts or never.
//!
//! Both sides count the call frames on the worker's channel: the n-th frame is call `n`. The
//! caller fills call `n`'s slot before it writes the frame: the call's number, "pending", and
//! the instant after which it must not start. The worker claims the call when it reads its
//! frame, and the caller withdraws it, each by a compare-and-swap from "pending": exactly one
//! of them wins. A withdrawn call's frame is read and dropped, and answered with nothing.
//!
//! The worker withdraws a call itself if its deadline has passed when it comes to it, so that
//! a call sent ahead never starts late, however busy the caller's threads are. But never the
//! call whose reply the caller reads next: the caller makes that call's slot "firm" (no
//! deadline) before it waits for the reply, or learns that it was withdrawn and passes on to
//! the next. So a reply on the channel is always that of the call the caller expects.
//!
//! The worker claims call `n + 1` only once it has written its reply to call `n` whole. So a
//! caller that finds a call behind call `n` claimed knows that call `n` is over and its
//! reply is on the channel; and if it withdraws every call behind call `n`, none of them
//! will have run, whatever becomes of call `n` (it times out, crashes, its caller drops it).
//!
//! A reply the worker made whole by itself, with nothing else on the channel since the call
//! before, is well formed. Anything else may not be: frames the function's threads sent
//! mid-call (logs, progress, items, or bytes that are no frame at all), descriptors, bulk
//! frames. After such a call the worker claims the next one only once the caller has
//! *accepted* the reply (read it whole and found it well formed; a word says up to which
//! call), so that a call sent ahead never runs on a worker the caller is about to kill for
//! the reply before it. It waits for the acceptance by polling the word for its `spin_us`
//! (yielding the CPU between polls), then on a futex the caller wakes.
//!
//! The slots form a ring of [`SLOTS`]. The caller writes call `n` only while `n` is less than
//! [`SLOTS`] calls past the call whose reply it reads next (see [`Gate::fits`]): every call
//! before that one is decided (answered, or withdrawn), so a slot is filled again only once
//! the call it held is decided. A worker that finds a later call's number in a slot knows
//! the call it reads was withdrawn.
//!
//! The worker makes the page and sends its descriptor with its hello; the caller checks that
//! it is sealed against shrinking before it maps it, so the worker cannot turn the caller's
//! reads into a SIGBUS. A worker that lies about its gate harms only its own calls.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The page's size.
const LEN: usize = 4096;

/// Slots in the page, of two words each: the call's number and state, and its deadline. The
/// last 16 bytes hold the last reply accepted (`u64`), a futex the caller bumps to wake the
/// worker (`u32`), and whether the worker sleeps on it (`u32`).
const SLOTS: u64 = (LEN / 16) as u64 - 1;
const ACCEPTED: usize = LEN - 16;
const SIGNAL: usize = LEN - 8;
const SLEEPING: usize = LEN - 4;

/// How long a worker sleeps on the futex before it looks whether its channel closed.
const NAP: std::time::Duration = std::time::Duration::from_millis(100);

/// The most calls that may wait behind the running one: far fewer than [`SLOTS`]. Since the
/// calls waiting in the caller are written together (see `pool::pipe`), a deeper queue costs
/// fewer writes, reads and wake-ups per call on both sides: 32 took a saturated pool of 2
/// workers from about 190,000 to 260,000 trivial calls/s on 2 vCPUs where 8 had (64 gave no
/// more). The cost: up to this many calls may wait behind a call that turns out long, for
/// about 100 ms, or for as long as every other worker runs a long call too (see
/// `pool::pipe`).
pub(crate) const MAX_AHEAD: usize = 32;

const PENDING: u64 = 0;
const CLAIMED: u64 = 1;
const WITHDRAWN: u64 = 2;
/// Pending, and past its deadline or not, the worker runs it: the caller waits for its reply.
const FIRM: u64 = 3;

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

    fn state(&self, n: u64) -> &AtomicU64 {
        self.u64_at((n % SLOTS) as usize * 16)
    }

    fn deadline(&self, n: u64) -> &AtomicU64 {
        self.u64_at((n % SLOTS) as usize * 16 + 8)
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

    /// The caller's side: the reply to call `n` was read whole and is well formed.
    pub(crate) fn accept(&self, n: u64) {
        self.u64_at(ACCEPTED).fetch_max(n, Ordering::SeqCst);
        self.wake();
    }

    /// The worker's side: the last reply the caller accepted.
    pub(crate) fn accepted(&self) -> u64 {
        self.u64_at(ACCEPTED).load(Ordering::SeqCst)
    }

    /// Wakes the worker if it sleeps waiting for an acceptance or a withdrawal.
    fn wake(&self) {
        if self.u32_at(SLEEPING).load(Ordering::SeqCst) != 0 {
            let signal = self.u32_at(SIGNAL);
            signal.fetch_add(1, Ordering::SeqCst);
            let _ = rustix::thread::futex::wake(signal, rustix::thread::futex::Flags::empty(), 1);
        }
    }

    /// The worker's side, before it claims call `n`: waits until the reply to call `after`
    /// is accepted, or call `n` withdrawn, polling for `spin` and then sleeping; `closed`
    /// says whether the channel closed meanwhile (then `false`).
    pub(crate) fn await_acceptance(
        &self,
        after: u64,
        n: u64,
        spin: std::time::Duration,
        closed: &dyn Fn() -> bool,
    ) -> bool {
        let done = || {
            self.u64_at(ACCEPTED).load(Ordering::SeqCst) >= after
                || self.state(n).load(Ordering::SeqCst) == n << 2 | WITHDRAWN
        };
        let until = std::time::Instant::now() + spin;
        while !done() {
            if std::time::Instant::now() < until {
                // Polling, but not at the expense of the caller if it shares this CPU.
                std::thread::yield_now();
                continue;
            }
            let signal = self.u32_at(SIGNAL);
            let seen = signal.load(Ordering::SeqCst);
            self.u32_at(SLEEPING).store(1, Ordering::SeqCst);
            if !done() {
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

    /// Whether call `n` may be written while the caller reads the reply to call `running`
    /// next: its slot then held a call decided already.
    pub(crate) fn fits(n: u64, running: u64) -> bool {
        n.saturating_sub(running) < SLOTS - 1
    }

    /// The caller's side, before it writes call `n`'s frame: the call is pending, and is not
    /// to start after `deadline` (`None`: it is firm, see [`Gate::firm`]).
    pub(crate) fn pending(&self, n: u64, deadline: Option<std::time::Instant>) {
        let how = match deadline {
            Some(deadline) => {
                self.deadline(n).store(monotonic(deadline), Ordering::Relaxed);
                PENDING
            }
            None => FIRM,
        };
        self.state(n).store(n << 2 | how, Ordering::Release);
    }

    /// The caller's side, before it waits for call `n`'s reply: the worker will run it even
    /// if its deadline has passed by then. `false` if the worker withdrew it already: then it
    /// never runs, and no reply comes for it.
    pub(crate) fn firm(&self, n: u64) -> bool {
        let state = self.state(n);
        match state.compare_exchange(n << 2 | PENDING, n << 2 | FIRM, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(now) => now != n << 2 | WITHDRAWN,
        }
    }

    /// The worker's side, as it reads call `n`'s frame: `Ok(true)`: run it; `Ok(false)`: the
    /// caller withdrew it, or its deadline passed (it is withdrawn now); `Err`: the slot is
    /// out of step with the calls (the caller broke the protocol).
    pub(crate) fn claim(&self, n: u64) -> Result<bool, String> {
        let state = self.state(n);
        let mut current = state.load(Ordering::Acquire);
        loop {
            let (number, how) = (current >> 2, current & 3);
            if number > n || (number == n && how == WITHDRAWN) {
                // Withdrawn, and its slot since filled for a later call, or not yet.
                return Ok(false);
            }
            if number < n || how == CLAIMED {
                return Err(format!("the gate says call {number} ({how}) where call {n} comes"));
            }
            let late = how == PENDING && monotonic_now() >= self.deadline(n).load(Ordering::Relaxed);
            let decided = if late { WITHDRAWN } else { CLAIMED };
            match state.compare_exchange(current, n << 2 | decided, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(!late),
                Err(now) => current = now,
            }
        }
    }

    /// The caller's side: withdraws call `n` unless the worker claimed it.
    pub(crate) fn withdraw(&self, n: u64) -> Withdrawal {
        let state = self.state(n);
        let mut current = state.load(Ordering::Acquire);
        loop {
            if current == n << 2 | WITHDRAWN {
                return Withdrawal::Withdrawn;
            }
            if current != n << 2 | PENDING && current != n << 2 | FIRM {
                // Claimed; or a slot the worker scribbled on: it may have run the call.
                return Withdrawal::Claimed;
            }
            match state.compare_exchange(current, n << 2 | WITHDRAWN, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // A worker waiting for an acceptance before this call goes on to the next.
                    self.wake();
                    return Withdrawal::Withdrawn;
                }
                Err(now) => current = now,
            }
        }
    }
}

/// Now, in nanoseconds of `CLOCK_MONOTONIC`: the clock of `std::time::Instant` on Linux,
/// shared by every process of the machine.
fn monotonic_now() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (now.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(now.tv_nsec as u64)
}

/// `deadline` on the clock of [`monotonic_now`], without reading a clock: from one instant
/// read on both clocks, once. (They are the same clock; the two reads of that instant are
/// nanoseconds apart.)
fn monotonic(deadline: std::time::Instant) -> u64 {
    static BASE: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let &(instant, nanos) = BASE.get_or_init(|| (std::time::Instant::now(), monotonic_now()));
    match deadline.checked_duration_since(instant) {
        Some(after) => nanos.saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX)),
        None => nanos.saturating_sub(u64::try_from((instant - deadline).as_nanos()).unwrap_or(u64::MAX)),
    }
}

/// What [`Gate::withdraw`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Withdrawal {
    /// The call never runs.
    Withdrawn,
    /// The worker claimed it: it runs, or ran.
    Claimed,
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

    #[test]
    fn claimed_calls_run_and_withdrawn_ones_do_not() {
        let (worker, caller) = pair();
        caller.pending(1, None);
        assert_eq!(worker.claim(1), Ok(true));
        assert_eq!(caller.withdraw(1), Withdrawal::Claimed, "too late: it runs");
        // Calls 2 to 4 wait behind it; 3 is withdrawn while 2 runs.
        for n in 2..=4 {
            caller.pending(n, None);
        }
        assert_eq!(caller.withdraw(3), Withdrawal::Withdrawn);
        assert_eq!(caller.withdraw(3), Withdrawal::Withdrawn, "withdrawing twice is harmless");
        assert_eq!(worker.claim(2), Ok(true));
        assert_eq!(worker.claim(3), Ok(false));
        assert_eq!(worker.claim(4), Ok(true));
        // A frame the worker reads after its slot was filled for a later call: withdrawn.
        caller.pending(5, None);
        assert_eq!(caller.withdraw(5), Withdrawal::Withdrawn);
        caller.pending(5 + SLOTS, None);
        assert_eq!(worker.claim(5), Ok(false));
        // A slot the caller never filled.
        assert!(worker.claim(6).unwrap_err().contains("where call 6 comes"));
    }

    /// After a reply that needs it, a call waits, asleep, until that reply is accepted, or
    /// until the call is withdrawn; a closed channel ends the wait.
    #[test]
    fn a_call_can_wait_for_the_reply_before_it_to_be_accepted() {
        let (worker, caller) = pair();
        let worker = Arc::new(worker);
        let spin = std::time::Duration::from_micros(50);
        let waiting = Arc::clone(&worker);
        caller.pending(2, None);
        let wait = std::thread::spawn(move || waiting.await_acceptance(1, 2, spin, &|| false));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!wait.is_finished(), "call 2 went on before the reply to call 1 was accepted");
        caller.accept(1);
        assert!(wait.join().unwrap());
        assert_eq!(worker.claim(2), Ok(true));
        // Withdrawn while it waits: it goes on, to skip it.
        let waiting = Arc::clone(&worker);
        caller.pending(3, None);
        let wait = std::thread::spawn(move || waiting.await_acceptance(2, 3, spin, &|| false));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!wait.is_finished());
        assert_eq!(caller.withdraw(3), Withdrawal::Withdrawn);
        assert!(wait.join().unwrap());
        assert_eq!(worker.claim(3), Ok(false));
        // The channel closes while it waits.
        caller.pending(4, None);
        let started = std::time::Instant::now();
        assert!(!worker.await_acceptance(3, 4, spin, &|| true));
        assert!(started.elapsed() < 10 * NAP);
    }

    /// A pending call whose deadline passed before the worker came to it is withdrawn by the
    /// worker; a firm one runs however late; a caller that makes a slot firm learns whether
    /// the worker withdrew it first.
    #[test]
    fn a_late_call_never_starts_unless_it_is_firm() {
        let (worker, caller) = pair();
        let now = std::time::Instant::now();
        let later = now + std::time::Duration::from_secs(60);
        caller.pending(1, Some(now));
        assert_eq!(worker.claim(1), Ok(false));
        assert_eq!(caller.withdraw(1), Withdrawal::Withdrawn);
        assert!(!caller.firm(1), "withdrawn when late, so it never runs");
        caller.pending(2, Some(later));
        assert!(caller.firm(2));
        assert_eq!(worker.claim(2), Ok(true));
        caller.pending(3, Some(now));
        assert!(caller.firm(3), "made firm before the worker came to it");
        assert_eq!(worker.claim(3), Ok(true), "a firm call runs past its deadline");
        assert!(caller.firm(3), "claimed: it runs");
        caller.pending(4, None);
        assert_eq!(worker.claim(4), Ok(true));
        assert!(Gate::fits(SLOTS - 1, 1) && !Gate::fits(SLOTS, 1));
    }

    /// The worker and the caller race for each of many calls: each call is decided once,
    /// by exactly one of them.
    #[test]
    fn each_call_is_decided_once() {
        const CALLS: u64 = 20_000;
        let (worker, caller) = pair();
        let filled = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&filled);
        let claimer = std::thread::spawn(move || {
            (1..=CALLS)
                .filter(|&n| {
                    while seen.load(Ordering::Acquire) < n {
                        std::hint::spin_loop();
                    }
                    worker.claim(n).unwrap()
                })
                .count()
        });
        let mut withdrawn = 0;
        for n in 1..=CALLS {
            // Stay within the ring: a slot is filled again only for a call long decided.
            while n > 1 && matches!(caller.state(n - 1).load(Ordering::Acquire) & 3, PENDING | FIRM) {
                std::hint::spin_loop();
            }
            caller.pending(n, None);
            filled.store(n, Ordering::Release);
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
