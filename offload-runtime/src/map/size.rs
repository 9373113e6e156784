//! How many items go in one batch: as many as the worker runs in about [`TARGET`], measured
//! from the batches that came back (joblib's automatic batch size, on a shorter scale), or a
//! fixed number the caller chose.

use std::time::Duration;

/// The worker time one batch aims at: long enough that a round trip (tens of microseconds) is
/// a small part of it, short enough that the last batches leave no worker idle for long and
/// results come back soon.
pub(super) const TARGET: Duration = Duration::from_millis(5);

/// The most items in one batch.
pub(super) const MAX_ITEMS: usize = 1 << 16;

/// A batch grows at most this many times over from one measurement to the next: the first
/// batches are small and their timings noisy.
const GROWTH: usize = 16;

#[derive(Debug, Clone)]
pub(super) struct Sizer {
    fixed: Option<usize>,
    /// The size the next batch gets.
    next: usize,
    /// Nanoseconds per item, smoothed over the batches so far.
    per_item_ns: Option<f64>,
}

impl Sizer {
    /// Sizes chosen from measurements, starting at one item.
    pub(super) fn automatic() -> Sizer {
        Sizer { fixed: None, next: 1, per_item_ns: None }
    }

    /// Always `items` (at least 1) per batch.
    pub(super) fn fixed(items: usize) -> Sizer {
        let items = items.clamp(1, MAX_ITEMS);
        Sizer { fixed: Some(items), next: items, per_item_ns: None }
    }

    /// How many items the next batch takes.
    pub(super) fn size(&self) -> usize {
        self.next
    }

    /// A batch of `items` took the worker `busy_ns` nanoseconds.
    pub(super) fn observe(&mut self, items: usize, busy_ns: u64) {
        if self.fixed.is_some() || items == 0 {
            return;
        }
        let sample = busy_ns as f64 / items as f64;
        let per_item = match self.per_item_ns {
            // Weighted by the items each side stands for, so one tiny batch cannot undo a
            // large one.
            Some(old) => {
                let weight = (items as f64 / self.next.max(1) as f64).min(1.0) / 2.0;
                old * (1.0 - weight) + sample * weight
            }
            None => sample,
        };
        self.per_item_ns = Some(per_item);
        let ideal = (TARGET.as_nanos() as f64 / per_item.max(1.0)) as usize;
        self.next = ideal.clamp(1, self.next.saturating_mul(GROWTH).min(MAX_ITEMS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trivial_items_grow_to_the_cap_in_a_few_steps() {
        let mut sizer = Sizer::automatic();
        let mut steps = 0;
        while sizer.size() < MAX_ITEMS {
            let items = sizer.size();
            sizer.observe(items, items as u64 * 50);
            steps += 1;
            assert!(steps < 6, "{sizer:?}");
        }
    }

    #[test]
    fn slow_items_make_small_batches() {
        let mut sizer = Sizer::automatic();
        for _ in 0..5 {
            let items = sizer.size();
            sizer.observe(items, items as u64 * 2_000_000);
        }
        // 2 ms an item: two or three make the 5 ms target.
        assert_eq!(sizer.size(), 2);
        for _ in 0..5 {
            let items = sizer.size();
            sizer.observe(items, items as u64 * 50_000_000);
        }
        assert_eq!(sizer.size(), 1);
    }

    #[test]
    fn a_batch_shrinks_when_items_get_slower() {
        let mut sizer = Sizer::automatic();
        for _ in 0..10 {
            let items = sizer.size();
            sizer.observe(items, items as u64 * 1_000);
        }
        assert_eq!(sizer.size(), 5_000);
        for _ in 0..10 {
            let items = sizer.size();
            sizer.observe(items, items as u64 * 100_000);
        }
        assert!(sizer.size() <= 60, "{sizer:?}");
    }

    #[test]
    fn a_fixed_size_stays() {
        let mut sizer = Sizer::fixed(7);
        sizer.observe(7, 1);
        assert_eq!(sizer.size(), 7);
        assert_eq!(Sizer::fixed(0).size(), 1);
    }
}
