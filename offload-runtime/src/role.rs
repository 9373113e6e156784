//! Whether this process is an offload worker: set once, before `main`, by the worker's
//! entry hook; read by the caller side (a worker never starts workers) and by shared
//! buffers (a worker unmaps them after its reply, not during the call). Whether it serves
//! other hosts' calls: then its pools are local whatever `OFFLOAD_REMOTE` says.

use std::sync::atomic::{AtomicBool, Ordering};

static IS_WORKER: AtomicBool = AtomicBool::new(false);
static IS_SERVING: AtomicBool = AtomicBool::new(false);

/// Whether this process serves other hosts' calls (`OFFLOAD_SERVE`): its pools are local.
pub(crate) fn is_serving() -> bool {
    IS_SERVING.load(Ordering::Relaxed)
}

/// Marks this process as a host serving other hosts' calls, for the rest of its life.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) fn become_host() {
    IS_SERVING.store(true, Ordering::Relaxed);
}

pub(crate) fn is_worker() -> bool {
    IS_WORKER.load(Ordering::Relaxed)
}

/// Marks this process as a worker, for the rest of its life.
pub(crate) fn become_worker() {
    IS_WORKER.store(true, Ordering::Relaxed);
}
