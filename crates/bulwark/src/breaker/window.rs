//! The sliding windows the closed state records into.
//!
//! Both windows are allocation-free on the recording path, and lock-free but for
//! the time window's move to a new bucket (once per bucket width); both
//! keep one invariant that makes them safe under any interleaving: **every change
//! to a slot or bucket is mirrored by exactly one change to the aggregate**, so once
//! recorders are quiet the aggregate equals the sum of the slots. Races can make
//! the aggregate briefly disagree with the slots (a reader then sees odd counts
//! and the decision logic re-checks), or lose a sample, but never make it drift.

use std::sync::atomic::{
    AtomicU64, AtomicU8,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Mutex;

/// Slot code bits: the call was counted, it failed, it was slow.
pub(crate) const CALL: u8 = 0b001;
pub(crate) const FAIL: u8 = 0b010;
pub(crate) const SLOW: u8 = 0b100;

/// Calls, failures and slow calls in a window (or among probes, or in a ramp).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Counts {
    pub(crate) fn add(&mut self, code: u8) {
        if code & CALL != 0 {
            self.calls += 1;
            self.failures += u64::from(code & FAIL != 0);
            self.slow += u64::from(code & SLOW != 0);
        }
    }

    /// False when a race left the aggregate momentarily inconsistent; the caller
    /// then skips its decision (the next recorded call decides again).
    pub(crate) fn is_sane(&self) -> bool {
        self.failures <= self.calls && self.slow <= self.calls && self.calls < (1 << 62)
    }
}

/// Pads a value to its own cache line, so the write-heavy window counters do not
/// share a line with the read-mostly state word.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Padded<T>(pub(crate) T);

// ---------------------------------------------------------------------------
// Count window
// ---------------------------------------------------------------------------

/// Field width of the packed aggregate: 21 bits each for calls, failures, slow.
const AGG_BITS: u32 = 21;
const AGG_MASK: u64 = (1 << AGG_BITS) - 1;

/// Largest count window: the packed aggregate holds up to 2^21 - 1 per field.
pub(crate) const MAX_COUNT_WINDOW: usize = 1_000_000;

/// Packed-aggregate value of one slot code, indexed by the code.
const PACKED: [u64; 8] = {
    let mut t = [0u64; 8];
    let mut c = 0;
    while c < 8 {
        if c & CALL as usize != 0 {
            t[c] = 1
                | (((c & FAIL as usize != 0) as u64) << AGG_BITS)
                | (((c & SLOW as usize != 0) as u64) << (2 * AGG_BITS));
        }
        c += 1;
    }
    t
};

fn unpack(agg: u64) -> Counts {
    Counts {
        calls: agg & AGG_MASK,
        failures: (agg >> AGG_BITS) & AGG_MASK,
        slow: (agg >> (2 * AGG_BITS)) & AGG_MASK,
    }
}

/// The outcomes of the last `N` calls: a ring of one-byte slots written at
/// `fetch_add` positions, plus a packed aggregate (calls | failures | slow) that is
/// adjusted by the difference between the new code and the swapped-out one.
///
/// A success replacing a success changes nothing, so a healthy steady state costs
/// one `fetch_add` and one `swap`. The packing is linear modulo 2^64, so deltas with
/// negative fields add up correctly whatever order they land in.
#[derive(Debug)]
pub(crate) struct CountWindow {
    head: Padded<AtomicU64>,
    agg: Padded<AtomicU64>,
    slots: Box<[AtomicU8]>,
}

impl CountWindow {
    pub(crate) fn new(size: usize) -> Self {
        CountWindow {
            head: Padded(AtomicU64::new(0)),
            agg: Padded(AtomicU64::new(0)),
            slots: (0..size.max(1)).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// Records one call; returns the counts after it, or `None` when nothing
    /// changed that could move a rate up (a success replaced a success).
    #[inline]
    pub(crate) fn record(&self, code: u8) -> Option<Counts> {
        let i = self.head.0.fetch_add(1, Relaxed);
        let n = self.slots.len() as u64;
        let old = self.slots[(i % n) as usize].swap(code, Relaxed);
        let delta = PACKED[usize::from(code & 7)].wrapping_sub(PACKED[usize::from(old & 7)]);
        if delta == 0 {
            if code & (FAIL | SLOW) == 0 {
                return None;
            }
            return Some(unpack(self.agg.0.load(Relaxed)));
        }
        let agg = self.agg.0.fetch_add(delta, Relaxed).wrapping_add(delta);
        Some(unpack(agg))
    }

    pub(crate) fn counts(&self) -> Counts {
        unpack(self.agg.0.load(Relaxed))
    }

    /// Empties every slot, subtracting what it held (never a blind store of zero,
    /// so a recorder racing with the reset cannot leave phantom counts behind).
    pub(crate) fn reset(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(0, Relaxed);
            if old != 0 {
                self.agg.0.fetch_sub(PACKED[usize::from(old & 7)], Relaxed);
            }
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.slots.len()
    }
}

// ---------------------------------------------------------------------------
// Time window
// ---------------------------------------------------------------------------

/// A bucket's first word: tag (16 bits, the bucket's tick modulo 65 536) | calls (48).
const CALL_BITS: u32 = 48;
const CALL_MASK: u64 = (1 << CALL_BITS) - 1;
const TAG_MASK: u64 = !CALL_MASK;
/// Its second word: slow (32 bits) | failures (32). Neither fills up in practice
/// (2^32 calls in one bucket).
const SLOW_SHIFT: u32 = 32;
const FAIL_MASK: u64 = (1 << SLOW_SHIFT) - 1;

/// Most buckets a time window uses; longer windows get coarser buckets.
pub(crate) const MAX_BUCKETS: u64 = 3600;
/// Fewest buckets: windows shorter than this many seconds get sub-second buckets.
pub(crate) const MIN_BUCKETS: u64 = 10;

const fn tag(tick: u64) -> u64 {
    tick << CALL_BITS
}

/// The counts of a bucket's two words.
fn bucket_counts(head: u64, tail: u64) -> Counts {
    Counts {
        calls: head & CALL_MASK,
        failures: tail & FAIL_MASK,
        slow: tail >> SLOW_SHIFT,
    }
}

/// One bucket of a [`TimeWindow`]: its tick's tag with its calls, and its failures and
/// slow calls. A call is counted in `head` (where the tag is checked) and then, if it
/// failed or was slow, in `tail`.
#[derive(Debug, Default)]
struct Bucket {
    head: AtomicU64,
    tail: AtomicU64,
}

/// The outcomes of the calls in the last `window`: `M` buckets of `width` each, a
/// bucket word holding its tick's tag and its counts, and running totals.
///
/// Time is cut into ticks of `width` since the breaker's origin. The window at tick
/// `t` is the buckets of ticks `t-M+1 ..= t`. A `cursor` remembers the newest tick
/// the buckets were advanced to. Moving it is the one step under a lock (`advancing`,
/// taken at most once per bucket width): the mover empties the buckets of the ticks
/// it passes over, subtracting their counts from the totals, and only then publishes
/// the new cursor, so a recorder that sees the cursor at its tick finds its bucket
/// already emptied and tagged. A recorder counts its call with a `compare_exchange`
/// that only succeeds while the bucket's tag is its own tick, so a sample from a
/// delayed recorder is dropped instead of landing in a newer second; its failure or
/// slowness follows with one `fetch_add` on the bucket's second word (a recorder
/// preempted between the two while the mover empties its bucket leaves that failure
/// in the newer tick, mirrored in the totals and removed with it).
///
/// The counts are exact up to 2^48 calls and 2^32 failures per bucket: nothing is
/// dropped or scaled under load (a dependency's busiest second counts as much as its
/// quietest).
#[derive(Debug)]
pub(crate) struct TimeWindow {
    width_nanos: u64,
    cursor: Padded<AtomicU64>,
    /// Held while the buckets are emptied for a new cursor (see above).
    advancing: Mutex<()>,
    calls: Padded<AtomicU64>,
    failures: AtomicU64,
    slow: AtomicU64,
    buckets: Box<[Bucket]>,
}

impl TimeWindow {
    /// Buckets of one second for windows from 10 s to one hour; ten buckets for
    /// shorter windows; 3600 buckets for longer ones.
    pub(crate) fn new(window_nanos: u64) -> Self {
        let secs = window_nanos.div_ceil(1_000_000_000);
        let m = secs.clamp(MIN_BUCKETS, MAX_BUCKETS);
        TimeWindow {
            width_nanos: (window_nanos / m).max(1),
            cursor: Padded(AtomicU64::new(0)),
            advancing: Mutex::new(()),
            calls: Padded(AtomicU64::new(0)),
            failures: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            buckets: (0..m).map(|_| Bucket::default()).collect(),
        }
    }

    pub(crate) fn bucket_count(&self) -> u64 {
        self.buckets.len() as u64
    }

    #[cfg(test)]
    pub(crate) fn bucket_width_nanos(&self) -> u64 {
        self.width_nanos
    }

    #[inline]
    fn tick(&self, now_nanos: u64) -> u64 {
        now_nanos / self.width_nanos
    }

    fn bucket(&self, tick: u64) -> &Bucket {
        &self.buckets[(tick % self.bucket_count()) as usize]
    }

    fn add_totals(&self, code: u8) {
        self.calls.0.fetch_add(1, Relaxed);
        if code & FAIL != 0 {
            self.failures.fetch_add(1, Relaxed);
        }
        if code & SLOW != 0 {
            self.slow.fetch_add(1, Relaxed);
        }
    }

    /// Failures and slow calls first, so that a reader between the steps sees a rate
    /// too low rather than too high (the decision logic re-checks before opening).
    fn sub_totals(&self, c: Counts) {
        if c.failures != 0 {
            self.failures.fetch_sub(c.failures, Relaxed);
        }
        if c.slow != 0 {
            self.slow.fetch_sub(c.slow, Relaxed);
        }
        if c.calls != 0 {
            self.calls.0.fetch_sub(c.calls, Relaxed);
        }
    }

    /// Moves the window to `tick`, emptying the buckets of the ticks passed over.
    ///
    /// The buckets are emptied before the cursor moves, so no recorder at `tick` can
    /// find its bucket still holding an older tick's counts (and drop its sample, as
    /// every recorder racing a lone mover did when the cursor moved first). Movers are
    /// serialised: one preempted mid-way cannot wipe a bucket a later one has handed
    /// to recorders.
    fn advance(&self, tick: u64) {
        if self.cursor.0.load(Acquire) >= tick {
            return;
        }
        let _moving = self
            .advancing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cur = self.cursor.0.load(Relaxed);
        if cur >= tick {
            return;
        }
        let first = (cur + 1).max((tick + 1).saturating_sub(self.bucket_count()));
        for k in first..=tick {
            self.clear_for(k);
        }
        self.cursor.0.store(tick, Release);
    }

    /// Empties bucket `k`'s slot for tick `k` (movers hold `advancing`).
    ///
    /// A blind swap: the tag holds too few bits to tell an older tick from a newer one
    /// across a long idle gap. A recorder adding to the bucket for an older tick at the
    /// same moment either lands before the swap (and its sample leaves with the
    /// bucket, subtracted from the totals) or finds the new tag and drops it: that
    /// tick has left the window anyway.
    fn clear_for(&self, k: u64) {
        let b = self.bucket(k);
        let head = b.head.swap(tag(k), Relaxed);
        let tail = b.tail.swap(0, Relaxed);
        self.sub_totals(bucket_counts(head, tail));
    }

    /// Records one call at `now_nanos` (since the breaker's origin).
    #[inline]
    pub(crate) fn record(&self, code: u8, now_nanos: u64) {
        let tick = self.tick(now_nanos);
        self.advance(tick);
        let bucket = self.bucket(tick);
        let mut w = bucket.head.load(Relaxed);
        loop {
            if w & TAG_MASK != tag(tick) {
                // A newer tick owns the bucket (this recorder was delayed): drop the
                // sample.
                return;
            }
            match bucket
                .head
                .compare_exchange_weak(w, w + 1, Relaxed, Relaxed)
            {
                Ok(_) => break,
                Err(actual) => w = actual,
            }
        }
        let rest = u64::from(code & FAIL != 0) | (u64::from(code & SLOW != 0) << SLOW_SHIFT);
        if rest != 0 {
            bucket.tail.fetch_add(rest, Relaxed);
        }
        self.add_totals(code);
    }

    /// The counts of the window ending at `now_nanos`.
    ///
    /// Failures and slow calls are capped at the calls: a recorder preempted between
    /// its two words while `reset` (or the mover) empties its bucket leaves its failure
    /// without its call (an orphan, gone when that bucket leaves the window). It can
    /// only show as more failures than calls when every call in the window failed, and
    /// capped it reads as that: 100% (uncapped, the counts looked torn and the breaker
    /// skipped every decision through an outage).
    pub(crate) fn counts(&self, now_nanos: u64) -> Counts {
        self.advance(self.tick(now_nanos));
        let calls = self.calls.0.load(Relaxed);
        Counts {
            calls,
            failures: self.failures.load(Relaxed).min(calls),
            slow: self.slow.load(Relaxed).min(calls),
        }
    }

    /// Empties every bucket, keeping its tag.
    pub(crate) fn reset(&self) {
        for b in self.buckets.iter() {
            let head = b.head.fetch_and(TAG_MASK, Relaxed);
            let tail = b.tail.swap(0, Relaxed);
            self.sub_totals(bucket_counts(head, tail));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u8 = CALL;
    const F: u8 = CALL | FAIL;
    const SL: u8 = CALL | SLOW;

    #[test]
    fn count_window_keeps_the_last_n() {
        let w = CountWindow::new(3);
        assert_eq!(w.record(F).map(|c| c.failures), Some(1));
        w.record(F);
        w.record(SL);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failures: 2,
                slow: 1
            }
        );
        // Overwrites the first failure.
        w.record(S);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.record(S);
        // Success over success reports nothing new.
        w.record(S);
        assert_eq!(w.record(S), None);
        assert_eq!(
            w.counts(),
            Counts {
                calls: 3,
                failures: 0,
                slow: 0
            }
        );
        w.reset();
        assert_eq!(w.counts(), Counts::default());
    }

    #[test]
    fn count_window_aggregate_matches_slots_after_concurrent_writes() {
        let w = std::sync::Arc::new(CountWindow::new(7));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        let code = match (i + u32::from(t)) % 3 {
                            0 => S,
                            1 => F,
                            _ => SL | FAIL,
                        };
                        w.record(code);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut expect = Counts::default();
        for s in w.slots.iter() {
            expect.add(s.load(Relaxed));
        }
        assert_eq!(w.counts(), expect);
    }

    /// A recorder preempted between its two words while `reset` emptied its bucket leaves
    /// its failure without its call (review df7): with every call failing, the window
    /// reads as 100% failed, not as a torn count the breaker would skip (it stayed closed
    /// through an outage).
    #[test]
    fn an_orphan_failure_reads_as_a_failed_call() {
        let sec = 1_000_000_000;
        let w = TimeWindow::new(60 * sec);
        w.record(F, 0);
        // The interleaving: its call counted in `head`, then the reset, then its failure.
        w.bucket(0).head.fetch_add(1, Relaxed);
        w.reset();
        w.bucket(0).tail.fetch_add(1, Relaxed);
        w.add_totals(F);
        w.record(F, 1);
        w.record(F, 2);
        let c = w.counts(3);
        assert_eq!((c.calls, c.failures), (2, 2));
        assert!(c.is_sane());
        // The orphan leaves with its bucket.
        let c = w.counts(61 * sec);
        assert_eq!((c.calls, c.failures), (0, 0));
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let sec = 1_000_000_000;
        let w = TimeWindow::new(10 * sec);
        assert_eq!(w.bucket_count(), 10);
        assert_eq!(w.bucket_width_nanos(), sec);
        w.record(F, 0);
        w.record(F, sec / 2);
        w.record(S, 3 * sec);
        assert_eq!(w.counts(3 * sec).calls, 3);
        assert_eq!(w.counts(10 * sec - 1).failures, 2);
        // The bucket of tick 0 leaves the window at tick 10.
        assert_eq!(
            w.counts(10 * sec),
            Counts {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        // A long idle gap empties everything.
        assert_eq!(w.counts(1_000 * sec), Counts::default());
        w.record(SL, 1_000 * sec);
        assert_eq!(w.counts(1_000 * sec).slow, 1);
        w.reset();
        assert_eq!(w.counts(1_000 * sec), Counts::default());
    }

    #[test]
    fn short_windows_get_sub_second_buckets() {
        let w = TimeWindow::new(2_000_000_000);
        assert_eq!(w.bucket_count(), 10);
        assert_eq!(w.bucket_width_nanos(), 200_000_000);
        let w = TimeWindow::new(60_000_000_000);
        assert_eq!(
            (w.bucket_count(), w.bucket_width_nanos()),
            (60, 1_000_000_000)
        );
    }
}
