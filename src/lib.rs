#![doc = include_str!("../README.md")]
#![warn(missing_docs, unreachable_pub)]
#![doc(test(attr(deny(warnings))))]

#[doc(inline)]
pub use offload_macros::offload;
pub use offload_runtime::{
    BreakerState, Cancelled, Deadline, Error, ErrorKind, ExitReason, HostStats, Latency, Map, MapUnordered,
    Payload, PoolStats, Progress, ProtocolError, RestartCause, SharedBytes, SharedSlice, Streamed,
    Transferable, bytemuck, cancelled, checkpoint, is_worker, map, map_stream, progress, progress_message,
    shutdown, stats, warm_up, with_deadline, with_progress, with_timeout,
};

#[doc(inline)]
pub use offload_runtime::lag;

/// Not public API: what `#[offload]` expansions use. Anything here may change in any release.
#[doc(hidden)]
pub mod __private_v1 {
    pub use offload_runtime::__private_v1::*;
}

// Lets `#[offload]` in this crate's own unit tests name the crate as users do.
#[cfg(test)]
extern crate self as offload;

#[cfg(test)]
mod tests {
    use crate::offload;

    #[offload(workers = "1", timeout = "20s")]
    fn in_a_worker() -> (bool, u32) {
        (crate::is_worker(), std::process::id())
    }

    /// Offloaded functions work in a library's own `#[tokio::test]` unit tests: the unit
    /// test binary re-executes itself as the worker like any other.
    #[tokio::test]
    async fn works_in_unit_tests() {
        let (is_worker, pid) = in_a_worker().await.unwrap();
        assert!(is_worker);
        assert_ne!(pid, std::process::id());
    }
}
