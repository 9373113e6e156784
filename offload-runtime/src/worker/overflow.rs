//! Says "stack overflow" when the function overflows the worker's stack, as Rust's runtime
//! does before `main` (which a worker never reaches, so Rust's own handler is not there):
//! a handler for SIGSEGV and SIGBUS, on a stack of its own, that writes Rust's message when
//! the fault is just below the main thread's stack, then aborts. Other faults go on to the
//! default action, as if no handler were there. The function runs on the main thread;
//! threads it starts itself get no such report (their overflow is a plain SIGSEGV).

use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest address of the main thread's stack; faults within [`GAP`] below it, or in
/// its lowest page, are overflows.
static STACK_LOW: AtomicUsize = AtomicUsize::new(0);
/// The kernel keeps this much unmapped below a growing stack (`stack_guard_gap`, 256
/// pages by default).
const GAP: usize = 1 << 20;
const ALT_STACK: usize = 64 << 10;

pub(crate) fn install() {
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
