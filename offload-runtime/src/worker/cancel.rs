//! Cooperative cancellation: with a `grace` period, a worker whose call was cancelled (its
//! deadline passed, or its future was dropped) gets SIGURG, and the function can see that
//! with [`cancelled`] or stop with [`checkpoint`], then return before the grace period ends;
//! past it, the worker is killed. SIGURG is ignored by default, so a worker that never
//! installed the handler is not hurt by it.

use std::sync::atomic::{AtomicBool, Ordering};

static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Whether the running call was cancelled: its deadline passed or its caller dropped it, and
/// its pool has a `grace` period in which it may still return (its result is set aside).
/// Cheap enough to poll in a loop. Always `false` outside a worker and without `grace`.
pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::Relaxed)
}

/// `Err(Cancelled)` once the running call is cancelled (see [`cancelled`]): a point where a
/// long computation can stop, with `?` in a function that returns a `Result`.
///
/// # Errors
///
/// [`Cancelled`] when the call was cancelled.
pub fn checkpoint() -> Result<(), Cancelled> {
    if cancelled() { Err(Cancelled) } else { Ok(()) }
}

/// The running call was cancelled; see [`checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("the offloaded call was cancelled")]
pub struct Cancelled;

/// A call begins: it is not cancelled.
pub(super) fn reset() {
    CANCELLED.store(false, Ordering::Relaxed);
}

/// Installs the SIGURG handler that marks the running call cancelled.
#[cfg(target_os = "linux")]
pub(super) fn install() -> Result<(), ()> {
    extern "C" fn on_cancel(_: libc::c_int) {
        CANCELLED.store(true, Ordering::Relaxed);
    }
    // SAFETY: before `main`, single-threaded; the handler only stores to an atomic, which is
    // async-signal-safe. `SA_RESTART` keeps the function's blocking calls from failing with
    // `EINTR` because of it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int) = on_cancel;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGURG, &action, std::ptr::null_mut()) != 0 {
            return Err(());
        }
    }
    Ok(())
}
