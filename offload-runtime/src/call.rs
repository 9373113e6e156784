//! What the stub awaits: encode, find the pool, take a worker before the deadline, exchange
//! one frame each way, decode, and turn every way this can fail into an [`Error`].

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use crate::error::{Error, ExitReason, Payload, ProtocolError};
use crate::pool;
use crate::pool::supervisor::Ending;
use crate::protocol::{self, PanicReport, Tag};
use crate::registry::Entry;
use crate::transport::TransportError;
use crate::worker;

/// Runs `entry` in a worker with `args` and returns what it returned.
///
/// Not public API: `#[offload]` stubs call it. Needs a Tokio runtime with I/O and time
/// enabled (`#[tokio::main]` and `#[tokio::test]` enable both).
pub async fn call<A: Serialize, R: DeserializeOwned + Send>(
    entry: &'static Entry,
    args: A,
) -> Result<R, Error> {
    let frame = protocol::encode_call(entry.name, &args).map_err(|kind| protocol_error(entry, kind))?;
    drop(args);
    let mut value = None;
    let mut decode = |body: &[u8]| -> Result<(), ProtocolError> {
        value = Some(protocol::decode::<R>(body, Payload::ReturnValue)?);
        Ok(())
    };
    let span = tracing::debug_span!("offload", entry = entry.display(), pid = tracing::field::Empty);
    run(entry, &frame, &mut decode).instrument(span).await?;
    Ok(value.expect("decoded on success"))
}

/// The untyped part of [`call`]: everything but encoding the arguments and decoding the
/// return value, which `decode` does while the reply is still in the channel's buffer.
async fn run(
    entry: &'static Entry,
    frame: &[u8],
    decode: &mut (dyn FnMut(&[u8]) -> Result<(), ProtocolError> + Send),
) -> Result<(), Error> {
    // Keep the pre-main hook in every binary that can call; it makes workers out of it.
    #[cfg(target_os = "linux")]
    std::hint::black_box(&worker::ENTER_WORKER_MODE);

    if worker::is_worker() {
        return Err(Error::Spawn {
            entry: entry.display(),
            source: std::io::Error::other(
                "an offload worker cannot start workers of its own (an offloaded function called \
                 another one); call the other function's body directly",
            ),
        });
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::Config {
            entry: entry.display(),
            message: "offloaded functions must be awaited inside a Tokio runtime".into(),
        });
    }
    if pool::is_shut_down() {
        return Err(Error::Shutdown { entry: entry.display() });
    }
    let pool = pool::for_entry(entry).map_err(|message| Error::Config { entry: entry.display(), message })?;
    let timeout = pool.settings.timeout.unwrap_or(entry.timeout);
    let timed_out = |pid| Error::Timeout { entry: entry.display(), timeout, pid };

    // One timer for the whole call: waiting for a worker and running.
    let mut deadline = std::pin::pin!(tokio::time::sleep_until(deadline(timeout)));
    let mut lease = match before(deadline.as_mut(), pool.acquire()).await {
        Some(Ok(lease)) => lease,
        Some(Err(e)) => {
            tracing::debug!(error = ?e, "offload call got no worker");
            return Err(e.into_error(entry.display()));
        }
        None => {
            tracing::warn!(?timeout, "offload call timed out waiting for a worker");
            return Err(timed_out(None));
        }
    };
    if deadline.is_elapsed() {
        // The worker came as the deadline passed: a call whose deadline passed in the queue
        // is never started.
        lease.release_unused();
        return Err(timed_out(None));
    }
    let pid = lease.worker().pid;
    tracing::Span::current().record("pid", pid);
    tracing::debug!("dispatch");

    let outcome = before(deadline, lease.worker().channel().round_trip(frame)).await;
    let (tag, body) = match outcome {
        Some(Ok(reply)) => reply,
        None => {
            let _ended = lease.end(Ending::Kill).await;
            tracing::warn!(?timeout, "offload call timed out; worker killed");
            return Err(timed_out(Some(pid)));
        }
        Some(Err(_)) if pool.is_closed() => {
            drop(lease.end(Ending::Kill));
            return Err(Error::Shutdown { entry: entry.display() });
        }
        Some(Err(TransportError::Closed)) => {
            let ended = lease.end(Ending::Exited).await;
            let (exit, stderr) = match ended {
                Ok(info) => (info.reason, info.stderr),
                Err(_) => (ExitReason::Unknown, Vec::new()),
            };
            if let Some(limit) = pool.settings.memory
                && ran_out_of_memory(exit, &stderr)
            {
                tracing::error!(limit, "offload worker ran out of memory");
                return Err(Error::MemoryLimit { entry: entry.display(), pid, limit });
            }
            tracing::error!(%exit, "offload worker crashed");
            return Err(Error::Crashed { entry: entry.display(), pid, exit, stderr });
        }
        Some(Err(TransportError::Io(e))) => {
            drop(lease.end(Ending::Kill));
            let kind = ProtocolError::Invalid(format!("the channel to worker {pid} failed: {e}"));
            return Err(protocol_error(entry, kind));
        }
        Some(Err(TransportError::Protocol(kind))) => {
            drop(lease.end(Ending::Kill));
            tracing::error!(%kind, "offload worker broke the protocol; killed");
            return Err(protocol_error(entry, kind));
        }
    };

    let result = match tag {
        Tag::Return => decode(body).map_err(|kind| protocol_error(entry, kind)),
        Tag::Panicked => Err(match protocol::decode::<PanicReport>(body, Payload::Message) {
            Ok(report) => Error::Panicked {
                entry: entry.display(),
                pid,
                message: report.message,
                location: report.location,
            },
            Err(kind) => protocol_error(entry, kind),
        }),
        Tag::Fault => Err(protocol_error(
            entry,
            protocol::decode::<ProtocolError>(body, Payload::Message).unwrap_or_else(|e| e),
        )),
        Tag::Hello | Tag::Call => {
            drop(lease.end(Ending::Kill));
            return Err(protocol_error(entry, ProtocolError::Invalid(format!("unexpected {tag:?} frame"))));
        }
    };
    lease.release();
    result
}

/// Whether a worker died because an allocation failed: Rust's allocation error handler
/// prints this line and aborts.
fn ran_out_of_memory(exit: ExitReason, stderr: &[String]) -> bool {
    exit == ExitReason::Signal(6)
        && stderr.iter().any(|line| line.starts_with("memory allocation of ") && line.ends_with(" failed"))
}

/// Runs `future` until `deadline` fires; `None` if the deadline came first.
async fn before<F: Future>(mut deadline: Pin<&mut Sleep>, future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        deadline.as_mut().poll(cx).map(|()| None)
    })
    .await
}

fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    // A timeout too large to add is as good as none: about thirty years.
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}

fn protocol_error(entry: &Entry, kind: ProtocolError) -> Error {
    Error::Protocol { entry: entry.display(), kind }
}
