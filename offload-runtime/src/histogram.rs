//! A concurrent latency histogram: durations counted in fixed log-linear buckets with relaxed
//! atomics, so recording is lock-free and costs a few nanoseconds.
//!
//! # Buckets and error bound
//!
//! Values are nanoseconds. Below 64 ns every value has a bucket of its own (exact). Above,
//! each power-of-two range `[2^k, 2^(k+1))` is split into 32 equal sub-buckets (the layout of
//! HdrHistogram with 5 significant bits), so a bucket is never wider than 1/32 of its lower
//! bound. A value `v` therefore lands in a bucket whose bounds `lo ..= hi` satisfy
//! `lo <= v <= hi < lo * (1 + 1/32)`: the relative error of anything read back from a bucket
//! is under 3.125 % ([`RELATIVE_ERROR`]).
//!
//! The buckets cover 0 to 2^42 ns (about 73 minutes) in 1216 counters (9.5 KiB). Longer
//! durations are counted in the top bucket; [`HistogramSnapshot::max`] stays exact for them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two, as a power of two: 32 sub-buckets.
const SUB_BITS: u32 = 5;
/// Sub-buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Values below `2^MAX_BITS` ns get buckets of their own; larger ones share the top bucket.
const MAX_BITS: u32 = 42;
/// The largest value with a bucket of its own, in nanoseconds.
const HIGHEST: u64 = (1 << MAX_BITS) - 1;
/// How many buckets cover `0 ..= HIGHEST`: one linear run of `2 * SUB` exact buckets, then
/// `SUB` buckets for each further power of two.
const BUCKETS: usize = ((MAX_BITS - SUB_BITS + 1) as usize) << SUB_BITS;

/// Upper bound of the relative error of a value read back from a bucket
/// ([`HistogramSnapshot::quantile`]): the reported value `r` for a recorded value `v`
/// satisfies `v <= r < v * (1 + RELATIVE_ERROR)`.
#[allow(dead_code, reason = "documents the bound; used by tests and for callers that report it")]
pub(crate) const RELATIVE_ERROR: f64 = 1.0 / SUB as f64;

/// A latency histogram that many threads can record into at once.
///
/// [`record`](Histogram::record) is one relaxed `fetch_add` on the bucket, one on the sum,
/// and a `fetch_max` only when the value is a new maximum; no lock, no allocation. Reading is
/// by [`snapshot`](Histogram::snapshot), which copies the counters.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
    /// Sum of all recorded values in nanoseconds; wraps after about 584 years in total.
    sum: AtomicU64,
    /// Largest recorded value in nanoseconds, exact (not bucketed).
    max: AtomicU64,
}

impl Histogram {
    /// An empty histogram.
    pub(crate) fn new() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    /// Counts one duration. Durations past the covered range (about 73 minutes) are counted
    /// in the top bucket, and saturate at `u64::MAX` nanoseconds for the max and the sum.
    #[inline]
    pub(crate) fn record(&self, value: Duration) {
        let nanos = nanos(value);
        self.buckets[index(nanos)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(nanos, Ordering::Relaxed);
        // Most values are not a new maximum: a plain load keeps the line shared between cores.
        if nanos > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(nanos, Ordering::Relaxed);
        }
    }

    /// A copy of the counters. Values recorded while it is taken may be missing from it, or
    /// counted in the buckets but not yet in the sum and the max.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
            sum: self.sum.load(Ordering::Relaxed),
            max: self.max.load(Ordering::Relaxed),
        }
    }

    /// A copy of the counters, resetting them to zero: for reporting per interval. Every
    /// recorded value is counted in exactly one of the successive snapshots; one recorded
    /// while `take` runs may have its sum or max in the next one instead.
    #[allow(dead_code, reason = "general API, for per-interval reporting")]
    pub(crate) fn take(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self.buckets.iter().map(|b| b.swap(0, Ordering::Relaxed)).collect(),
            sum: self.sum.swap(0, Ordering::Relaxed),
            max: self.max.swap(0, Ordering::Relaxed),
        }
    }

    /// Forgets everything recorded so far.
    #[allow(dead_code, reason = "general API")]
    pub(crate) fn reset(&self) {
        let _ = self.take();
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count: u64 = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        f.debug_struct("Histogram")
            .field("count", &count)
            .field("max", &Duration::from_nanos(self.max.load(Ordering::Relaxed)))
            .finish_non_exhaustive()
    }
}

/// The counters of a [`Histogram`] at one moment, to read statistics from.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct HistogramSnapshot {
    buckets: Box<[u64]>,
    sum: u64,
    max: u64,
}

#[allow(dead_code, reason = "general API; each user reads what it needs")]
impl HistogramSnapshot {
    /// How many values were recorded.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The largest recorded value, exact; zero when empty.
    pub(crate) fn max(&self) -> Duration {
        Duration::from_nanos(self.max)
    }

    /// The sum of the recorded values, exact (until it wraps, after about 584 years).
    pub(crate) fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum)
    }

    /// The mean of the recorded values, exact to the nanosecond; zero when empty.
    pub(crate) fn mean(&self) -> Duration {
        match self.count() {
            0 => Duration::ZERO,
            count => Duration::from_nanos(self.sum / count),
        }
    }

    /// The `q`-quantile (`0.5` for the median, `0.99` for p99) by nearest rank: the smallest
    /// recorded value with at least `q` of all values at or below it.
    ///
    /// Returns the upper bound of that value's bucket, capped at [`max`](Self::max), so it
    /// never under-reports: for a true quantile `v`, the result `r` satisfies
    /// `v <= r < v * (1 + RELATIVE_ERROR)`, and is exact below 64 ns. `q` is clamped to
    /// `0.0 ..= 1.0` (NaN reads as 0); an empty snapshot gives zero.
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        let count = self.count();
        if count == 0 {
            return Duration::ZERO;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        // Nearest rank, 1-based. The float product is exact enough up to 2^53 values.
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos(upper_bound(i).min(self.max));
            }
        }
        // Unreachable: the buckets sum to `count`.
        self.max()
    }
}

impl fmt::Debug for HistogramSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HistogramSnapshot")
            .field("count", &self.count())
            .field("max", &self.max())
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .finish_non_exhaustive()
    }
}

/// `value` in nanoseconds, saturating at `u64::MAX` (about 584 years).
#[inline]
fn nanos(value: Duration) -> u64 {
    value.as_secs().saturating_mul(1_000_000_000).saturating_add(u64::from(value.subsec_nanos()))
}

/// The bucket of a value in nanoseconds: its top `SUB_BITS + 1` significant bits, offset by
/// its magnitude. Values past `HIGHEST` go to the top bucket.
#[inline]
fn index(nanos: u64) -> usize {
    let v = nanos.min(HIGHEST);
    // Position of the highest set bit; values below `2 * SUB` are their own bucket (shift 0).
    let magnitude = 63 - (v | 1).leading_zeros();
    let shift = magnitude.saturating_sub(SUB_BITS);
    ((u64::from(shift) << SUB_BITS) + (v >> shift)) as usize
}

/// The smallest value, in nanoseconds, counted in bucket `i`.
fn lower_bound(i: usize) -> u64 {
    let i = i as u64;
    let shift = (i >> SUB_BITS).saturating_sub(1);
    (i - (shift << SUB_BITS)) << shift
}

/// The largest value, in nanoseconds, counted in bucket `i` (the top bucket also counts
/// everything past the covered range).
fn upper_bound(i: usize) -> u64 {
    let shift = ((i as u64) >> SUB_BITS).saturating_sub(1);
    lower_bound(i) + (1 << shift) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    #[test]
    fn layout_is_contiguous_and_covers_the_range() {
        assert_eq!(lower_bound(0), 0);
        for i in 1..BUCKETS {
            assert_eq!(lower_bound(i), upper_bound(i - 1) + 1, "bucket {i}");
        }
        assert_eq!(upper_bound(BUCKETS - 1), HIGHEST);
        assert_eq!(index(HIGHEST), BUCKETS - 1);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        // An hour is inside the covered range.
        assert!(nanos(Duration::from_secs(3600)) < HIGHEST);
    }

    #[test]
    fn small_values_are_exact() {
        for v in 0..2 * SUB {
            let i = index(v);
            assert_eq!((lower_bound(i), upper_bound(i)), (v, v));
        }
        let h = Histogram::new();
        for v in 0..64 {
            h.record(ns(v));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 64);
        assert_eq!(s.quantile(0.0), ns(0));
        assert_eq!(s.quantile(0.5), ns(31));
        assert_eq!(s.quantile(1.0), ns(63));
    }

    #[test]
    fn relative_error_is_bounded_over_the_range() {
        // Every power of two and its neighbours, then a pseudo-random sweep up to an hour.
        let mut values: Vec<u64> = (0..MAX_BITS).flat_map(|k| [(1 << k) - 1, 1 << k, (1 << k) + 1]).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x % 3_600_000_000_000);
        }
        for v in values {
            let i = index(v);
            let (lo, hi) = (lower_bound(i), upper_bound(i));
            assert!(lo <= v && v <= hi, "{v} outside bucket {i} ({lo}..={hi})");
            assert!((hi - v) as f64 <= v as f64 * RELATIVE_ERROR, "{v} reads back as {hi}");
            assert!((hi - lo + 1) as f64 <= lo.max(1) as f64 * RELATIVE_ERROR || hi < 2 * SUB);
        }
    }

    #[test]
    fn quantiles_of_a_uniform_distribution() {
        let h = Histogram::new();
        // 1 µs ..= 10 ms in steps of 1 µs, shuffled order does not matter.
        for us in 1..=10_000 {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 10_000);
        assert_eq!(s.max(), Duration::from_millis(10));
        assert_eq!(s.mean(), Duration::from_nanos(5_000_500));
        for (q, truth) in [(0.5, 5_000), (0.9, 9_000), (0.99, 9_900), (0.999, 9_990)] {
            let got = s.quantile(q);
            let truth = Duration::from_micros(truth);
            assert!(got >= truth, "p{q}: {got:?} < {truth:?}");
            assert!(got.as_secs_f64() < truth.as_secs_f64() * (1.0 + RELATIVE_ERROR), "p{q}: {got:?}");
        }
        assert_eq!(s.quantile(1.0), s.max());
    }

    #[test]
    fn quantiles_of_a_skewed_distribution() {
        let h = Histogram::new();
        // 990 fast values, 10 slow ones: p99 is still fast, p99.9 is slow.
        for _ in 0..990 {
            h.record(Duration::from_micros(100));
        }
        for _ in 0..10 {
            h.record(Duration::from_secs(2));
        }
        let s = h.snapshot();
        let p99 = s.quantile(0.99);
        assert!(p99 >= Duration::from_micros(100) && p99 < Duration::from_micros(104), "{p99:?}");
        assert_eq!(s.quantile(0.999), Duration::from_secs(2));
        assert_eq!(s.max(), Duration::from_secs(2));
    }

    #[test]
    fn odd_input_does_not_panic() {
        let h = Histogram::new();
        let s = h.snapshot();
        assert_eq!((s.count(), s.max(), s.mean(), s.quantile(0.5)), (0, ns(0), ns(0), ns(0)));
        h.record(Duration::MAX);
        h.record(Duration::from_secs(5 * 3600));
        h.record(ns(7));
        let s = h.snapshot();
        assert_eq!(s.max(), Duration::from_nanos(u64::MAX));
        assert_eq!(s.quantile(f64::NAN), ns(7));
        assert_eq!(s.quantile(-1.0), ns(7));
        assert_eq!(s.quantile(f64::INFINITY), Duration::from_nanos(HIGHEST));
        assert_eq!(s.quantile(2.0), s.quantile(1.0));
    }

    #[test]
    fn take_resets() {
        let h = Histogram::new();
        h.record(Duration::from_millis(3));
        let first = h.take();
        assert_eq!((first.count(), first.sum()), (1, Duration::from_millis(3)));
        assert_eq!(h.snapshot().count(), 0);
        h.record(Duration::from_millis(1));
        h.reset();
        let empty = h.snapshot();
        assert_eq!((empty.count(), empty.max(), empty.sum()), (0, ns(0), ns(0)));
    }

    #[test]
    fn concurrent_recording_adds_up() {
        const THREADS: u64 = 4;
        const EACH: u64 = 50_000;
        let h = Arc::new(Histogram::new());
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        h.record(ns(t * EACH + i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        let n = THREADS * EACH;
        assert_eq!(s.count(), n);
        assert_eq!(s.sum(), ns(n * (n - 1) / 2));
        assert_eq!(s.max(), ns(n - 1));
    }
}
