//! What the stub awaits: encode, find the pool, ask the breaker, take a worker before the
//! deadline, exchange frames, decode, and turn every way this can fail into an [`Error`];
//! record the outcome in the pool's figures and the breaker.
//!
//! Payloads over [`INLINE_PAYLOAD`] are encoded and decoded on Tokio's blocking threads, not
//! on the calling task: copying hundreds of MiB takes tens of milliseconds, which would
//! stall every other task of the runtime's thread. Frames are written and read without
//! blocking, a socket buffer at a time, whatever their size.

use std::future::Future;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use crate::breaker::{Admission, Breaker, Transition};
use crate::error::{Error, Payload, ProtocolError};
use crate::executor::{self, Executor, Failed, Failure, Pace, Reply};
use crate::lend::{Lending, Message};
use crate::protocol::{self, Attached, LogRecord, PanicReport, Tag};
use crate::registry::{Entry, PerEntry, Registry};
use crate::stats::BreakerState;

/// Where each function's calls go, and its breaker: made on its first call.
static ROUTES: PerEntry<Route> = PerEntry::new();

/// What this process keeps for one offloaded function.
struct Route {
    /// Where its calls run, or why they cannot (bad settings).
    executor: Result<Executor, String>,
    breaker: Breaker,
}

/// The state of every function's breaker that has one, with its pool's key and its name.
pub(crate) fn breaker_states() -> Vec<(&'static str, &'static str, BreakerState)> {
    Registry::get()
        .entries()
        .filter(|entry| entry.breaker.is_some())
        .map(|entry| {
            let state = ROUTES.get(entry).map_or(BreakerState::Closed { failures: 0 }, |r| r.breaker.state());
            (entry.pool_key(), entry.name(), state)
        })
        .collect()
}

/// Numbers calls in this process, for the `task` field of logs.
static NEXT_TASK: AtomicU64 = AtomicU64::new(1);

/// Arguments and return values that encode to more bytes than this are encoded and decoded
/// on a blocking thread; smaller ones on the calling task, where that costs less than the
/// hand-off (tens of microseconds at most).
pub(crate) const INLINE_PAYLOAD: usize = 64 << 10;

/// The arguments of an offloaded function, as its stub hands them to [`call`]. Not public
/// API: `#[offload]` implements it.
pub trait Args: Serialize + Send + 'static {
    /// Calls `f` with each top-level byte-vector argument, in order: those long enough go in
    /// bulk frames of their own, written from where they are (see `protocol::bulk`).
    fn for_each_bytes<'a>(&'a self, f: &mut dyn FnMut(&'a [u8])) {
        let _ = f;
    }
}

impl Args for () {}

/// Runs `entry` in a worker with `args` and returns what it returned.
///
/// Not public API: `#[offload]` stubs call it. Needs a Tokio runtime with I/O and time
/// enabled (`#[tokio::main]` and `#[tokio::test]` enable both).
pub async fn call<A, R>(entry: &'static Entry, args: A) -> Result<R, Error>
where
    A: Args,
    R: DeserializeOwned + Send + 'static,
{
    let mut returned = Returned::<R>(None);
    let (result, _) = call_inner(entry, args, false, &mut returned).await;
    result.map(|()| returned.0.expect("decoded on success"))
}

/// [`call`] for a function with a fallback: the arguments come back with an error, for the
/// fallback to take. They are kept for the whole call, where `call` drops them as soon as
/// they are encoded. They are lost (`None`) only if the Tokio runtime shut down while they
/// were being encoded on its blocking threads.
///
/// Not public API: `#[offload(fallback = ...)]` stubs call it.
pub async fn call_keeping_args<A, R>(entry: &'static Entry, args: A) -> Result<R, (Error, Option<A>)>
where
    A: Args,
    R: DeserializeOwned + Send + 'static,
{
    let mut returned = Returned::<R>(None);
    match call_inner(entry, args, true, &mut returned).await {
        (Ok(()), _) => Ok(returned.0.expect("decoded on success")),
        (Err(error), args) => Err((error, args)),
    }
}

/// [`call`] with the reply, and the items streamed before it, going to `decode`; the
/// arguments back if `keep`.
pub(crate) async fn call_inner<A: Args>(
    entry: &'static Entry,
    args: A,
    keep: bool,
    decode: &mut dyn Decode,
) -> (Result<(), Error>, Option<A>) {
    let streams = decode.streams();
    let taken = BATCH_ITEM.with_borrow_mut(|item| item.as_mut().map(|item| item.take(entry, &args, streams)));
    if taken.is_some() {
        // Taken as an item of `offload::map`'s batch, which runs it: this future is dropped
        // without being polled again.
        return std::future::pending().await;
    }
    let (executor, breaker) = match preflight(entry) {
        Ok(found) => found,
        Err(error) => return (Err(error), keep.then_some(args)),
    };
    // Workers forward `tracing` events up to the level some subscriber here wants.
    let log_level = protocol::level::of_filter(tracing::level_filters::LevelFilter::current());
    let max_payload = executor.settings().max_payload;
    let mut bulk = 0u64;
    args.for_each_bytes(&mut |bytes| {
        if protocol::bulk::is_bulk(bytes.len()) {
            bulk += bytes.len() as u64;
        }
    });
    // Up to `INLINE_PAYLOAD` encoded, the arguments are measured here and encoded here; past
    // it, measured and encoded on a blocking thread.
    let size = match protocol::size_within(&args, Payload::Arguments, INLINE_PAYLOAD) {
        Ok(size) => size,
        Err(kind) => return (Err(protocol_error(entry, kind)), keep.then_some(args)),
    };
    let encode = move |args: A| {
        let encoded = protocol::encode_call(entry.key, log_level, &args, size, bulk, max_payload);
        // Arguments that hold shared buffers or bulk bytes are kept until the reply (the
        // bulk bytes are written from where they are; the pages of shared buffers are
        // shared, so keeping them costs no memory) and then let go off the runtime, below;
        // others are dropped as soon as they are encoded, unless they are to be kept.
        let holds_shared = encoded.as_ref().is_ok_and(|(_, fds, _)| !fds.is_empty());
        (encoded, (keep || holds_shared || bulk > 0).then_some(args))
    };
    let (encoded, args) = match size {
        Some(_) => encode(args),
        None => match off_runtime(move || encode(args)).await {
            Some(done) => done,
            None => return (Err(Error::Shutdown { entry: entry.name() }), None),
        },
    };
    let (frame, fds, mut outings) = match encoded {
        Ok(encoded) => encoded,
        Err(kind) => return (Err(protocol_error(entry, kind)), args),
    };
    // Set if the worker that answers holds none of the shared buffers it was sent: those
    // made here may then be used again (see `crate::shm`).
    let released = AtomicBool::new(false);
    let released = (!outings.is_empty()).then_some(&released);
    // Kept until the reply, or handed to the worker that may be reading them (see
    // `crate::lend`).
    let mut held = Held { args, lending: Lending::default() };
    let result = match bulk_frames(held.args.as_ref()) {
        Ok(frames) if frames.is_empty() => {
            let parts = [&frame[..]];
            let message = Message { released, ..Message::whole(&parts) };
            run(entry, executor, breaker, &message, &fds, decode).await
        }
        Ok(frames) => {
            let mut whole: Vec<&[u8]> = Vec::with_capacity(2 * frames.len() + 1);
            for (header, bytes) in &frames {
                whole.extend([&header[..], bytes]);
            }
            whole.push(&frame);
            // A fallback gets the arguments back after a failure, when the worker that
            // failed may still be reading them: such calls lend nothing.
            let at: Vec<_> = frames
                .iter()
                .map(|(_, bytes)| protocol::bulk_at_frame(bytes.as_ptr() as u64, bytes.len() as u64))
                .collect();
            let mut lent: Vec<&[u8]> = at.iter().map(|frame| &frame[..]).collect();
            lent.push(&frame);
            let lent = (!keep).then_some((&lent[..], &held.lending));
            let message = Message { whole: &whole, lent, released };
            // On the heap: the futures of calls without large byte vectors, which may be many
            // at once, stay small.
            Box::pin(run(entry, executor, breaker, &message, &fds, decode)).await
        }
        Err(kind) => Err(protocol_error(entry, kind)),
    };
    if result.is_ok() && released.is_some_and(|released| released.load(Ordering::Acquire)) {
        outings.iter_mut().for_each(protocol::fds::Outing::returned);
    }
    let args = held.settle();
    let (args, done) = if keep && result.is_err() { (args, None) } else { (None, args) };
    // Unmapping shared buffers the caller wrote and freeing their memory (the caller holds
    // the last descriptor: the worker closes its own before it answers) takes milliseconds
    // for large buffers, as does freeing a large frame or large byte vectors: all happen off
    // the runtime, after the call.
    if !fds.is_empty() || frame.len() > INLINE_PAYLOAD || bulk > 0 {
        // The outings go first: a buffer is used again only once none is left.
        drop(tokio::task::spawn_blocking(move || drop((frame, fds, outings, done))));
    }
    (result, args)
}

/// A call's arguments while it runs: if the call ends while a worker may be reading them
/// (its future dropped), they go to that worker (see [`Lending::settle`]).
struct Held<A: Send + 'static> {
    args: Option<A>,
    lending: Lending,
}

impl<A: Send + 'static> Held<A> {
    /// The call is over: its arguments, unless a worker may still be reading them.
    fn settle(&mut self) -> Option<A> {
        self.lending.settle(self.args.take()?)
    }
}

impl<A: Send + 'static> Drop for Held<A> {
    fn drop(&mut self) {
        drop(self.settle());
    }
}

/// The [`Tag::Bulk`] frames that go before the call frame: a header for each byte-vector
/// argument that goes in one, and its bytes, where they are.
#[allow(clippy::type_complexity)]
fn bulk_frames<A: Args>(args: Option<&A>) -> Result<Vec<([u8; protocol::HEADER], &[u8])>, ProtocolError> {
    let (mut frames, mut failed) = (Vec::new(), None);
    if let Some(args) = args {
        args.for_each_bytes(&mut |bytes| {
            if protocol::bulk::is_bulk(bytes.len()) {
                match protocol::bulk_header(bytes.len()) {
                    Ok(header) => frames.push((header, bytes)),
                    Err(e) => failed = Some(e),
                }
            }
        });
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(frames),
    }
}

thread_local! {
    /// Set while [`as_batch_item`] polls a stub's future.
    static BATCH_ITEM: std::cell::RefCell<Option<BatchItem>> = const { std::cell::RefCell::new(None) };
}

/// A call taken as an item of a batch instead of being run: its arguments, encoded onto the
/// batch, and its function; or why it cannot be an item.
struct BatchItem {
    out: Vec<u8>,
    taken: Option<Result<&'static Entry, Error>>,
}

impl BatchItem {
    fn take<A: Args>(&mut self, entry: &'static Entry, args: &A, streams: bool) {
        if self.taken.is_some() {
            // A second call from one future: only the first is the item.
            return;
        }
        if streams {
            self.taken = Some(Err(Error::Config {
                entry: entry.name(),
                message: "`offload::map` cannot run a function that streams its results".into(),
            }));
            return;
        }
        let at = protocol::batch::Records::open(&mut self.out);
        let (appended, fds) = protocol::fds::collecting(|| {
            protocol::bulk::inline(|| protocol::append(&mut self.out, args, Payload::Arguments))
        });
        self.taken = Some(match appended {
            Ok(()) if fds.is_empty() => {
                protocol::batch::Records::close(&mut self.out, at);
                Ok(entry)
            }
            Ok(()) => Err(Error::Config {
                entry: entry.name(),
                message: "`offload::map` cannot send shared buffers (`SharedBytes`, `SharedSlice`) \
                          in a batch; call the function on its own for those"
                    .into(),
            }),
            Err(kind) => Err(protocol_error(entry, kind)),
        });
        if !matches!(self.taken, Some(Ok(_))) {
            protocol::batch::Records::abandon(&mut self.out, at);
        }
    }
}

/// For `offload::map`: polls `call`, the future of an offloaded function's stub (or one that
/// awaits such a stub first thing), once, so that the call it makes is encoded as a batch
/// item onto `out` instead of being run; then drops it. The function it called, or why the
/// call cannot be an item; `None` if `call` made no offloaded call.
pub(crate) fn as_batch_item<F: Future>(call: F, out: &mut Vec<u8>) -> Option<Result<&'static Entry, Error>> {
    /// Puts back what the thread's slot held before, and the buffer where it was, once, even
    /// if `call` panics.
    struct Restore<'a> {
        out: &'a mut Vec<u8>,
        previous: Option<Option<BatchItem>>,
    }
    impl Restore<'_> {
        fn restore(&mut self) -> Option<Result<&'static Entry, Error>> {
            let item = BATCH_ITEM.replace(self.previous.take()?)?;
            *self.out = item.out;
            item.taken
        }
    }
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            self.restore();
        }
    }

    let mut call = std::pin::pin!(call);
    let item = BatchItem { out: std::mem::take(out), taken: None };
    let mut restore = Restore { out, previous: Some(BATCH_ITEM.replace(Some(item))) };
    let _ = call.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    // Before `call` is dropped, which then runs outside batch mode.
    restore.restore()
}

/// Runs `f` on Tokio's blocking threads. A panic in `f` goes on in the caller, as it would
/// have if `f` had run there; `None` if the runtime is shutting down.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => Some(value),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_cancelled) => None,
        },
    }
}

/// Decodes the return value out of a reply body, with the descriptors and bulk frames that
/// came with it.
pub(crate) trait Decode: Send {
    /// Decodes on the calling task, while the body is still in the channel's buffer.
    fn decode(&mut self, body: &[u8], attached: Attached) -> Result<(), ProtocolError>;

    /// Decodes `frame[body]` on a blocking thread, and frees the frame there.
    fn decode_off_runtime(
        &mut self,
        frame: Vec<u8>,
        body: Range<usize>,
        attached: Attached,
    ) -> Pin<Box<dyn Future<Output = Result<(), ProtocolError>> + Send + '_>>;

    /// Whether the function streams items before its reply: a call of it that failed
    /// cannot run again (its items may have been delivered), so it is never retried.
    fn streams(&self) -> bool {
        false
    }

    /// Whether a call that failed may run again here, as `retries = N` allows: not one that
    /// streams, nor one whose caller retries it itself (a remote host's).
    fn may_retry(&self) -> bool {
        !self.streams()
    }

    /// What the call waits for before it asks for a worker: the batches of one map ask in
    /// input order, since their tasks start in any order and the pool's queue is first come,
    /// first served. The wait counts against the call's deadline.
    fn turn(&mut self) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
        None
    }

    /// The call is in line for a worker (it asked the pool once, which serves in order):
    /// what waits for its turn behind this call may ask now.
    fn in_line(&mut self) {}

    /// The call has its worker, `pid` (0 where it is not known yet: a remote host's).
    fn placed(&mut self, pid: u32) {
        let _ = pid;
    }

    /// A log or progress frame from the worker, before its reply: whether this took it
    /// (a host relays them to the caller); if not, the caller's subscriber or progress
    /// callback gets it.
    fn relay(&mut self, tag: Tag, body: &[u8]) -> bool {
        let _ = (tag, body);
        false
    }

    /// An item the function streamed before its reply; whether to read on at once.
    fn item(&mut self, body: &[u8]) -> Pace {
        let _ = body;
        tracing::warn!(target: "offload::call", "offload worker streamed an item in a call that takes none");
        Pace::Continue
    }
}

/// The return value, once decoded.
struct Returned<R>(Option<R>);

impl<R: DeserializeOwned + Send + 'static> Decode for Returned<R> {
    fn decode(&mut self, body: &[u8], attached: Attached) -> Result<(), ProtocolError> {
        self.0 = Some(decode_return(body, attached)?);
        Ok(())
    }

    fn decode_off_runtime(
        &mut self,
        frame: Vec<u8>,
        body: Range<usize>,
        attached: Attached,
    ) -> Pin<Box<dyn Future<Output = Result<(), ProtocolError>> + Send + '_>> {
        Box::pin(async move {
            self.0 =
                Some(decode_on_blocking_thread(move || decode_return::<R>(&frame[body], attached)).await?);
            Ok(())
        })
    }
}

/// Runs `decode` on Tokio's blocking threads (see [`off_runtime`]).
pub(crate) async fn decode_on_blocking_thread<T: Send + 'static>(
    decode: impl FnOnce() -> Result<T, ProtocolError> + Send + 'static,
) -> Result<T, ProtocolError> {
    off_runtime(decode).await.unwrap_or_else(|| {
        Err(ProtocolError::Invalid("the Tokio runtime shut down while a reply was decoded".into()))
    })
}

fn decode_return<R: DeserializeOwned>(body: &[u8], attached: Attached) -> Result<R, ProtocolError> {
    attached.supplying(|| protocol::decode::<R>(body, Payload::ReturnValue))
}

/// What must hold before a call is encoded: this is not a worker, a Tokio runtime is
/// running, offload is not shut down, and the function's pool has valid settings.
pub(crate) fn preflight(entry: &'static Entry) -> Result<(&'static Executor, &'static Breaker), Error> {
    if crate::role::is_worker() {
        return Err(Error::Spawn {
            entry: entry.name(),
            source: std::io::Error::other(
                "an offload worker cannot start workers of its own (an offloaded function called \
                 another one); call the other function's body directly",
            ),
        });
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::Config {
            entry: entry.name(),
            message: "offloaded functions must be awaited inside a Tokio runtime".into(),
        });
    }
    if executor::is_shut_down() {
        return Err(Error::Shutdown { entry: entry.name() });
    }
    let route = ROUTES
        .get_or_init(entry, || Route { executor: executor::for_entry(entry), breaker: Breaker::new() })
        .ok_or_else(|| Error::Config {
            entry: entry.name(),
            message: format!("`{}` is missing from the registry of offloaded functions", entry.name()),
        })?;
    match &route.executor {
        Ok(executor) => Ok((executor, &route.breaker)),
        Err(message) => Err(Error::Config { entry: entry.name(), message: message.clone() }),
    }
}

/// The untyped part of [`call`]: everything but encoding the arguments and decoding the
/// return value, which `decode` does.
pub(crate) async fn run(
    entry: &'static Entry,
    executor: &'static Executor,
    breaker: &'static Breaker,
    message: &Message<'_>,
    fds: &[OwnedFd],
    decode: &mut dyn Decode,
) -> Result<(), Error> {
    let task = NEXT_TASK.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!(target: "offload::call",
        "offload",
        entry = entry.name(),
        task,
        pid = tracing::field::Empty,
        host = tracing::field::Empty,
        queue_wait_us = tracing::field::Empty,
        run_us = tracing::field::Empty,
    );
    // The deadline is the call's, whatever the attempts.
    let function_timeout = executor.settings().timeout.unwrap_or_else(|| entry.timeout());
    let deadline = crate::deadline::for_call(function_timeout);
    let retries = if decode.may_retry() { entry.options.retries.unwrap_or(0) } else { 0 };
    let mut earlier = Vec::new();
    loop {
        // Each attempt counts in the figures and the breaker as it happens.
        let mut record = Record::start(entry, executor, breaker);
        if let Some(config) = entry.breaker {
            let (admission, transition) = breaker.admit(config);
            log_transition(entry, transition);
            if let Admission::Refuse(retry_in) = admission {
                let error = Error::CircuitOpen { entry: entry.name(), retry_in };
                record.finish(Err(&error));
                // A retry the breaker refuses ends the call with the failure before it.
                return Err(match earlier.pop() {
                    Some(last) => with_earlier(last, earlier),
                    None => error,
                });
            }
            record.admission = Some(admission);
        }
        let result = exchange(entry, executor, deadline, message, fds, decode, &mut record, &span)
            .instrument(span.clone())
            .await;
        record.finish(result.as_ref().map(|_| ()));
        match result {
            // The worker died: a function safe to repeat runs again on a fresh one, within
            // the same deadline. Panics and timeouts are never retried: a panic is likely to
            // come again, and a timed-out call has no time left.
            Err(error @ (Error::Crashed { .. } | Error::MemoryLimit { .. }))
                if (earlier.len() as u64) < retries && Instant::now() < deadline.0 =>
            {
                tracing::warn!(target: "offload::call", parent: &span, %error, attempt = earlier.len() + 1, "offload call retried");
                earlier.push(error);
            }
            // A retry that failed for another reason (no worker in time, overload, shutdown)
            // ends the call with the worker failure before it, which a fallback replaces.
            Err(error) if !earlier.is_empty() && !error.is_worker_failure() => {
                let last = earlier.pop().expect("not empty");
                return Err(with_earlier(last, earlier));
            }
            Err(error) if !earlier.is_empty() => return Err(with_earlier(error, earlier)),
            result => return result,
        }
    }
}

/// `error`, the last attempt's, with the attempts before it, when it can carry them.
fn with_earlier(error: Error, attempts: Vec<Error>) -> Error {
    match error {
        Error::Crashed { entry, pid, exit, stderr, .. } => {
            Error::Crashed { entry, pid, exit, stderr, earlier_attempts: attempts }
        }
        Error::MemoryLimit { entry, pid, limit, .. } => {
            Error::MemoryLimit { entry, pid, limit, earlier_attempts: attempts }
        }
        other => other,
    }
}

/// What one call has been through so far: kept up to date as it goes, so that a call whose
/// future is dropped midway is still counted, and its breaker trial given back.
struct Record {
    entry: &'static Entry,
    executor: &'static Executor,
    breaker: &'static Breaker,
    started: Instant,
    queue_wait: Option<Duration>,
    run_time: Option<Duration>,
    admission: Option<Admission>,
    finished: bool,
}

impl Record {
    fn start(entry: &'static Entry, executor: &'static Executor, breaker: &'static Breaker) -> Record {
        executor.metrics().submitted();
        Record {
            entry,
            executor,
            breaker,
            started: Instant::now(),
            queue_wait: None,
            run_time: None,
            admission: None,
            finished: false,
        }
    }

    fn finish(&mut self, outcome: Result<(), &Error>) {
        self.finished = true;
        self.executor.metrics().finished(
            outcome.map_err(Error::kind),
            self.queue_wait,
            self.run_time,
            self.started.elapsed(),
        );
        if let (Some(config), Some(admission)) = (self.entry.breaker, self.admission) {
            let verdict = match outcome {
                Ok(()) => Some(true),
                Err(e) if e.is_worker_failure() => Some(false),
                Err(_) => None,
            };
            log_transition(self.entry, self.breaker.record(config, admission, verdict));
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.finished {
            self.executor.metrics().cancelled();
            if let (Some(config), Some(admission)) = (self.entry.breaker, self.admission) {
                self.breaker.record(config, admission, None);
            }
        }
    }
}

fn log_transition(entry: &Entry, transition: Option<Transition>) {
    match transition {
        Some(Transition::Opened) => {
            tracing::warn!(target: "offload::call", entry = entry.name(), "offload circuit breaker opened")
        }
        Some(Transition::HalfOpened) => {
            tracing::info!(target: "offload::call", entry = entry.name(), "offload circuit breaker half-open: trying one call")
        }
        Some(Transition::Closed) => {
            tracing::info!(target: "offload::call", entry = entry.name(), "offload circuit breaker closed")
        }
        None => {}
    }
}

/// Takes a place to run before the deadline, sends the call, and reads the reply. A call
/// whose place is found gone before the call started there (a worker that died while idle,
/// or between the call before and this one) looks for another, as if it had waited in the
/// queue a little longer.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    entry: &'static Entry,
    executor: &Executor,
    (end, timeout, by): (Instant, Duration, crate::deadline::Deadline),
    message: &Message<'_>,
    fds: &[OwnedFd],
    decode: &mut dyn Decode,
    record: &mut Record,
    span: &tracing::Span,
) -> Result<(), Error> {
    message.attempt();
    if timeout.is_zero() {
        // Its deadline passed before it began (a scope's, or a zero timeout).
        return Err(Error::Timeout { entry: entry.name(), timeout, by, pid: None });
    }
    // One timer for the whole call: waiting for a place and running.
    let mut deadline = std::pin::pin!(tokio::time::sleep_until(end));
    if let Some(turn) = decode.turn()
        && before(deadline.as_mut(), turn).await.is_none()
    {
        tracing::warn!(target: "offload::call", ?timeout, "offload call timed out waiting for a worker");
        return Err(Error::Timeout { entry: entry.name(), timeout, by, pid: None });
    }
    let call = Attempt { entry, executor, end, timeout, by, message, fds };
    let mut looking = Looking::default();
    loop {
        if let Some(result) = call.run(deadline.as_mut(), decode, record, span, &mut looking).await {
            return result;
        }
    }
}

/// What a call keeps from one place it tries to the next.
#[derive(Default)]
struct Looking {
    /// Places found gone before the call started there: one per place of the executor is
    /// passed over before the loss is reported.
    unusable: usize,
    /// The call asked for a place already: it waits in the pool's queue, or has its place.
    in_line: bool,
    /// What the call keeps of its place in line: withdrawn from a worker it was sent ahead
    /// to, or found not started on one that died.
    carried: executor::Carried,
}

/// A call, as it tries places.
struct Attempt<'a, 'm> {
    entry: &'static Entry,
    executor: &'a Executor,
    end: Instant,
    timeout: Duration,
    by: crate::deadline::Deadline,
    message: &'a Message<'m>,
    fds: &'a [OwnedFd],
}

impl Attempt<'_, '_> {
    fn timed_out(&self, pid: Option<u32>) -> Error {
        Error::Timeout { entry: self.entry.name(), timeout: self.timeout, by: self.by, pid }
    }

    /// Takes a place, sends the call there, and reads and decodes the reply. `None`: the
    /// place was found gone before the call started there, and the call looks for another.
    async fn run(
        &self,
        mut deadline: Pin<&mut Sleep>,
        decode: &mut dyn Decode,
        record: &mut Record,
        span: &tracing::Span,
        looking: &mut Looking,
    ) -> Option<Result<(), Error>> {
        let Attempt { entry, executor, end, timeout, message, fds, .. } = *self;
        let (mut place, sent) = loop {
            let acquire = executor.acquire(message, fds, std::mem::take(&mut looking.carried));
            let mut acquire = std::pin::pin!(acquire);
            let acquired = std::future::poll_fn(|cx| {
                let poll = acquire.as_mut().poll(cx);
                // Asked once, the call waits in the pool's queue (or has its place).
                if !std::mem::replace(&mut looking.in_line, true) {
                    decode.in_line();
                }
                poll
            });
            let mut place = match before(deadline.as_mut(), acquired).await {
                Some(Ok(place)) => place,
                Some(Err(e)) => {
                    tracing::debug!(target: "offload::call", error = ?e, "offload call got no worker");
                    return Some(Err(e.into_error(entry.name())));
                }
                None => {
                    tracing::warn!(target: "offload::call", ?timeout, "offload call timed out waiting for a worker");
                    return Some(Err(self.timed_out(None)));
                }
            };
            if record.admission == Some(Admission::Pass)
                && let Some(retry_in) = record.breaker.opened_since()
            {
                place.give_back();
                return Some(Err(Error::CircuitOpen { entry: entry.name(), retry_in }));
            }
            if Instant::now() >= end {
                // The place came as the deadline passed: a call whose deadline passed in the
                // queue is never started.
                place.give_back();
                return Some(Err(self.timed_out(None)));
            }
            let sending = executor::Sending { entry, end, streams: decode.streams() };
            match place.start(message, fds, sending) {
                Err(fault)
                    if fault.nothing_sent() && (looking.unusable < executor.places() || place.is_ahead()) =>
                {
                    looking.unusable += usize::from(!place.is_ahead());
                    looking.carried = place.discard_unused();
                }
                // A call sent ahead to a busy worker is still queued: it waits there for the
                // call before it to end, or is withdrawn, then looks for a place again.
                Ok(sent) => match before(deadline.as_mut(), place.turn()).await {
                    Some(Ok(None)) => break (place, Ok(sent)),
                    Some(Ok(Some(kept))) => looking.carried = kept,
                    Some(Err(fault)) => break (place, Err(fault)),
                    None => {
                        let pid = place.id();
                        tracing::warn!(target: "offload::call", ?timeout, "offload call timed out waiting for a worker");
                        // Boxed, as every way a call ends badly: kept out of every call's future.
                        let started = Box::pin(place.timed_out(false)).await;
                        return Some(Err(self.timed_out(started.then_some(pid))));
                    }
                },
                sent => break (place, sent),
            }
        };
        let placed_pid = place.id();
        decode.placed(placed_pid);
        let started = Instant::now();
        let queue_wait = started.saturating_duration_since(record.started);
        record.queue_wait = Some(queue_wait);
        span.record("pid", placed_pid);
        if let Some(host) = place.host() {
            span.record("host", host);
        }
        span.record("queue_wait_us", queue_wait.as_micros() as u64);
        tracing::debug!(target: "offload::call", "dispatch");

        let outcome = match sent {
            Ok(sent) => {
                let mut on_frame = |tag: Tag, body: &[u8]| match tag {
                    Tag::Item => decode.item(body),
                    Tag::Released => {
                        message.release();
                        Pace::Continue
                    }
                    _ if decode.relay(tag, body) => Pace::Continue,
                    _ => {
                        forward(entry, tag, body);
                        Pace::Continue
                    }
                };
                before(deadline, place.reply(message, fds, sent, &mut on_frame)).await
            }
            Err(fault) => Some(Err(fault)),
        };
        let run_time = started.elapsed();
        record.run_time = Some(run_time);
        span.record("run_us", run_time.as_micros() as u64);
        let Reply { tag, body, range, attached, pid } = match outcome {
            Some(Ok(reply)) => reply,
            None => {
                // A remote place knows its worker once it answers: 0 until then (no local
                // worker has pid 0), and then no worker is known to have been stopped.
                let pid = Some(place.id()).filter(|&pid| pid != 0);
                // A worker given a grace period keeps running: not while the caller may get
                // the call's shared buffers back (for a fallback) and use them at the same
                // time.
                if !Box::pin(place.timed_out(fds.is_empty())).await {
                    // Sent ahead to a busy worker, and withdrawn before it started.
                    tracing::warn!(target: "offload::call", ?timeout, "offload call timed out waiting for a worker");
                    return Some(Err(self.timed_out(None)));
                }
                tracing::warn!(target: "offload::call", ?timeout, "offload call timed out; its worker is stopped");
                return Some(Err(self.timed_out(pid)));
            }
            Some(Err(fault)) => {
                let pid = place.id();
                // Found gone before it started the call: once per place, the call looks
                // for another.
                let may_look_again = looking.unusable < executor.places();
                return Some(Err(match Box::pin(place.failed(fault, may_look_again)).await {
                    Failed::NotStarted(kept) => {
                        tracing::debug!(target: "offload::call", pid, "offload worker died before it started the call; the call looks for another");
                        looking.unusable += 1;
                        looking.carried = kept;
                        return None;
                    }
                    Failed::Ended(Failure::Stopped) => Error::Shutdown { entry: entry.name() },
                    Failed::Ended(Failure::Crashed { exit, stderr }) => Error::Crashed {
                        entry: entry.name(),
                        pid,
                        exit,
                        stderr,
                        earlier_attempts: Vec::new(),
                    },
                    Failed::Ended(Failure::MemoryLimit { limit }) => {
                        Error::MemoryLimit { entry: entry.name(), pid, limit, earlier_attempts: Vec::new() }
                    }
                    Failed::Ended(Failure::Broken(kind)) => protocol_error(entry, kind),
                    Failed::Ended(Failure::TimedOut { started }) => self.timed_out(started.then_some(pid)),
                    Failed::Ended(Failure::Error(error)) => error,
                }));
            }
        };

        let pid = pid.unwrap_or(placed_pid);
        if pid != placed_pid {
            span.record("pid", pid);
        }
        let result = match tag {
            Tag::Return if body.len() > INLINE_PAYLOAD => {
                // Decoded off the runtime, while the place takes its next call.
                let frame = place.take_reply();
                place.done();
                return Some(
                    decode
                        .decode_off_runtime(frame, range, attached)
                        .await
                        .map_err(|kind| protocol_error(entry, kind)),
                );
            }
            Tag::Return => decode.decode(body, attached).map_err(|kind| protocol_error(entry, kind)),
            Tag::Panicked => Err(match protocol::decode::<PanicReport>(body, Payload::Message) {
                Ok(report) => Error::Panicked {
                    entry: entry.name(),
                    pid,
                    message: report.message,
                    location: report.location,
                },
                Err(kind) => protocol_error(entry, kind),
            }),
            Tag::Fault => Err(protocol_error(
                entry,
                protocol::decode::<protocol::Fault>(body, Payload::Message)
                    .map_or_else(|e| e, ProtocolError::from),
            )),
            Tag::Hello
            | Tag::Call
            | Tag::Log
            | Tag::Bulk
            | Tag::BulkAt
            | Tag::Released
            | Tag::Progress
            | Tag::Batch
            | Tag::Item => {
                place.broke_protocol();
                return Some(Err(protocol_error(
                    entry,
                    ProtocolError::Invalid(format!("unexpected {tag:?} frame")),
                )));
            }
        };
        place.done();
        Some(result)
    }
}

/// What the worker sent during the call: its `tracing` events, or a progress report.
fn forward(entry: &'static Entry, tag: Tag, body: &[u8]) {
    match tag {
        Tag::Progress => match protocol::decode::<protocol::ProgressReport>(body, Payload::Message) {
            Ok(report) => crate::progress::report(crate::progress::Progress {
                entry: entry.name(),
                done: report.done,
                total: report.total,
                message: report.message,
            }),
            Err(_) => {
                tracing::warn!(target: "offload::call", "offload worker sent an unreadable progress frame")
            }
        },
        _ => forward_logs(body),
    }
}

/// Re-emits the events a worker forwarded, inside the current call's span (which carries the
/// function, task id and worker pid), under the target `offload::worker`.
fn forward_logs(body: &[u8]) {
    let Ok(records) = protocol::decode::<Vec<LogRecord>>(body, Payload::Message) else {
        tracing::warn!(target: "offload::call", "offload worker sent an unreadable log frame");
        return;
    };
    for r in records {
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    target: "offload::worker",
                    $level,
                    worker_target = %r.target,
                    fields = %r.fields,
                    "{}",
                    r.message
                )
            };
        }
        // `event!` needs its level as a constant.
        match protocol::level::to_level(r.level) {
            tracing::Level::ERROR => emit!(tracing::Level::ERROR),
            tracing::Level::WARN => emit!(tracing::Level::WARN),
            tracing::Level::INFO => emit!(tracing::Level::INFO),
            tracing::Level::DEBUG => emit!(tracing::Level::DEBUG),
            tracing::Level::TRACE => emit!(tracing::Level::TRACE),
        }
    }
}

/// Runs `future` until `deadline` fires; `None` if the deadline came first.
fn before<F: Future>(deadline: Pin<&mut Sleep>, future: F) -> Before<'_, F> {
    Before { deadline, future }
}

pin_project_lite::pin_project! {
    /// What [`before`] returns: a plain future rather than an `async fn`'s, which would hold
    /// `future` twice (as an argument and as a pinned local), and every call's future grows by
    /// what it holds.
    struct Before<'d, F> {
        deadline: Pin<&'d mut Sleep>,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Before<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Some(out));
        }
        this.deadline.as_mut().poll(cx).map(|()| None)
    }
}

pub(crate) fn protocol_error(entry: &Entry, kind: ProtocolError) -> Error {
    match kind {
        ProtocolError::PayloadTooLarge { what, len, max } => {
            Error::PayloadTooLarge { entry: entry.name(), what, len, max }
        }
        kind => Error::Protocol { entry: entry.name(), kind },
    }
}
