//! What callers and hosts say to each other through the broker, without I/O: the subjects,
//! a host's presence, a call's head, and the answers to a call.
//!
//! A call's message is its [`CallHead`] (postcard, length first) and then the very bytes a
//! local worker would read from its channel: the call frame and its bulk frames. An answer is
//! an [`Answer`] head the same way and then, for a frame, the frame's body and the bulk byte
//! vectors that came with it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ExitReason, Payload, ProtocolError};

/// The version of these messages; a host answers only callers of the same one (the build
/// check covers it too: both sides are one binary).
pub(crate) const VERSION: u32 = 1;

/// Where hosts announce themselves.
pub(crate) fn presence_subject(prefix: &str) -> String {
    format!("{prefix}.hosts")
}

/// Where one host takes calls.
pub(crate) fn call_subject(prefix: &str, host: &str) -> String {
    format!("{prefix}.host.{host}.call")
}

/// Where one host is told to stop a call.
pub(crate) fn cancel_subject(prefix: &str, host: &str) -> String {
    format!("{prefix}.host.{host}.cancel")
}

/// Whether `prefix` can start a subject: tokens of letters, digits, `-` and `_`, split by `.`.
pub(crate) fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// What a host says of itself, a few times a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Presence {
    pub(crate) version: u32,
    /// Its subject token: unique among hosts.
    pub(crate) id: String,
    /// For people: `hostname (pid N)`.
    pub(crate) name: String,
    /// Its registry's hash: calls run only on a host of the caller's build.
    pub(crate) build: u64,
    /// For each pool (by key): how many calls the host holds at most, running or about to.
    pub(crate) pools: Vec<(String, u32)>,
    /// It is shutting down: it takes no new calls.
    pub(crate) draining: bool,
}

/// What a call says before its frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CallHead {
    pub(crate) version: u32,
    pub(crate) build: u64,
    /// The function's registry key.
    pub(crate) entry: String,
    /// The call's deadline, as milliseconds since the Unix epoch on the caller's clock.
    pub(crate) deadline_ms: u64,
    /// What was left of the call's time when it was sent, in milliseconds: a host whose
    /// clock runs ahead of the caller's still gives the call no more than this.
    pub(crate) budget_ms: u64,
    /// The function streams items: a call of it is never run twice.
    pub(crate) streams: bool,
}

/// A host's answer to a call; more than one for a call that logs, reports progress or
/// streams items before its reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Answer {
    /// A frame from the worker (its tag as on the local channel), its body after the head,
    /// then the bulk byte vectors of these lengths.
    Frame { pid: u32, tag: u8, bulk: Vec<u64> },
    /// The call runs on the host, in this worker (sent when it has run a while).
    Started { pid: u32 },
    /// The call failed on the host.
    Failed { pid: Option<u32>, failure: Failure },
    /// The host has no room for the call, or is shutting down: it did not start it.
    Busy,
}

/// How a call failed on its host: a wire copy of [`Error`] without the function's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Failure {
    Crashed {
        exit: Exit,
        stderr: Vec<String>,
    },
    MemoryLimit {
        limit: u64,
    },
    /// The host's own timeout for the function fired first.
    TimedOut,
    /// The deadline had passed when the call reached the host: it never started.
    Expired,
    /// The host shut down and stopped the call.
    Stopped,
    CircuitOpen {
        retry_in_ms: u64,
    },
    Spawn {
        message: String,
    },
    Protocol {
        message: String,
    },
    PayloadTooLarge {
        return_value: bool,
        len: u64,
        max: u64,
    },
    Config {
        message: String,
    },
}

/// [`ExitReason`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
    Unknown,
}

impl From<ExitReason> for Exit {
    fn from(exit: ExitReason) -> Exit {
        match exit {
            ExitReason::Code(code) => Exit::Code(code),
            ExitReason::Signal(sig) => Exit::Signal(sig),
            _ => Exit::Unknown,
        }
    }
}

impl From<Exit> for ExitReason {
    fn from(exit: Exit) -> ExitReason {
        match exit {
            Exit::Code(code) => ExitReason::Code(code),
            Exit::Signal(sig) => ExitReason::Signal(sig),
            Exit::Unknown => ExitReason::Unknown,
        }
    }
}

impl Failure {
    /// What the host sends for the error its local call ended with, and the worker's pid.
    pub(crate) fn of(error: &Error) -> (Option<u32>, Failure) {
        match error {
            Error::Crashed { pid, exit, stderr, .. } => {
                (Some(*pid), Failure::Crashed { exit: (*exit).into(), stderr: stderr.clone() })
            }
            Error::MemoryLimit { pid, limit, .. } => (Some(*pid), Failure::MemoryLimit { limit: *limit }),
            Error::Timeout { pid, .. } => (*pid, Failure::TimedOut),
            Error::Shutdown { .. } => (None, Failure::Stopped),
            Error::CircuitOpen { retry_in, .. } => {
                (None, Failure::CircuitOpen { retry_in_ms: retry_in.as_millis() as u64 })
            }
            Error::Spawn { source, .. } => (None, Failure::Spawn { message: source.to_string() }),
            Error::Protocol { kind, .. } => (None, Failure::Protocol { message: kind.to_string() }),
            Error::PayloadTooLarge { what, len, max, .. } => (
                None,
                Failure::PayloadTooLarge {
                    return_value: *what == Payload::ReturnValue,
                    len: *len,
                    max: *max,
                },
            ),
            Error::Config { message, .. } => (None, Failure::Config { message: message.clone() }),
            // Panics travel as the worker's frame; the rest cannot happen on a host.
            other => (None, Failure::Protocol { message: other.to_string() }),
        }
    }

    /// The caller's error for this failure of a call of `entry` on `host`; `None` for the
    /// timeouts, which the caller words itself.
    pub(crate) fn into_error(self, entry: &'static str, pid: u32, host: &str) -> Option<Error> {
        let on = |message: String| format!("{message} (on host {host})");
        Some(match self {
            Failure::Crashed { exit, stderr } => {
                Error::Crashed { entry, pid, exit: exit.into(), stderr, earlier_attempts: Vec::new() }
            }
            Failure::MemoryLimit { limit } => {
                Error::MemoryLimit { entry, pid, limit, earlier_attempts: Vec::new() }
            }
            Failure::TimedOut | Failure::Expired => return None,
            Failure::Stopped => Error::Crashed {
                entry,
                pid,
                exit: ExitReason::HostLost,
                stderr: vec![format!("offload: host {host} shut down before the call ended")],
                earlier_attempts: Vec::new(),
            },
            Failure::CircuitOpen { retry_in_ms } => {
                Error::CircuitOpen { entry, retry_in: Duration::from_millis(retry_in_ms) }
            }
            Failure::Spawn { message } => Error::Spawn { entry, source: std::io::Error::other(on(message)) },
            Failure::Protocol { message } => {
                Error::Protocol { entry, kind: ProtocolError::Invalid(on(message)) }
            }
            Failure::PayloadTooLarge { return_value, len, max } => Error::PayloadTooLarge {
                entry,
                what: if return_value { Payload::ReturnValue } else { Payload::Arguments },
                len,
                max,
            },
            Failure::Config { message } => Error::Config { entry, message: on(message) },
        })
    }
}

/// `head`, length first, then `parts`.
pub(crate) fn encode<T: Serialize>(head: &T, parts: &[&[u8]]) -> Vec<u8> {
    let head = postcard::to_stdvec(head).expect("wire heads always encode");
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(4 + head.len() + len);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// The head of `message`, and where the rest starts.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(message: &[u8]) -> Result<(T, usize), ProtocolError> {
    let bad = |what: &str| ProtocolError::Invalid(format!("a malformed message from the broker: {what}"));
    let len = message.get(..4).ok_or_else(|| bad("too short"))?;
    let len = u32::from_le_bytes(len.try_into().expect("four bytes")) as usize;
    let head = message.get(4..4 + len).ok_or_else(|| bad("its head is cut short"))?;
    let head = postcard::from_bytes(head).map_err(|e| bad(&e.to_string()))?;
    Ok((head, 4 + len))
}

/// Milliseconds since the Unix epoch, `after` from now.
pub(crate) fn epoch_ms_after(after: Duration) -> u64 {
    (SystemTime::now() + after).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long from now until `epoch_ms`, on this host's clock; zero if it has passed.
pub(crate) fn until_epoch_ms(epoch_ms: u64) -> Duration {
    (UNIX_EPOCH + Duration::from_millis(epoch_ms)).duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_with_their_body() {
        let head = CallHead {
            version: VERSION,
            build: 0x9c1f,
            entry: "app::f#1@2:3".into(),
            deadline_ms: 1_700_000_000_000,
            budget_ms: 30_000,
            streams: false,
        };
        let message = encode(&head, &[b"abc", b"de"]);
        let (back, at) = decode::<CallHead>(&message).unwrap();
        assert_eq!(back, head);
        assert_eq!(&message[at..], b"abcde");
    }

    #[test]
    fn a_malformed_message_is_an_error() {
        for message in [&b""[..], &[9, 0, 0, 0, 1][..], &[1, 0, 0, 0, 0xff][..]] {
            let error = decode::<Answer>(message).unwrap_err();
            assert!(error.to_string().contains("malformed message"), "{error}");
        }
    }

    #[test]
    fn prefixes_are_subject_tokens() {
        assert!(valid_prefix("offload"));
        assert!(valid_prefix("team-a.offload_v2"));
        for bad in ["", "a..b", "a.*", "a b", "a.>", ".a"] {
            assert!(!valid_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn failures_come_back_as_the_callers_errors() {
        let crashed = Error::Crashed {
            entry: "host::side",
            pid: 7,
            exit: ExitReason::Signal(9),
            stderr: vec!["boom".into()],
            earlier_attempts: Vec::new(),
        };
        let (pid, failure) = Failure::of(&crashed);
        assert_eq!(pid, Some(7));
        match failure.into_error("app::f", 7, "h1").unwrap() {
            Error::Crashed { entry: "app::f", pid: 7, exit: ExitReason::Signal(9), stderr, .. } => {
                assert_eq!(stderr, ["boom"])
            }
            other => panic!("{other:?}"),
        }
        let config = Error::Config { entry: "host::side", message: "bad".into() };
        let error = Failure::of(&config).1.into_error("app::f", 0, "h1").unwrap();
        assert_eq!(error.to_string(), "`app::f`: bad (on host h1)");
        assert!(Failure::TimedOut.into_error("app::f", 1, "h1").is_none());
    }

    #[test]
    fn deadlines_cross_as_epoch_milliseconds() {
        let at = epoch_ms_after(Duration::from_secs(5));
        let left = until_epoch_ms(at);
        assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(4), "{left:?}");
        assert_eq!(until_epoch_ms(1), Duration::ZERO);
    }
}
