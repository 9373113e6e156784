//! Runtime diagnostics: [`LagMonitor`] measures event-loop lag, how late the async runtime
//! runs a task that is ready to run. Lag is what code that blocks a runtime thread costs
//! every other task on it: a CPU-heavy loop, a synchronous file read, a `std::sync::Mutex`
//! held too long, a `std::thread::sleep`.
//!
//! # Example
//!
//! ```
//! # mod offload { pub use offload_runtime::lag; }
//! use std::time::Duration;
//!
//! use offload::lag::LagMonitor;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! // Inside the runtime, once, at startup.
//! let monitor = LagMonitor::builder()
//!     .interval(Duration::from_millis(10))
//!     .threshold(Duration::from_millis(100))
//!     .start();
//!
//! // ... serve traffic ...
//! # tokio::time::sleep(Duration::from_millis(30)).await;
//!
//! let stats = monitor.stats();
//! println!(
//!     "lag p50 {:?}, p99 {:?}, max {:?}; {} of {} ticks over the threshold",
//!     stats.p50, stats.p99, stats.max, stats.over_threshold, stats.samples
//! );
//! # });
//! ```
//!
//! # How it measures
//!
//! The monitor spawns one probe task that sleeps until the next tick, then records how late
//! it woke: `now - tick`. An idle runtime wakes it within about a millisecond (the timer's
//! resolution); a runtime whose thread is busy in synchronous code cannot run it until that
//! code returns, so the lateness is how long the thread was blocked. Each tick costs one timer
//! wake-up and a few atomic adds; nothing is allocated per tick.
//!
//! On a multi-thread runtime, an idle worker thread may run the probe while another is
//! blocked, so lag shows how starved the runtime as a whole is rather than every blocked
//! thread; tasks queued on the blocked thread still wait. For a precise signal, run the
//! monitor in a test or staging build on a `current_thread` runtime.
//!
//! # Finding code that blocks the runtime
//!
//! 1. Start a monitor at startup and keep its handle for the life of the service.
//! 2. Install a `tracing` subscriber that shows the target `offload::lag` at `warn`.
//!    A tick later than the threshold logs a warning with the lag and the threshold (at most
//!    one a second; the next one says how many were suppressed). The warning is logged when
//!    the blocking code has *returned*, so the culprit is whatever ran on that thread during
//!    the `lag` just before it: look at the spans and events logged in that window (span
//!    timings of a subscriber such as `tracing-subscriber`'s `FmtSpan::CLOSE` make long
//!    synchronous sections stand out).
//! 3. Export [`LagMonitor::stats`] with your metrics to see lag under real load, and whether a
//!    fix brought p99 and max down.
//! 4. Move the blocking code off the runtime: a CPU-heavy function into an `#[offload]`
//!    function (a worker process: isolated, killable on timeout), or short blocking calls
//!    into `tokio::task::spawn_blocking`; replace blocking I/O with its async counterpart.
//!
//! [`tokio-console`](https://github.com/tokio-rs/console) complements the monitor: it shows,
//! per task, poll durations and how long tasks wait to be scheduled, so it names the task
//! that blocks, at the cost of instrumenting the runtime (`tokio_unstable`). The monitor is
//! cheap enough to leave on in production and tells you *when*; the console tells you *who*.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::histogram::Histogram;

/// How often the probe wakes unless set: 10 ms.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
/// Lag above which a tick counts as blocked and warns unless set: 100 ms, like asyncio's
/// `slow_callback_duration`.
const DEFAULT_THRESHOLD: Duration = Duration::from_millis(100);
/// Shortest interval: the resolution of tokio's timer.
const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// Longest interval; longer ones would miss nearly every block.
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// At most one warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Measures event-loop lag on the runtime it was started on, until it is stopped or dropped.
/// See the [module documentation](self) for how to use it to find code that blocks the
/// runtime.
///
/// Dropping the monitor stops it, so keep it for as long as you want measurements, e.g. in
/// `main` or in the state of your service.
#[must_use = "dropping a `LagMonitor` stops it"]
pub struct LagMonitor {
    shared: Arc<Shared>,
    probe: AbortHandle,
    interval: Duration,
    threshold: Duration,
}

/// What the monitor handle and its probe task share.
struct Shared {
    lag: Histogram,
    over_threshold: AtomicU64,
}

impl LagMonitor {
    /// Starts a monitor on the current runtime with the default settings: a tick every
    /// 10 ms, a warning for ticks more than 100 ms late. See [`LagMonitorBuilder`] to change
    /// them.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`; see [`LagMonitorBuilder::start_on`].
    pub fn start() -> LagMonitor {
        LagMonitor::builder().start()
    }

    /// Settings for a monitor, to start with [`LagMonitorBuilder::start`].
    pub fn builder() -> LagMonitorBuilder {
        LagMonitorBuilder::default()
    }

    /// Figures since the monitor started. Cheap enough to call every few seconds to export;
    /// it copies the monitor's histogram (about 10 KiB).
    pub fn stats(&self) -> LagStats {
        let lag = self.shared.lag.snapshot();
        LagStats {
            samples: lag.count(),
            max: lag.max(),
            p50: lag.quantile(0.50),
            p90: lag.quantile(0.90),
            p99: lag.quantile(0.99),
            over_threshold: self.shared.over_threshold.load(Ordering::Relaxed),
        }
    }

    /// Stops the probe task. [`stats`](Self::stats) still reports what was measured; calling
    /// `stop` again does nothing.
    pub fn stop(&self) {
        self.probe.abort();
    }

    /// Whether the probe task still runs: `false` after [`stop`](Self::stop), or once its
    /// runtime has shut down.
    pub fn is_running(&self) -> bool {
        !self.probe.is_finished()
    }
}

impl Drop for LagMonitor {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

impl fmt::Debug for LagMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LagMonitor")
            .field("interval", &self.interval)
            .field("threshold", &self.threshold)
            .field("running", &self.is_running())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Settings of a [`LagMonitor`]: `LagMonitor::builder().interval(..).threshold(..).start()`.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start`"]
pub struct LagMonitorBuilder {
    interval: Duration,
    threshold: Duration,
}

impl Default for LagMonitorBuilder {
    fn default() -> LagMonitorBuilder {
        LagMonitorBuilder { interval: DEFAULT_INTERVAL, threshold: DEFAULT_THRESHOLD }
    }
}

impl LagMonitorBuilder {
    /// How often the probe wakes (default 10 ms), clamped to 1 ms ..= 60 s.
    ///
    /// Shorter intervals catch shorter blocks and give more samples, at one timer wake-up
    /// each (a few microseconds of CPU); a block shorter than the interval is seen only if a
    /// tick falls due while it runs, and then as less than its full length. 10 ms costs well
    /// under 0.1 % of a core and catches every block longer than the default threshold.
    pub fn interval(mut self, interval: Duration) -> LagMonitorBuilder {
        self.interval = interval.clamp(MIN_INTERVAL, MAX_INTERVAL);
        self
    }

    /// Lag above which a tick counts in [`LagStats::over_threshold`] and logs a warning
    /// (default 100 ms, asyncio's `slow_callback_duration`). Warnings are rate-limited to one
    /// a second; `Duration::MAX` turns them off.
    pub fn threshold(mut self, threshold: Duration) -> LagMonitorBuilder {
        self.threshold = threshold;
        self
    }

    /// Starts the monitor on the current runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`; use [`start_on`](Self::start_on) there.
    pub fn start(self) -> LagMonitor {
        self.start_on(&Handle::current())
    }

    /// Starts the monitor on the runtime of `handle`, from inside or outside a runtime. The
    /// runtime needs its time driver (`enable_time` or `enable_all`).
    pub fn start_on(self, handle: &Handle) -> LagMonitor {
        let shared = Arc::new(Shared { lag: Histogram::new(), over_threshold: AtomicU64::new(0) });
        let (interval, threshold) = (self.interval, self.threshold);
        tracing::debug!(target: "offload::lag", ?interval, ?threshold, "lag monitor started");
        let probe = handle.spawn(probe(Arc::clone(&shared), interval, threshold)).abort_handle();
        LagMonitor { shared, probe, interval, threshold }
    }
}

/// Event-loop lag measured by a [`LagMonitor`] since it started. Durations other than `max`
/// come from a log-linear histogram and may read up to 3.2 % high, never low.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LagStats {
    /// Ticks measured.
    pub samples: u64,
    /// Largest lag, exact: roughly the longest the runtime was blocked.
    pub max: Duration,
    /// Median lag; about the timer's resolution (a millisecond) on a healthy runtime.
    pub p50: Duration,
    /// 90th percentile lag.
    pub p90: Duration,
    /// 99th percentile lag.
    pub p99: Duration,
    /// Ticks later than the threshold.
    pub over_threshold: u64,
}

/// The probe task: wakes every `interval` and records how late it woke. Ends when aborted,
/// or dropped with its runtime.
async fn probe(shared: Arc<Shared>, interval: Duration, threshold: Duration) {
    let mut due = Instant::now() + interval;
    // One timer, reset each tick: nothing is allocated per tick.
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(due));
    let mut last_warning: Option<Instant> = None;
    let mut suppressed = 0u64;
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        let lag = now.saturating_duration_since(due);
        shared.lag.record(lag);
        if lag > threshold {
            shared.over_threshold.fetch_add(1, Ordering::Relaxed);
            if last_warning.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY) {
                tracing::warn!(target: "offload::lag",
                    ?lag,
                    ?threshold,
                    suppressed,
                    "runtime lag over threshold: a task blocked a runtime thread"
                );
                last_warning = Some(now);
                suppressed = 0;
            } else {
                suppressed += 1;
            }
        }
        // The next tick is an interval after this one ran, not after it was due: after a
        // block, ticks that fell due meanwhile are skipped rather than recorded in a burst.
        due = now + interval;
        sleep.as_mut().reset(due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    /// Counts the warnings of this module and keeps the `suppressed` field of each.
    #[derive(Default)]
    struct Warnings {
        suppressed: Mutex<Vec<u64>>,
        spans: AtomicUsize,
    }

    struct Suppressed(Option<u64>);

    impl Visit for Suppressed {
        fn record_u64(&mut self, field: &Field, value: u64) {
            if field.name() == "suppressed" {
                self.0 = Some(value);
            }
        }

        fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {}
    }

    impl Subscriber for &'static Warnings {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(self.spans.fetch_add(1, Ordering::Relaxed) as u64 + 1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &Event<'_>) {
            let meta = event.metadata();
            if *meta.level() == Level::WARN && meta.target() == "offload::lag" {
                let mut visitor = Suppressed(None);
                event.record(&mut visitor);
                self.suppressed.lock().unwrap().push(visitor.0.expect("warning has `suppressed`"));
            }
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    /// Waits, yielding to the probe, until it has recorded more than `samples` ticks.
    async fn ticks_past(monitor: &LagMonitor, samples: u64) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while monitor.stats().samples <= samples {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        waited.await.expect("the probe ticks");
    }

    #[test]
    fn warnings_are_rate_limited() {
        let warnings: &'static Warnings = Box::leak(Box::default());
        let rt = current_thread();
        tracing::subscriber::with_default(warnings, || {
            rt.block_on(async {
                let monitor = LagMonitor::builder()
                    .interval(Duration::from_millis(5))
                    .threshold(Duration::from_millis(40))
                    .start();
                ticks_past(&monitor, 0).await;
                // Three blocks within a second: one warning, two suppressed.
                for _ in 0..3 {
                    let before = monitor.stats().samples;
                    std::thread::sleep(Duration::from_millis(100));
                    ticks_past(&monitor, before).await;
                }
                assert!(monitor.stats().over_threshold >= 3, "{:?}", monitor.stats());
                assert_eq!(*warnings.suppressed.lock().unwrap(), [0]);
                // A second later the next block warns again and reports the suppressed ones.
                tokio::time::sleep(WARN_EVERY).await;
                let before = monitor.stats().samples;
                std::thread::sleep(Duration::from_millis(100));
                ticks_past(&monitor, before).await;
                let seen = warnings.suppressed.lock().unwrap().clone();
                assert_eq!(seen.len(), 2, "{seen:?}");
                assert!(seen[1] >= 2, "{seen:?}");
            })
        });
    }

    #[test]
    fn drop_ends_the_probe() {
        let rt = current_thread();
        rt.block_on(async {
            let monitor = LagMonitor::builder().interval(Duration::from_millis(1)).start();
            ticks_past(&monitor, 0).await;
            let shared = Arc::clone(&monitor.shared);
            drop(monitor);
            // The aborted task drops its future, and with it its reference, when next polled.
            tokio::time::timeout(Duration::from_secs(10), async {
                while Arc::strong_count(&shared) > 1 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the probe ends");
        });
    }

    #[test]
    fn the_probe_ends_with_its_runtime() {
        let rt = current_thread();
        // Started from outside the runtime.
        let monitor = LagMonitor::builder().interval(Duration::from_millis(1)).start_on(rt.handle());
        rt.block_on(ticks_past(&monitor, 2));
        assert!(monitor.is_running());
        drop(rt);
        assert!(!monitor.is_running());
        assert!(monitor.stats().samples > 2);
        monitor.stop();
        drop(monitor);
    }

    #[test]
    fn settings_are_clamped() {
        let zero = LagMonitor::builder().interval(Duration::ZERO);
        assert_eq!(zero.interval, MIN_INTERVAL);
        let huge = LagMonitor::builder().interval(Duration::MAX).threshold(Duration::MAX);
        assert_eq!(huge.interval, MAX_INTERVAL);
        let rt = current_thread();
        rt.block_on(async {
            // A far threshold never counts; a far interval does not overflow the clock.
            let monitor = huge.start();
            tokio::task::yield_now().await;
            assert_eq!(monitor.stats(), LagStats::default());
            assert!(monitor.is_running());
        });
    }
}
