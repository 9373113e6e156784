//! Runtime of [`offload`](https://docs.rs/offload): the pool, the transport and the worker
//! behind `#[offload]`. Depend on the `offload` crate instead; this crate's API is the
//! facade's.
//!
//! Data flows one way, and each module uses only those below it:
//!
//! ```text
//! caller's process                               worker process
//!
//! the #[offload] stub                            worker      pre-main hook, clean start
//!   -> call       what a call is: encoding,        -> serve  handshake, read a call,
//!                 deadline, breaker, fallback,               run it, send the reply
//!                 figures, span, errors            -> logs, progress, cancel, state,
//!   -> executor   the seam: where calls run           api (what the stub's worker side calls)
//!   -> pool       local workers: slots, queue,
//!                 leases, recycling, shutdown
//!   -> supervisor spawn and reap  | transport: one worker's channel
//!   -> remote     (the `nats` feature) other hosts through a broker: caller (a pool's
//!                 places on hosts), link (the connection, the hosts seen), wire (the
//!                 messages); host: serve mode, which runs the calls that come through
//!                 call::run on its own local pools
//!
//! Used by call: breaker, fallback, deadline (the caller's deadlines), progress (the
//! caller's progress callback). On their own: lag (the lag monitor), histogram.
//! Below both sides: socket (send and receive with descriptors), shm (shared buffers),
//! lend (large byte vectors the worker reads from the caller's memory), protocol (frames,
//! their reader, the codec, the worker's environment), registry (the
//! entries, plain static data), settings, stats, stderr_tail, role, error
//! ```
//!
//! Per-process state that goes with an entry (its executor, its breaker) is kept by
//! `call` in a `registry::PerEntry` table; the registry itself holds only what the macro
//! wrote.

#![warn(missing_docs, unreachable_pub)]

mod breaker;
mod call;
mod deadline;
mod error;
mod executor;
mod fallback;
mod gate;
mod histogram;
pub mod lag;
mod lend;
mod map;
mod pool;
mod progress;
mod protocol;
mod registry;
#[cfg(feature = "nats")]
mod remote;
mod role;
mod settings;
mod shm;
mod socket;
mod stats;
mod stderr_tail;
mod stream;
mod transport;
mod worker;

/// For [`SharedSlice`]'s element types: `#[derive(bytemuck::Pod, bytemuck::Zeroable)]`
/// needs bytemuck's `derive` feature in your own dependency on it.
pub use bytemuck;
pub use deadline::{Deadline, with_deadline, with_timeout};
pub use error::{Error, ErrorKind, ExitReason, Payload, ProtocolError};
pub use map::{Map, MapUnordered, map, map_stream};
pub use progress::{Progress, with_progress};
pub use shm::{SharedBytes, SharedSlice};
pub use stats::{BreakerState, HostStats, Latency, PoolStats, RestartCause};
pub use stream::Streamed;
pub use worker::{Cancelled, cancelled, checkpoint, progress, progress_message};

/// A snapshot of every pool started so far in this process, sorted by name: workers alive
/// and busy, queue depth, calls by outcome, worker restarts by cause, circuit breaker states
/// and latency percentiles. Cheap enough to call from a metrics endpoint on every scrape.
pub fn stats() -> Vec<PoolStats> {
    let breakers = call::breaker_states();
    executor::stats(|pool| {
        breakers.iter().filter(|(key, ..)| *key == pool).map(|&(_, name, state)| (name, state)).collect()
    })
}

/// Stops every pool: new calls fail with [`Error::Shutdown`], calls already running get up
/// to `grace` to finish, then their workers are killed (those calls fail with
/// [`Error::Shutdown`] too). Returns once every worker process has exited and been reaped,
/// so nothing is left behind: no process, no socket, no pipe. Calls out on other hosts (the
/// `nats` feature) get the same grace, then end the same way, and their hosts are told to
/// stop them.
///
/// Shutdown is for the whole process and final: pools do not start again.
pub async fn shutdown(grace: std::time::Duration) {
    executor::shutdown(grace).await
}

/// Starts the workers of every pool in this binary now, instead of on first use, and waits
/// until each has completed its handshake. Call it before traffic arrives so that the first
/// calls do not pay for starting processes.
///
/// # Errors
///
/// The first pool that cannot start: [`Error::Config`] for bad settings (a bad `OFFLOAD_*`
/// environment variable, conflicting settings in a shared pool), [`Error::Spawn`] for a
/// worker that did not start.
pub async fn warm_up() -> Result<(), Error> {
    executor::warm_up_all().await
}

/// Whether this process is an offload worker. Workers run offloaded functions only; they
/// never start workers of their own.
pub fn is_worker() -> bool {
    crate::role::is_worker()
}

/// What an argument or return type of an `#[offload]` function must be: it is sent to or
/// from a worker process with serde, so `Serialize + DeserializeOwned + Send + 'static`.
/// Every such type is `Transferable`; there is nothing to implement. A type that is not is
/// a compile error at the type, naming this trait.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot cross the process boundary of an `#[offload]` function",
    label = "this type must be `Serialize + DeserializeOwned + Send + 'static`",
    note = "arguments and return values of `#[offload]` functions are sent to and from a \
            worker process with serde: derive `serde::Serialize` and `serde::Deserialize` \
            for `{Self}`, and own its data (no borrowed references): see `offload::Transferable`"
)]
pub trait Transferable: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}

// `do_not_recommend` makes rustc report the unmet `Transferable` bound, with the message
// above, instead of each serde bound behind it.
#[diagnostic::do_not_recommend]
impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> Transferable for T {}

/// Not public API: what `#[offload]` expansions use. Anything here may change in any release.
///
/// Versioned: the macro of one release names the module of its own release, so an
/// `offload-macros` paired with an `offload-runtime` it was not made for fails to compile
/// (cannot find `__private_v1`) instead of misbehaving. Bump the number, here and in the
/// macro's `paths.rs`, whenever what is in here changes.
#[doc(hidden)]
pub mod __private_v1 {
    pub use linkme;
    pub use serde;
    pub use serde_bytes;

    pub use crate::call::{Args, call, call_keeping_args};
    pub use crate::error::{Error, ProtocolError};
    pub use crate::fallback::{Fallback, ReturnsFuture, ReturnsValue, fallback};
    pub use crate::protocol::{RecvBytes, SendBytes};
    pub use crate::registry::{BuildState, ENTRIES, Entry, Invoke, StateBox};
    pub use crate::stream::stream;
    #[cfg(target_os = "linux")]
    pub use crate::worker::ENTER_WORKER_MODE;
    pub use crate::worker::{
        decode_args, encode_return, encode_return_bytes, stream_items, worker_state, write_garbage_to_channel,
    };
    pub use offload_spec::{Options, Overload, WorkersSpec};

    /// Compile-time check that `T` can be an argument or return type; spanned at the type.
    #[inline(always)]
    pub const fn assert_transferable<T: crate::Transferable>() {}
}
