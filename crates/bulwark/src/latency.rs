//! A small, lock-free record of recent latencies, for policies that act on a
//! percentile: retry's deadline check ("will another attempt fit?") and hedging
//! ("start a second attempt when the first passes p95").
//!
//! It keeps the last [`LatencyWindow::capacity`] samples in a ring of atomics.
//! Recording is one `fetch_add` and one `store`; a percentile query copies the
//! ring and selects, so it costs about a microsecond for the default 256 samples.
//! Queries are cached for [`REFRESH_EVERY`] new samples, so a policy can ask on
//! every call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Default number of samples kept: enough for a stable p99 estimate, small enough
/// to copy on a query.
pub const DEFAULT_CAPACITY: usize = 256;

/// Percentiles cached at once (the oldest asked is dropped first).
const MAX_CACHED: usize = 16;

/// A cached percentile is recomputed after this many new samples.
pub const REFRESH_EVERY: u64 = 16;

/// The last N latencies of successful calls.
#[derive(Debug)]
pub struct LatencyWindow {
    slots: Box<[AtomicU64]>,
    next: AtomicU64,
    // (sample count at computation, percentile's bits, value in nanos)
    cache: Mutex<Vec<(u64, u64, u64)>>,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl LatencyWindow {
    /// A window that keeps the last `capacity` samples (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        LatencyWindow {
            slots: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicU64::new(0),
            cache: Mutex::new(Vec::new()),
        }
    }

    /// How many samples the window keeps.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// How many samples were recorded in all (not capped by the capacity).
    pub fn recorded(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Records one latency.
    #[inline]
    pub fn record(&self, latency: Duration) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.slots[(i % self.slots.len() as u64) as usize].store(nanos, Ordering::Relaxed);
    }

    /// The `p`-th percentile (0.0..=100.0) of the samples in the window, or `None`
    /// with fewer than `min_samples` recorded.
    pub fn percentile(&self, p: f64, min_samples: u64) -> Option<Duration> {
        self.percentile_from(p, min_samples, REFRESH_EVERY)
    }

    /// [`percentile`](Self::percentile) of the samples in the window now, not a cached value up
    /// to [`REFRESH_EVERY`] samples old (for comparisons between windows, which the cache would
    /// skew: one window's fresh value against another's old one).
    pub fn percentile_now(&self, p: f64, min_samples: u64) -> Option<Duration> {
        self.percentile_from(p, min_samples, 1)
    }

    fn percentile_from(&self, p: f64, min_samples: u64, refresh_every: u64) -> Option<Duration> {
        let recorded = self.recorded();
        if recorded == 0 || recorded < min_samples {
            return None;
        }
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
        let key = p.to_bits();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = cache.iter().find(|(_, k, _)| *k == key) {
            if recorded.saturating_sub(entry.0) < refresh_every {
                return Some(Duration::from_nanos(entry.2));
            }
        }
        let mut samples: Vec<u64> = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&v| v != 0)
            .collect();
        // `recorded` counts a sample before its slot is written: with writers racing this
        // read, fewer than `min_samples` may be in the slots yet.
        if samples.is_empty() || (samples.len() as u64) < min_samples.min(self.slots.len() as u64) {
            return None;
        }
        // Nearest-rank percentile.
        // Less a hair before rounding up: `p` in binary is a hair off its decimal value, and
        // p99.9 of 10 000 samples must be the 9 990th, not the 9 991st.
        let rank = (p * samples.len() as f64 / 100.0 - 1e-9).ceil() as usize;
        let idx = rank.clamp(1, samples.len()) - 1;
        let (_, v, _) = samples.select_nth_unstable(idx);
        let v = *v;
        cache.retain(|(_, k, _)| *k != key);
        // A few percentiles are asked for over and over (a hedge's, a retry's): the cache
        // keeps the latest ones, not one entry per value ever asked.
        if cache.len() >= MAX_CACHED {
            cache.remove(0);
        }
        cache.push((recorded, key, v));
        Some(Duration::from_nanos(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let w = LatencyWindow::new(100);
        for ms in 1..=100 {
            w.record(Duration::from_millis(ms));
        }
        assert_eq!(w.percentile(50.0, 1), Some(Duration::from_millis(50)));
        assert_eq!(w.percentile(99.0, 1), Some(Duration::from_millis(99)));
        assert_eq!(w.percentile(100.0, 1), Some(Duration::from_millis(100)));
        assert_eq!(w.percentile(0.0, 1), Some(Duration::from_millis(1)));
        assert_eq!(w.percentile(50.0, 101), None);
    }

    /// A sample counted but not yet written (a writer racing the read) is not one of the
    /// `min_samples`: no percentile from fewer samples than asked for.
    #[test]
    fn samples_counted_but_not_yet_written_do_not_make_the_minimum() {
        let w = LatencyWindow::new(100);
        w.record(Duration::from_millis(7));
        w.next.fetch_add(2, Ordering::Relaxed); // two writers between their count and store
        assert_eq!(w.recorded(), 3);
        assert_eq!(w.percentile_now(50.0, 3), None);
        w.record(Duration::from_millis(8));
        w.record(Duration::from_millis(9));
        assert_eq!(w.percentile_now(50.0, 3), Some(Duration::from_millis(8)));
    }

    /// A caller asking for ever new percentiles (a dashboard sweeping p) does not grow the
    /// cache by one entry per value (review df7).
    #[test]
    fn the_cache_stays_small_whatever_percentiles_are_asked() {
        let w = LatencyWindow::new(64);
        for ms in 1..=64 {
            w.record(Duration::from_millis(ms));
        }
        for i in 0..1_000u32 {
            assert!(w.percentile(90.0 + f64::from(i) * 0.001, 1).is_some());
        }
        assert!(w.cache.lock().unwrap().len() <= MAX_CACHED);
        assert_eq!(w.percentile(50.0, 1), Some(Duration::from_millis(32)));
    }

    #[test]
    fn old_samples_roll_out_and_cache_refreshes() {
        let w = LatencyWindow::new(4);
        for _ in 0..4 {
            w.record(Duration::from_millis(10));
        }
        assert_eq!(w.percentile(50.0, 1), Some(Duration::from_millis(10)));
        for _ in 0..REFRESH_EVERY {
            w.record(Duration::from_millis(500));
        }
        assert_eq!(w.percentile(50.0, 1), Some(Duration::from_millis(500)));
    }
}
