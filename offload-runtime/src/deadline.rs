//! Deadlines the caller sets around calls, on top of each function's own `timeout`:
//! [`with_timeout`] gives the calls a future makes a timeout of their own, in place of their
//! functions'; [`with_deadline`] bounds everything offloaded inside a scope, such as what is
//! left of a request's budget. Both are task-local: they apply to the calls the future makes
//! while it runs, on this task, and nest (the innermost `with_timeout` applies; the earliest
//! deadline wins).

use std::future::Future;
use std::time::{Duration, Instant};

tokio::task_local! {
    static LIMITS: Limits;
}

/// What the scopes around a call say.
#[derive(Debug, Clone, Copy, Default)]
struct Limits {
    timeout: Option<Duration>,
    deadline: Option<Instant>,
}

fn current() -> Limits {
    LIMITS.try_with(|limits| *limits).unwrap_or_default()
}

/// Runs `future` with `timeout` as the timeout of every offloaded call it makes, in place of
/// each function's own (the attribute's, or its environment override), whether shorter or
/// longer. A [`with_deadline`] around it still bounds the calls.
///
/// ```
/// # mod offload { pub use offload_runtime::*; }
/// # use std::time::Duration;
/// # // Stands in for `#[offload(timeout = "30s")] fn digest(data: Vec<u8>, rounds: u32) -> u64`.
/// # async fn digest(_: Vec<u8>, _: u32) -> Result<u64, offload::Error> { Ok(0) }
/// # async fn run() -> Result<(), offload::Error> {
/// // This one call may take 200 ms at most.
/// let quick = offload::with_timeout(Duration::from_millis(200), digest(vec![1, 2, 3], 3)).await?;
/// # Ok(()) }
/// ```
pub async fn with_timeout<F: Future>(timeout: Duration, future: F) -> F::Output {
    let limits = Limits { timeout: Some(timeout), ..current() };
    LIMITS.scope(limits, future).await
}

/// Runs `future` with a deadline for every offloaded call it makes: each ends by `deadline`
/// at the latest, whatever its own timeout, and one that would start after it fails at once
/// with [`crate::Error::Timeout`]. Nested scopes keep the earliest deadline.
///
/// ```
/// # mod offload { pub use offload_runtime::*; }
/// # use std::time::{Duration, Instant};
/// # // Stand in for two `#[offload]` functions.
/// # async fn resize(image: Vec<u8>) -> Result<Vec<u8>, offload::Error> { Ok(image) }
/// # async fn encode(image: Vec<u8>) -> Result<Vec<u8>, offload::Error> { Ok(image) }
/// # async fn handle(image: Vec<u8>) -> Result<Vec<u8>, offload::Error> {
/// // The whole request has 2 s, however its calls divide it.
/// let budget = Instant::now() + Duration::from_secs(2);
/// offload::with_deadline(budget, async {
///     let small = resize(image).await?;
///     encode(small).await
/// })
/// .await
/// # }
/// ```
pub async fn with_deadline<F: Future>(deadline: Instant, future: F) -> F::Output {
    let outer = current();
    let deadline = outer.deadline.map_or(deadline, |outer| outer.min(deadline));
    LIMITS.scope(Limits { deadline: Some(deadline), ..outer }, future).await
}

/// The scopes around the current task, to carry to the tasks that make its calls for it
/// (the batches of `offload::map`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scopes(Limits);

/// The scopes the calls made now would have.
pub(crate) fn scopes() -> Scopes {
    Scopes(current())
}

impl Scopes {
    /// Runs `future` under these scopes, on whatever task polls it.
    pub(crate) async fn apply<F: Future>(self, future: F) -> F::Output {
        LIMITS.scope(self.0, future).await
    }
}

/// Which deadline a call had, in [`crate::Error::Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deadline {
    /// The function's `timeout` (the attribute's, or its environment override).
    Function,
    /// A [`with_timeout`] around the call.
    Call,
    /// A [`with_deadline`] around the call.
    Scope,
}

impl std::fmt::Display for Deadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Deadline::Function => "the function's timeout",
            Deadline::Call => "the call's timeout",
            Deadline::Scope => "the scope's deadline",
        })
    }
}

/// When a call starting now must end, given its function's `timeout`; how long that is from
/// now, and which deadline it is.
pub(crate) fn for_call(function: Duration) -> (tokio::time::Instant, Duration, Deadline) {
    let limits = current();
    let now = Instant::now();
    let (timeout, mut by) = match limits.timeout {
        Some(timeout) => (timeout, Deadline::Call),
        None => (function, Deadline::Function),
    };
    // A timeout too large to add is as good as none: about thirty years.
    let mut end = now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600));
    if let Some(deadline) = limits.deadline
        && deadline < end
    {
        end = deadline;
        by = Deadline::Scope;
    }
    (tokio::time::Instant::from_std(end), end.saturating_duration_since(now), by)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_innermost_timeout_and_the_earliest_deadline_win() {
        let function = Duration::from_secs(30);
        assert_eq!(for_call(function).2, Deadline::Function);
        let (_, timeout, by) = with_timeout(Duration::from_secs(60), async { for_call(function) }).await;
        assert_eq!((timeout, by), (Duration::from_secs(60), Deadline::Call));
        let soon = Instant::now() + Duration::from_secs(5);
        let later = soon + Duration::from_secs(5);
        let (_, timeout, by) = with_deadline(soon, async {
            with_deadline(later, async {
                with_timeout(Duration::from_secs(60), async { for_call(function) }).await
            })
            .await
        })
        .await;
        assert_eq!(by, Deadline::Scope);
        assert!(timeout <= Duration::from_secs(5), "{timeout:?}");
        let (_, timeout, by) = with_deadline(later, async {
            with_timeout(Duration::from_millis(200), async { for_call(function) }).await
        })
        .await;
        assert_eq!((timeout, by), (Duration::from_millis(200), Deadline::Call));
    }
}
