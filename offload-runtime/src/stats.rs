//! Per-pool figures: calls by outcome, worker restarts by cause, latency percentiles.
//! Recorded with relaxed atomics on the call path; read by [`crate::stats`] as a snapshot.
//! With the `metrics` feature the same figures also go to the `metrics` facade.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorKind;
use crate::histogram::Histogram;

/// The state of a circuit breaker, as [`crate::stats`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through; this many worker-side failures in a row so far.
    Closed {
        /// Consecutive worker-side failures.
        failures: u32,
    },
    /// Calls are refused with `Error::CircuitOpen` until the reset period ends.
    Open,
    /// The reset period ended: one trial call is (or may be) in flight.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreakerState::Closed { .. } => f.write_str("closed"),
            BreakerState::Open => f.write_str("open"),
            BreakerState::HalfOpen => f.write_str("half-open"),
        }
    }
}

/// Why a worker was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RestartCause {
    /// A call ran past its deadline; the worker was killed.
    Timeout,
    /// The worker died mid-call.
    Crashed,
    /// The worker ran past its memory limit.
    MemoryLimit,
    /// The worker broke the protocol; it was killed.
    Protocol,
    /// The caller dropped a running call; the worker was killed.
    Abandoned,
    /// The worker died while idle.
    DiedIdle,
    /// `max_tasks` or `max_rss` retired it.
    Recycled,
}

impl RestartCause {
    const ALL: [RestartCause; 7] = [
        RestartCause::Timeout,
        RestartCause::Crashed,
        RestartCause::MemoryLimit,
        RestartCause::Protocol,
        RestartCause::Abandoned,
        RestartCause::DiedIdle,
        RestartCause::Recycled,
    ];

    /// A short name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartCause::Timeout => "timeout",
            RestartCause::Crashed => "crashed",
            RestartCause::MemoryLimit => "memory_limit",
            RestartCause::Protocol => "protocol",
            RestartCause::Abandoned => "abandoned",
            RestartCause::DiedIdle => "died_idle",
            RestartCause::Recycled => "recycled",
        }
    }
}

/// Counters and histograms of one pool.
pub(crate) struct PoolMetrics {
    submitted: AtomicU64,
    succeeded: AtomicU64,
    cancelled: AtomicU64,
    sent_ahead: AtomicU64,
    withdrawn: AtomicU64,
    lent: AtomicU64,
    failed: [AtomicU64; ErrorKind::COUNT],
    restarts: [AtomicU64; RestartCause::ALL.len()],
    queue_wait: Histogram,
    run_time: Histogram,
    total: Histogram,
    #[cfg(feature = "metrics")]
    pool: &'static str,
}

impl PoolMetrics {
    pub(crate) fn new(#[allow(unused_variables)] pool: &'static str) -> PoolMetrics {
        PoolMetrics {
            submitted: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            sent_ahead: AtomicU64::new(0),
            withdrawn: AtomicU64::new(0),
            lent: AtomicU64::new(0),
            failed: std::array::from_fn(|_| AtomicU64::new(0)),
            restarts: std::array::from_fn(|_| AtomicU64::new(0)),
            queue_wait: Histogram::new(),
            run_time: Histogram::new(),
            total: Histogram::new(),
            #[cfg(feature = "metrics")]
            pool,
        }
    }

    pub(crate) fn submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("offload_calls_submitted_total", "pool" => self.pool).increment(1);
    }

    /// Records how a submitted call ended. `queue_wait` and `run_time` are `None` for the
    /// phases it never reached.
    pub(crate) fn finished(
        &self,
        outcome: Result<(), ErrorKind>,
        queue_wait: Option<Duration>,
        run_time: Option<Duration>,
        total: Duration,
    ) {
        match outcome {
            Ok(()) => self.succeeded.fetch_add(1, Ordering::Relaxed),
            Err(kind) => self.failed[kind as usize].fetch_add(1, Ordering::Relaxed),
        };
        if let Some(wait) = queue_wait {
            self.queue_wait.record(wait);
        }
        if let Some(run) = run_time {
            self.run_time.record(run);
        }
        self.total.record(total);
        #[cfg(feature = "metrics")]
        {
            let outcome = match outcome {
                Ok(()) => "ok",
                Err(kind) => kind.as_str(),
            };
            metrics::counter!("offload_calls_finished_total", "pool" => self.pool, "outcome" => outcome)
                .increment(1);
            if let Some(wait) = queue_wait {
                metrics::histogram!("offload_queue_wait_seconds", "pool" => self.pool)
                    .record(wait.as_secs_f64());
            }
            if let Some(run) = run_time {
                metrics::histogram!("offload_run_time_seconds", "pool" => self.pool)
                    .record(run.as_secs_f64());
            }
            metrics::histogram!("offload_call_seconds", "pool" => self.pool).record(total.as_secs_f64());
        }
    }

    /// A call was written behind a busy worker's call.
    pub(crate) fn sent_ahead(&self) {
        self.sent_ahead.fetch_add(1, Ordering::Relaxed);
    }

    /// A call sent ahead was taken back before it started.
    pub(crate) fn withdrawn(&self) {
        self.withdrawn.fetch_add(1, Ordering::Relaxed);
    }

    /// A call's large byte vectors were lent to its worker.
    pub(crate) fn lent(&self) {
        self.lent.fetch_add(1, Ordering::Relaxed);
    }

    /// A call whose future was dropped before it ended.
    pub(crate) fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("offload_calls_finished_total", "pool" => self.pool, "outcome" => "cancelled")
            .increment(1);
    }

    pub(crate) fn restarted(&self, cause: RestartCause) {
        let index = RestartCause::ALL.iter().position(|&c| c == cause).expect("listed");
        self.restarts[index].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("offload_worker_restarts_total", "pool" => self.pool, "cause" => cause.as_str())
            .increment(1);
    }

    pub(crate) fn snapshot(
        &self,
        shape: PoolShape,
        breakers: Vec<(&'static str, BreakerState)>,
    ) -> PoolStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolStats {
            name: shape.name,
            workers: shape.workers,
            alive: shape.alive,
            busy: shape.busy,
            queued: shape.queued,
            hosts: shape.hosts,
            submitted: load(&self.submitted),
            succeeded: load(&self.succeeded),
            cancelled: load(&self.cancelled),
            sent_ahead: load(&self.sent_ahead),
            withdrawn: load(&self.withdrawn),
            lent: load(&self.lent),
            failed: std::array::from_fn(|i| load(&self.failed[i])),
            restarts: std::array::from_fn(|i| load(&self.restarts[i])),
            breakers,
            queue_wait: Latency::of(&self.queue_wait),
            run_time: Latency::of(&self.run_time),
            total: Latency::of(&self.total),
        }
    }
}

/// What the pool reports about its workers at snapshot time.
pub(crate) struct PoolShape {
    pub(crate) name: &'static str,
    pub(crate) workers: usize,
    pub(crate) alive: usize,
    pub(crate) busy: usize,
    pub(crate) queued: usize,
    /// For a pool whose calls go to other hosts: each host.
    pub(crate) hosts: Vec<HostStats>,
}

/// One host that serves a pool's calls (`OFFLOAD_REMOTE`), as [`PoolStats::hosts`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostStats {
    /// Its name: `hostname (pid N)`.
    pub name: String,
    /// How many of the pool's calls it takes at once: its workers, and one more.
    pub slots: usize,
    /// This process's calls it holds now.
    pub running: usize,
    /// This process's calls sent to it so far (counting a call again when it was sent again).
    pub calls: u64,
}

/// A snapshot of one pool, from [`crate::stats`].
///
/// Counters only grow. `submitted` equals `succeeded + failed_total() + cancelled` plus the
/// calls in flight.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolStats {
    /// The pool's name, or the function's path for a pool of its own.
    pub name: &'static str,
    /// The configured number of workers.
    pub workers: usize,
    /// Workers running now, idle or busy.
    pub alive: usize,
    /// Workers running a call now.
    pub busy: usize,
    /// Calls waiting for a worker now.
    pub queued: usize,
    /// For a pool whose calls go to other hosts (`OFFLOAD_REMOTE`): the hosts of this build
    /// heard from, sorted by name; `workers`, `alive` and `busy` then count their slots.
    /// Empty for a local pool.
    pub hosts: Vec<HostStats>,
    /// Calls submitted to this pool.
    pub submitted: u64,
    /// Calls that returned the function's value.
    pub succeeded: u64,
    /// Calls whose future was dropped before they ended.
    pub cancelled: u64,
    /// Calls written to a busy worker behind the call it ran (up to 32 at a time), to start
    /// as soon as it answered (small calls, when no worker was free; see the README's
    /// "Pipelining"). Counted as a call's frame is written to the worker's socket: past the
    /// first two, calls sent ahead wait in the caller until then, and one taken back while
    /// it waits there is counted in neither this nor `withdrawn`.
    pub sent_ahead: u64,
    /// Calls written ahead and taken back before they started: a call before failed, the
    /// call's deadline passed or its future was dropped, another worker became free, the
    /// call before ran for 100 ms while another worker was free or ran short calls, a call
    /// that cannot go ahead waited, the worker was due for recycling, or the pool shut down.
    /// Each looked for a worker again, or ended, as if it had waited in the queue.
    pub withdrawn: u64,
    /// Calls whose large byte-vector arguments (`Vec<u8>` of 64 KiB or more) the worker read
    /// straight from this process's memory rather than through the socket: zero where the
    /// system does not let a worker read its parent's memory (see the README's "Large byte
    /// vectors").
    pub lent: u64,
    failed: [u64; ErrorKind::COUNT],
    restarts: [u64; RestartCause::ALL.len()],
    /// Circuit breaker state of each function in the pool that has one.
    pub breakers: Vec<(&'static str, BreakerState)>,
    /// Time from submission until a worker took the call.
    pub queue_wait: Latency,
    /// Time a worker spent on the call, round trip included.
    pub run_time: Latency,
    /// Time from submission to the answer.
    pub total: Latency,
}

impl PoolStats {
    /// Calls that failed with this kind of error.
    pub fn failed(&self, kind: ErrorKind) -> u64 {
        self.failed[kind as usize]
    }

    /// Calls that failed, all kinds together.
    pub fn failed_total(&self) -> u64 {
        self.failed.iter().sum()
    }

    /// Workers replaced for this cause.
    pub fn restarts(&self, cause: RestartCause) -> u64 {
        RestartCause::ALL.iter().position(|&c| c == cause).map_or(0, |i| self.restarts[i])
    }

    /// Workers replaced, all causes together.
    pub fn restarts_total(&self) -> u64 {
        self.restarts.iter().sum()
    }
}

/// Percentiles of one latency, from a log-linear histogram (a few percent of error).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Latency {
    fn of(histogram: &Histogram) -> Latency {
        let snapshot = histogram.snapshot();
        Latency {
            count: snapshot.count(),
            p50: snapshot.quantile(0.50),
            p90: snapshot.quantile(0.90),
            p99: snapshot.quantile(0.99),
            max: snapshot.max(),
        }
    }
}
