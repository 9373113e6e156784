//! The one public error type.

use std::fmt;
use std::io;
use std::time::Duration;

/// Why an offloaded call did not produce the function's return value.
///
/// Every variant names the function (`entry`, as `module::path::fn_name`) so a log line
/// read on its own says which call failed. The enum is `#[non_exhaustive]`: later
/// versions add variants for new failure modes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call did not finish before its deadline. The deadline covers waiting for a
    /// worker and running; a worker that was running the call was killed and replaced, or,
    /// with `grace`, told to stop and kept if it returned within the grace period.
    #[error("`{entry}` timed out after {} ({by}){}", humantime_ms(*timeout), killed(*pid))]
    Timeout {
        /// The offloaded function.
        entry: &'static str,
        /// How long the call had, from its start to its deadline.
        timeout: Duration,
        /// Which deadline it was.
        by: crate::deadline::Deadline,
        /// The worker that was killed, or `None` when the call was still waiting for one.
        pid: Option<u32>,
    },

    /// The function panicked in the worker. The worker survives and serves other calls.
    #[error("`{entry}` panicked in worker {pid}{}: {message}", at(location.as_deref()))]
    Panicked {
        /// The offloaded function.
        entry: &'static str,
        /// The worker process that ran the call.
        pid: u32,
        /// The panic payload, when it was a string.
        message: String,
        /// `file:line:column` of the panic, when known.
        location: Option<String>,
    },

    /// The worker process died while running the call (abort, segfault, `exit`, an outside
    /// `kill`). A replacement worker is started; other calls are unaffected.
    #[error("`{entry}` crashed its worker {pid}: {exit}{}{}", earlier(earlier_attempts), tail(stderr))]
    Crashed {
        /// The offloaded function.
        entry: &'static str,
        /// The worker process that died.
        pid: u32,
        /// How the worker ended.
        exit: ExitReason,
        /// The last lines the worker wrote to stderr, oldest first.
        stderr: Vec<String>,
        /// With `retries = N`: how the attempts before this last one failed, oldest first.
        earlier_attempts: Vec<Error>,
    },

    /// The worker ran past its memory limit (`memory = "..."`) while running the call: an
    /// allocation failed and the worker died. A replacement is started.
    #[error(
        "`{entry}` ran out of memory in worker {pid}: it is limited to {} bytes of address space{}",
        limit,
        earlier(earlier_attempts)
    )]
    MemoryLimit {
        /// The offloaded function.
        entry: &'static str,
        /// The worker process that died.
        pid: u32,
        /// The limit, in bytes.
        limit: u64,
        /// With `retries = N`: how the attempts before this last one failed, oldest first.
        earlier_attempts: Vec<Error>,
    },

    /// The pool's queue was full and its overload policy is `"reject"`: the call was refused
    /// at once, without running.
    #[error("`{entry}` was refused: all workers are busy and the queue of {queue} calls is full")]
    Overloaded {
        /// The offloaded function.
        entry: &'static str,
        /// The pool's queue size.
        queue: u64,
    },

    /// The function's circuit breaker is open after repeated worker-side failures: the call
    /// was refused at once, without running. A trial call is let through after the reset
    /// period.
    #[error("`{entry}` was refused: its circuit breaker is open (next trial in about {}ms)", retry_in.as_millis())]
    CircuitOpen {
        /// The offloaded function.
        entry: &'static str,
        /// About how long until the breaker lets a trial call through.
        retry_in: Duration,
    },

    /// A worker process could not be started or did not complete its handshake.
    #[error("`{entry}` could not start a worker: {source}")]
    Spawn {
        /// The offloaded function.
        entry: &'static str,
        /// What went wrong.
        #[source]
        source: io::Error,
    },

    /// The call's data or the conversation with the worker went wrong: a value that does
    /// not encode or decode, a frame over the maximum size, a worker that broke the protocol.
    /// (A worker that fails its handshake is [`Error::Spawn`].)
    #[error("`{entry}`: {kind}")]
    Protocol {
        /// The offloaded function.
        entry: &'static str,
        /// What went wrong.
        kind: ProtocolError,
    },

    /// The arguments or the return value encode to more than the pool's `max_payload`
    /// (1 GiB unless set). Checked before the payload is copied anywhere; a worker that
    /// refused to send its return value serves the next call.
    #[error("`{entry}`: the {what} encode to {len} bytes, over the limit of {max} bytes")]
    PayloadTooLarge {
        /// The offloaded function.
        entry: &'static str,
        /// Which payload.
        what: Payload,
        /// Its encoded size.
        len: u64,
        /// The pool's `max_payload`.
        max: u64,
    },

    /// The pool's configuration is unusable: conflicting settings for a shared pool, a
    /// function registered twice, or no Tokio runtime to run the call on.
    #[error("`{entry}`: {message}")]
    Config {
        /// The offloaded function.
        entry: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The pool was shut down; no new calls are accepted.
    #[error("`{entry}`: the offload pool is shut down")]
    Shutdown {
        /// The offloaded function.
        entry: &'static str,
    },

    /// The pool's calls go to other hosts (`OFFLOAD_REMOTE`, the `nats` feature), and none
    /// can take this one: no host of this build serves it, or the broker is unreachable.
    /// The call did not run.
    #[error("`{entry}` has no host to run on: {reason}")]
    Unavailable {
        /// The offloaded function.
        entry: &'static str,
        /// Why, with the hosts seen and their builds.
        reason: String,
    },
}

impl Error {
    /// The offloaded function this error is about, as `module::path::fn_name`.
    pub fn entry(&self) -> &'static str {
        match self {
            Error::Timeout { entry, .. }
            | Error::Panicked { entry, .. }
            | Error::Crashed { entry, .. }
            | Error::MemoryLimit { entry, .. }
            | Error::Overloaded { entry, .. }
            | Error::CircuitOpen { entry, .. }
            | Error::PayloadTooLarge { entry, .. }
            | Error::Spawn { entry, .. }
            | Error::Protocol { entry, .. }
            | Error::Config { entry, .. }
            | Error::Shutdown { entry }
            | Error::Unavailable { entry, .. } => entry,
        }
    }

    /// What kind of error this is, for counting and matching without the details.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Panicked { .. } => ErrorKind::Panicked,
            Error::Crashed { .. } => ErrorKind::Crashed,
            Error::MemoryLimit { .. } => ErrorKind::MemoryLimit,
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::CircuitOpen { .. } => ErrorKind::CircuitOpen,
            Error::Spawn { .. } => ErrorKind::Spawn,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::PayloadTooLarge { .. } => ErrorKind::PayloadTooLarge,
            Error::Config { .. } => ErrorKind::Config,
            Error::Shutdown { .. } => ErrorKind::Shutdown,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
        }
    }

    /// Whether a `fallback` replaces this error: a worker-side failure, or an open breaker.
    pub fn should_fall_back(&self) -> bool {
        self.is_worker_failure() || matches!(self, Error::CircuitOpen { .. })
    }

    /// Whether the function's own run failed in the worker: a running call's timeout, a
    /// panic, a crash or the memory limit. These are what a circuit breaker counts and what
    /// a fallback replaces; queueing, overload, shutdown and configuration errors are not.
    pub fn is_worker_failure(&self) -> bool {
        matches!(
            self,
            Error::Timeout { pid: Some(_), .. }
                | Error::Panicked { .. }
                | Error::Crashed { .. }
                | Error::MemoryLimit { .. }
        )
    }
}

impl Error {
    /// The same error again, for each of several calls it ended (the inputs of one batch).
    /// `Error` is not `Clone` only for the `io::Error` of [`Error::Spawn`], whose kind and
    /// text this keeps.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            &Error::Timeout { entry, timeout, by, pid } => Error::Timeout { entry, timeout, by, pid },
            Error::Panicked { entry, pid, message, location } => {
                Error::Panicked { entry, pid: *pid, message: message.clone(), location: location.clone() }
            }
            Error::Crashed { entry, pid, exit, stderr, earlier_attempts } => Error::Crashed {
                entry,
                pid: *pid,
                exit: *exit,
                stderr: stderr.clone(),
                earlier_attempts: earlier_attempts.iter().map(Error::duplicate).collect(),
            },
            Error::MemoryLimit { entry, pid, limit, earlier_attempts } => Error::MemoryLimit {
                entry,
                pid: *pid,
                limit: *limit,
                earlier_attempts: earlier_attempts.iter().map(Error::duplicate).collect(),
            },
            &Error::Overloaded { entry, queue } => Error::Overloaded { entry, queue },
            &Error::CircuitOpen { entry, retry_in } => Error::CircuitOpen { entry, retry_in },
            Error::Spawn { entry, source } => {
                Error::Spawn { entry, source: io::Error::new(source.kind(), source.to_string()) }
            }
            Error::Protocol { entry, kind } => Error::Protocol { entry, kind: kind.clone() },
            &Error::PayloadTooLarge { entry, what, len, max } => {
                Error::PayloadTooLarge { entry, what, len, max }
            }
            Error::Config { entry, message } => Error::Config { entry, message: message.clone() },
            &Error::Shutdown { entry } => Error::Shutdown { entry },
            Error::Unavailable { entry, reason } => Error::Unavailable { entry, reason: reason.clone() },
        }
    }
}

/// The kinds of [`Error`], without their details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Timeout`].
    Timeout,
    /// [`Error::Panicked`].
    Panicked,
    /// [`Error::Crashed`].
    Crashed,
    /// [`Error::MemoryLimit`].
    MemoryLimit,
    /// [`Error::Overloaded`].
    Overloaded,
    /// [`Error::CircuitOpen`].
    CircuitOpen,
    /// [`Error::Spawn`].
    Spawn,
    /// [`Error::Protocol`].
    Protocol,
    /// [`Error::PayloadTooLarge`].
    PayloadTooLarge,
    /// [`Error::Config`].
    Config,
    /// [`Error::Shutdown`].
    Shutdown,
    /// [`Error::Unavailable`].
    Unavailable,
}

impl ErrorKind {
    pub(crate) const COUNT: usize = 12;

    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; ErrorKind::COUNT] = [
        ErrorKind::Timeout,
        ErrorKind::Panicked,
        ErrorKind::Crashed,
        ErrorKind::MemoryLimit,
        ErrorKind::Overloaded,
        ErrorKind::CircuitOpen,
        ErrorKind::Spawn,
        ErrorKind::Protocol,
        ErrorKind::PayloadTooLarge,
        ErrorKind::Config,
        ErrorKind::Shutdown,
        ErrorKind::Unavailable,
    ];

    /// A short name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Crashed => "crashed",
            ErrorKind::MemoryLimit => "memory_limit",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Spawn => "spawn",
            ErrorKind::Protocol => "protocol",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Config => "config",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

/// What went wrong in the conversation with a worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// An argument or the return value could not be encoded.
    #[error("could not encode the {what}: {message}")]
    Encode {
        /// Which payload.
        what: Payload,
        /// The serializer's message.
        message: String,
    },
    /// An argument or the return value could not be decoded. Types that postcard cannot
    /// represent (`#[serde(flatten)]`, `#[serde(untagged)]`, `skip_serializing_if`) end here.
    #[error("could not decode the {what}: {message}")]
    Decode {
        /// Which payload.
        what: Payload,
        /// The deserializer's message.
        message: String,
    },
    /// The arguments or the return value encode to more than the pool's `max_payload`.
    #[error("the {what} encode to {len} bytes, over the limit of {max} bytes (`max_payload`)")]
    PayloadTooLarge {
        /// Which payload.
        what: Payload,
        /// Its encoded size.
        len: u64,
        /// The pool's limit.
        max: u64,
    },
    /// A frame was larger than the maximum frame size.
    #[error("a {len}-byte frame exceeds the maximum frame size of {max} bytes")]
    FrameTooLarge {
        /// The frame's length.
        len: u64,
        /// The maximum.
        max: u64,
    },
    /// The worker sent something that is not a valid reply.
    #[error("worker sent an invalid message: {0}")]
    Invalid(String),
}

/// Which payload a [`ProtocolError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Payload {
    /// The function's arguments.
    Arguments,
    /// The function's return value.
    ReturnValue,
    /// A message of offload's own protocol.
    Message,
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Payload::Arguments => "arguments",
            Payload::ReturnValue => "return value",
            Payload::Message => "protocol message",
        })
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// It exited with this status code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// Its end could not be observed.
    Unknown,
    /// It ran on another host (`OFFLOAD_REMOTE`), which stopped answering or shut down
    /// before the call ended; the error's stderr lines name the host.
    HostLost,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(code) => write!(f, "exited with status {code}"),
            ExitReason::Signal(sig) => match signal_name(sig) {
                Some(name) => write!(f, "killed by signal {sig} ({name})"),
                None => write!(f, "killed by signal {sig}"),
            },
            ExitReason::Unknown => f.write_str("ended in an unknown way"),
            ExitReason::HostLost => f.write_str("its host went away"),
        }
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    })
}

fn humantime_ms(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

fn killed(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!(" in worker {pid}, which was stopped"),
        None => " while waiting for a worker".to_owned(),
    }
}

/// What the attempts before the last one came to, for a call that was retried.
fn earlier(attempts: &[Error]) -> String {
    if attempts.is_empty() {
        return String::new();
    }
    let each: Vec<String> = attempts
        .iter()
        .map(|e| match e {
            Error::Crashed { pid, exit, .. } => format!("worker {pid} {exit}"),
            Error::MemoryLimit { pid, .. } => format!("worker {pid} ran out of memory"),
            other => other.kind().as_str().to_owned(),
        })
        .collect();
    format!(" (the last of {} attempts; before: {})", attempts.len() + 1, each.join(", "))
}

fn at(location: Option<&str>) -> String {
    location.map(|l| format!(" at {l}")).unwrap_or_default()
}

fn tail(lines: &[String]) -> String {
    if lines.is_empty() { String::new() } else { format!("; last stderr lines:\n  {}", lines.join("\n  ")) }
}

/// How the place a call ran in (see `crate::executor`) failed it, once that place is ended.
/// Internal: [`crate::call`] turns it into an [`Error`].
pub(crate) enum Failure {
    /// Shutdown stopped it once its grace was over.
    Stopped,
    /// It died while running the call.
    Crashed { exit: ExitReason, stderr: Vec<String> },
    /// It ran past its memory limit.
    MemoryLimit { limit: u64 },
    /// It broke the protocol, or the channel to it failed.
    Broken(ProtocolError),
    /// Its own timeout for the call fired first (a remote host's), or, without `started`,
    /// the deadline had passed when the call reached it.
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    TimedOut { started: bool },
    /// It ended the call with this error (a remote host's failure, as the caller sees it).
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Error(Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_well() {
        let by = crate::Deadline::Function;
        let e =
            Error::Timeout { entry: "app::digest", timeout: Duration::from_millis(1500), by, pid: Some(7) };
        assert_eq!(
            e.to_string(),
            "`app::digest` timed out after 1500ms (the function's timeout) in worker 7, which was stopped"
        );
        let by = crate::Deadline::Scope;
        let e = Error::Timeout { entry: "app::digest", timeout: Duration::from_secs(30), by, pid: None };
        assert_eq!(
            e.to_string(),
            "`app::digest` timed out after 30s (the scope's deadline) while waiting for a worker"
        );
        let e = Error::Crashed {
            entry: "app::digest",
            pid: 9,
            exit: ExitReason::Signal(11),
            stderr: vec!["oops".into()],
            earlier_attempts: Vec::new(),
        };
        assert_eq!(
            e.to_string(),
            "`app::digest` crashed its worker 9: killed by signal 11 (SIGSEGV); last stderr lines:\n  oops"
        );
        assert_eq!(e.entry(), "app::digest");
    }
}
