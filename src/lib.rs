#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub)]
#![doc(test(attr(deny(warnings))))]

#[doc(inline)]
pub use offload_macros::offload;
pub use offload_runtime::{
    BreakerState, Error, ErrorKind, ExitReason, Latency, Payload, PoolStats, ProtocolError, RestartCause,
    SharedBytes, SharedSlice, bytemuck, is_worker, shutdown, stats, warm_up,
};

#[doc(inline)]
pub use offload_runtime::lag as diagnostics;

/// Not public API: what `#[offload]` expansions use. Anything here may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use offload_runtime::__private::*;
}
