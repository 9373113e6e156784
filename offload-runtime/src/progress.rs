//! Progress of long calls, as the caller sees it: [`with_progress`] runs a future with a
//! callback that gets each [`Progress`] its offloaded calls report (the function reports it
//! with `offload::progress` in the worker). Each report is also a `tracing` event, at
//! `debug`, in the call's span.

use std::cell::RefCell;
use std::future::Future;

tokio::task_local! {
    static ON_PROGRESS: RefCell<Box<dyn FnMut(Progress) + Send>>;
}

/// How far a running call is, as its function last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// The offloaded function.
    pub entry: &'static str,
    /// Work done so far, in the function's own units.
    pub done: u64,
    /// All the work, in the same units.
    pub total: u64,
    /// What the function said with it, if anything.
    pub message: Option<String>,
}

impl Progress {
    /// `done / total`, from 0.0 to 1.0 (1.0 when `total` is 0).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 { 1.0 } else { (self.done as f64 / self.total as f64).min(1.0) }
    }
}

/// Runs `future`, calling `on_progress` with each progress report of the offloaded calls it
/// makes, in the order they come, on the caller's task, before the call's result. Reports
/// are rate-limited in the worker (about 50 a second per call, and always the last), so a
/// callback may do real work, such as drawing a progress bar.
///
/// ```
/// # mod offload { pub use offload_runtime::*; }
/// # // Stands in for an `#[offload]` function that calls `offload::progress`.
/// # async fn crunch(_: u64) -> Result<u64, offload::Error> { Ok(0) }
/// # async fn run() -> Result<(), offload::Error> {
/// let answer = offload::with_progress(
///     |p: offload::Progress| println!("{:.0}%", p.fraction() * 100.0),
///     crunch(1_000_000),
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub async fn with_progress<F: Future>(
    on_progress: impl FnMut(Progress) + Send + 'static,
    future: F,
) -> F::Output {
    ON_PROGRESS.scope(RefCell::new(Box::new(on_progress)), future).await
}

/// Hands a report to the callback around the call, if there is one, and logs it.
pub(crate) fn report(progress: Progress) {
    tracing::debug!(
        target: "offload::call",
        done = progress.done,
        total = progress.total,
        note = progress.message.as_deref().unwrap_or(""),
        "offload progress"
    );
    let _ = ON_PROGRESS.try_with(|callback| {
        if let Ok(mut callback) = callback.try_borrow_mut() {
            callback(progress);
        }
    });
}
