//! Whether this process is an offload worker: set once, before `main`, by the worker's
//! entry hook; read by the caller side (a worker never starts workers) and by shared
//! buffers (a worker unmaps them after its reply, not during the call).

use std::sync::atomic::{AtomicBool, Ordering};

static IS_WORKER: AtomicBool = AtomicBool::new(false);

pub(crate) fn is_worker() -> bool {
    IS_WORKER.load(Ordering::Relaxed)
}

/// Marks this process as a worker, for the rest of its life.
pub(crate) fn become_worker() {
    IS_WORKER.store(true, Ordering::Relaxed);
}
