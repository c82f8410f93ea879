//! A latency histogram that many tasks record into at once, for the soak's millions of queries:
//! log-linear buckets (128 per power of two, so a percentile read from it is within 0.8 % of
//! the true value), counted with atomics, and snapshots that subtract to give a time window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two, as a number of bits.
const SUB_BITS: u32 = 7;
/// Sub-buckets per power of two.
const SUB: usize = 1 << SUB_BITS;
/// The largest power of two with buckets of its own; larger values go into the last bucket
/// (2^40 µs is 12 days).
const TOP_BITS: u32 = 40;
/// The number of buckets.
const BUCKETS: usize = (TOP_BITS - SUB_BITS + 2) as usize * SUB;

/// Counts of durations in microseconds, by bucket; shared by reference between recorders.
pub(crate) struct Histogram {
    counts: Vec<AtomicU64>,
    max: AtomicU64,
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub(crate) fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            max_us: self.max.load(Ordering::Relaxed),
        }
    }
}

/// The counts of a [`Histogram`] at one moment, or of the window between two moments.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    counts: Vec<u64>,
    /// The largest value recorded (in a window: unknown, so the upper end of the highest
    /// bucket that has counts).
    max_us: u64,
}

impl Snapshot {
    /// How many durations were counted.
    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was counted after `earlier` (a snapshot of the same histogram) up to this one.
    pub(crate) fn since(&self, earlier: &Snapshot) -> Snapshot {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
            .collect();
        let max_us = counts
            .iter()
            .rposition(|&c| c > 0)
            .map(|i| {
                let (lo, width) = bounds(i);
                (lo + width - 1).min(self.max_us)
            })
            .unwrap_or(0);
        Snapshot { counts, max_us }
    }

    /// The `p`th percentile (0–100): the middle of the bucket the nearest-rank value is in
    /// (at most the largest value); zero when nothing was counted.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        let total = self.total();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0 * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = bounds(i);
                return Duration::from_micros((lo + width / 2).min(self.max_us));
            }
        }
        Duration::from_micros(self.max_us)
    }

    /// The largest duration counted.
    pub(crate) fn max(&self) -> Duration {
        Duration::from_micros(self.max_us)
    }
}

/// The bucket of `us`: the value itself below [`SUB`], then [`SUB`] buckets per power of two.
fn bucket(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    if exp > TOP_BITS {
        return BUCKETS - 1;
    }
    let top = (us >> (exp - SUB_BITS)) as usize; // in SUB..2*SUB
    (exp - SUB_BITS + 1) as usize * SUB + (top - SUB)
}

/// The lowest value of bucket `i`, and how many values it holds.
fn bounds(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, 1);
    }
    let (k, r) = ((i / SUB) as u32, (i % SUB) as u64);
    ((SUB as u64 + r) << (k - 1), 1 << (k - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_hold_their_values() {
        let mut expected = 0;
        for i in 0..BUCKETS {
            let (lo, width) = bounds(i);
            assert_eq!(lo, expected, "bucket {i} starts where {} ended", i - 1);
            assert_eq!(bucket(lo), i);
            assert_eq!(bucket(lo + width - 1), i);
            expected = lo + width;
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn a_bucket_is_within_one_percent_of_its_values() {
        for i in SUB..BUCKETS {
            let (lo, width) = bounds(i);
            assert!(width as f64 / lo as f64 <= 1.0 / SUB as f64 + 1e-12, "{i}");
        }
    }

    #[test]
    fn percentiles_of_known_values() {
        let h = Histogram::new();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.total(), 1000);
        let close = |d: Duration, ms: f64| {
            let got = d.as_secs_f64() * 1e3;
            assert!(
                (got - ms).abs() / ms < 0.01,
                "{got} ms, expected about {ms}"
            );
        };
        close(s.percentile(50.0), 500.0);
        close(s.percentile(99.0), 990.0);
        close(s.percentile(100.0), 1000.0);
        assert_eq!(s.max(), Duration::from_millis(1000));
        assert!(s.percentile(100.0) <= s.max());
    }

    #[test]
    fn a_window_counts_only_what_came_in_it() {
        let h = Histogram::new();
        for _ in 0..10 {
            h.record(Duration::from_micros(100));
        }
        let first = h.snapshot();
        for _ in 0..5 {
            h.record(Duration::from_millis(20));
        }
        let window = h.snapshot().since(&first);
        assert_eq!(window.total(), 5);
        let p50 = window.percentile(50.0).as_micros();
        assert!((19_800..=20_000).contains(&p50), "{p50}");
        assert!(window.max() >= Duration::from_millis(20));
        assert!(window.max() < Duration::from_micros(20_200));
        assert_eq!(Snapshot::default().percentile(99.0), Duration::ZERO);
        assert_eq!(h.snapshot().since(&h.snapshot()).max(), Duration::ZERO);
    }

    #[test]
    fn small_values_are_exact() {
        let h = Histogram::new();
        h.record(Duration::from_micros(3));
        h.record(Duration::from_micros(7));
        let s = h.snapshot();
        assert_eq!(s.percentile(50.0), Duration::from_micros(3));
        assert_eq!(s.percentile(100.0), Duration::from_micros(7));
    }
}
