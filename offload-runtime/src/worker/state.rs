//! Per-worker state (`state = path`): built once, when the worker starts and before it says
//! hello, so that no call waits for it, and kept for the life of the worker. A builder that
//! panics makes the worker fail to start: the parent reports that as `Error::Spawn`, with
//! the panic's message from the worker's stderr.

use std::any::Any;
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};

use crate::error::ProtocolError;
use crate::registry::{Entry, Registry};

thread_local! {
    /// Each entry's state, by entry key. Leaked: a state lives as long as its worker, and the
    /// function gets it as a `&'static` reference.
    static STATES: RefCell<Vec<(&'static str, &'static dyn Any)>> = const { RefCell::new(Vec::new()) };
}

/// Builds the state of every entry of the pool whose key is `pool` that has one. An error names the entry
/// and says what its builder's panic said.
pub(super) fn build_all(pool: &str) -> Result<(), String> {
    for entry in Registry::get().entries().filter(|e| e.pool_key() == pool) {
        let Some(build) = entry.state else { continue };
        // The panic's message and place go into one line of the error, which reaches the
        // caller; the default hook's report (a backtrace, maybe) would push it out of the
        // stderr lines the parent keeps.
        let location = std::sync::Arc::new(std::sync::Mutex::new(None));
        let theirs = std::sync::Arc::clone(&location);
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            *theirs.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                info.location().map(|l| l.to_string());
        }));
        let built = panic::catch_unwind(AssertUnwindSafe(build));
        panic::set_hook(previous);
        let state = built.map_err(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "Box<dyn Any>".to_owned());
            let at = location.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            let at = at.map(|l| format!(" at {l}")).unwrap_or_default();
            format!("the state of `{}` could not be built: its builder panicked{at}: {message}", entry.name())
        })?;
        let state: &'static dyn Any = Box::leak(state);
        STATES.with(|states| states.borrow_mut().push((entry.key, state)));
    }
    Ok(())
}

/// The state this worker built for `entry`. Not public API: the macro's worker side calls it.
pub fn worker_state<T: 'static>(entry: &'static Entry) -> Result<&'static T, ProtocolError> {
    let found =
        STATES.with(|states| states.borrow().iter().find(|(key, _)| *key == entry.key).map(|(_, s)| *s));
    found
        .and_then(<dyn Any>::downcast_ref::<T>)
        .ok_or_else(|| ProtocolError::Invalid(format!("this worker has no state for `{}`", entry.name())))
}
