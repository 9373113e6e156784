//! The child side: detect worker mode before `main`, start clean, serve calls, exit.
//!
//! A worker is the same binary re-executed with [`ENV`] set. A function in `.init_array`
//! sees the variable, serves calls on the inherited socket and exits, so neither the user's
//! `main` nor a test harness ever runs in a worker, and nothing has to be added to `main`.
//! The worker is single-threaded, builds no async runtime, and never starts workers itself.
//!
//! - this module: the pre-`main` hook, and the clean start before any user code runs;
//! - [`serve`]: the handshake and the loop that reads a call, runs it and sends the reply;
//! - [`logs`]: the function's `tracing` events, forwarded with the reply;
//! - [`state`]: what `state = path` builds, once per worker, before its first call;
//! - [`cancel`]: a cancelled call told so, with a `grace` period;
//! - [`progress`]: progress reports from the running call;
//! - [`overflow`]: a stack overflow reported as Rust reports one;
//! - [`api`]: what the macro's expansion calls on this side.
//!
//! It uses the protocol, the sockets and the registry; nothing of the caller's side.

mod api;
mod batch;
mod cancel;
mod logs;
#[cfg(target_os = "linux")]
mod overflow;
mod progress;
mod serve;
mod spare;
mod state;

use std::io::Write;
use std::os::fd::RawFd;

pub use api::{decode_args, encode_return, encode_return_bytes, stream_items, write_garbage_to_channel};
pub use cancel::{Cancelled, cancelled, checkpoint};
pub use progress::{progress, progress_message};
pub use state::worker_state;

use crate::protocol::env::{ENV, WorkerEnv};

/// Exit status of a worker that could not start serving (bad environment, failed hello).
pub(super) const EXIT_SETUP_FAILED: i32 = 70;

/// The pre-`main` hook. Every `#[offload]` stub references it, so the linker keeps the
/// object file that holds it in every binary that can make a call. Not public API.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
pub static ENTER_WORKER_MODE: extern "C" fn() = enter_worker_mode;

#[cfg(target_os = "linux")]
extern "C" fn enter_worker_mode() {
    let Some(value) = std::env::var_os(ENV) else {
        // Not a worker: perhaps a host that serves other hosts' calls (`OFFLOAD_SERVE`).
        #[cfg(feature = "nats")]
        crate::remote::serve_if_asked();
        #[cfg(not(feature = "nats"))]
        if std::env::var_os("OFFLOAD_SERVE").is_some() {
            eprintln!(
                "offload: OFFLOAD_SERVE is set, but this program was built without offload's `nats` feature, \
                 so it cannot serve other hosts' calls"
            );
            std::process::exit(EXIT_SETUP_FAILED);
        }
        return;
    };
    crate::role::become_worker();
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
        Some(env) => match serve::serve(env) {
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
    #[cfg(target_os = "linux")]
    overflow::install();
    cancel::install()?;
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

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;

    /// Runs this test binary in worker mode with `stdin` as its channel (descriptor 0); what it
    /// printed to stderr, after checking that it exited as a worker that could not start.
    #[cfg(target_os = "linux")]
    fn worker_on(stdin: std::process::Stdio) -> String {
        let env = WorkerEnv {
            fd: 0,
            parent: std::process::id(),
            secret: [7; 16],
            max_payload: 1 << 20,
            spin_us: 0,
            probe: 0,
            pool: "p".into(),
        };
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
}
