//! Load balancers: pick one endpoint of a priority tier.
//!
//! All state is atomic (counters, in-flight gauges, EWMA cells), so a pick takes no lock. Smooth
//! weighted round robin is deterministic for fixed weights, so its sequence is computed once at build
//! time (nginx's algorithm) and a pick is a counter increment into that schedule.
//!
//! Every balancer honours endpoint weights, as Envoy's do: `round_robin` follows the same schedule
//! as `weighted` when the weights differ, `random` draws in proportion to them, and the two
//! power-of-two-choices balancers draw their candidates in proportion to them and compare load
//! per unit of weight. With equal weights (the default) none of this costs anything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::endpoint::Endpoint;
use crate::config::Balance;

/// Endpoints an upstream may have: what [`Tried`] tracks (the config refuses more).
pub const MAX_ENDPOINTS: usize = 256;

/// A set of endpoint indices already tried by this request (retries prefer others).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried([u64; MAX_ENDPOINTS / 64]);

impl Tried {
    /// Marks endpoint `i` (below [`MAX_ENDPOINTS`]).
    pub fn insert(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    /// Whether endpoint `i` was tried.
    pub fn contains(self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// One priority tier: a contiguous range of the upstream's endpoints (sorted by priority).
#[derive(Debug)]
pub(crate) struct Tier {
    pub(crate) start: usize,
    pub(crate) end: usize,
    cursor: AtomicUsize,
    /// Smooth WRR schedule (endpoint indices), for `weighted`.
    schedule: Vec<usize>,
    /// Running sums of the weights, when they differ (empty when all are equal): a weighted draw.
    cumulative: Vec<u64>,
}

impl Tier {
    pub(crate) fn new(start: usize, end: usize, weights: &[u32]) -> Self {
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let cumulative = if uniform {
            Vec::new()
        } else {
            weights
                .iter()
                .scan(0u64, |sum, &w| {
                    *sum += u64::from(w);
                    Some(*sum)
                })
                .collect()
        };
        Tier {
            start,
            end,
            cursor: AtomicUsize::new(0),
            schedule: smooth_wrr(start, weights),
            cumulative,
        }
    }

    /// A random position in the tier (0-based), drawn in proportion to the weights.
    fn draw(&self, n: usize) -> usize {
        match self.cumulative.last() {
            None => fastrand::usize(..n),
            Some(&total) => {
                let r = fastrand::u64(..total);
                self.cumulative.partition_point(|&c| c <= r)
            }
        }
    }

    /// Whether the endpoints' weights differ.
    fn weighted(&self) -> bool {
        !self.cumulative.is_empty()
    }
}

/// nginx's smooth weighted round robin: each round every endpoint gains its weight, the largest current
/// weight is chosen and loses the total. The sequence repeats after `sum(weights)` picks.
fn smooth_wrr(start: usize, weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(start + best);
    }
    out
}

/// Picks an endpoint in `tier` for which `ok(i)` holds.
///
/// An endpoint that is not `ok` (unavailable, or already tried by this request) must not hand its
/// share to the one after it: the round-robin balancers move the shared cursor on past it (its
/// slot is consumed, so the others keep their order and weights), and the random draws draw again
/// among the `ok` endpoints in proportion to their weights, as Envoy's balancers pick among the
/// hosts that are up.
pub(crate) fn pick(
    balance: Balance,
    tier: &Tier,
    eps: &[Arc<Endpoint>],
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = tier.end - tier.start;
    if n == 0 {
        return None;
    }
    match balance {
        Balance::RoundRobin if !tier.weighted() => {
            // A round of slots is every endpoint of the tier: `None` means none is `ok`.
            cursor_pick(tier, n, |c| tier.start + c % n, &ok)
        }
        Balance::RoundRobin | Balance::Weighted => {
            // Every endpoint has a slot in the schedule (weights are at least 1).
            let len = tier.schedule.len();
            cursor_pick(tier, len, |c| tier.schedule[c % len], &ok)
        }
        Balance::Random => draw_ok(tier, eps, &ok),
        Balance::LeastRequest | Balance::PeakEwma => {
            // Power of two choices: two random candidates, the less loaded wins.
            let a = draw_ok(tier, eps, &ok)?;
            let b = if n > 1 {
                draw_ok(tier, eps, &|i| i != a && ok(i))
            } else {
                None
            };
            let Some(b) = b else { return Some(a) };
            let (mut ca, mut cb) = if balance == Balance::LeastRequest {
                (eps[a].inflight() as f64, eps[b].inflight() as f64)
            } else {
                (eps[a].ewma_cost(), eps[b].ewma_cost())
            };
            if tier.weighted() {
                // Load per unit of weight: an endpoint of weight 3 is as loaded with 3 requests
                // as one of weight 1 with 1.
                ca /= f64::from(eps[a].weight);
                cb /= f64::from(eps[b].weight);
            }
            Some(if cb < ca { b } else { a })
        }
    }
}

/// The endpoint at the shared cursor's next `ok` slot. The slots before it (endpoints not `ok`) are
/// consumed with it, in one compare-and-swap: every slot goes to exactly one pick, also when
/// several threads pick at once, so no endpoint gets another's turn. `None` (the cursor left as it
/// was) when no slot of a round is `ok`.
fn cursor_pick(
    tier: &Tier,
    len: usize,
    slot: impl Fn(usize) -> usize,
    ok: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut c = tier.cursor.load(Ordering::Relaxed);
    loop {
        let k = (0..len).find(|&k| ok(slot(c.wrapping_add(k))))?;
        match tier.cursor.compare_exchange_weak(
            c,
            c.wrapping_add(k + 1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Some(slot(c.wrapping_add(k))),
            Err(now) => c = now,
        }
    }
}

/// A random `ok` endpoint of the tier, drawn in proportion to the weights: one draw over the
/// whole tier, and if it lands on one that is not `ok`, a draw among the `ok` ones.
fn draw_ok(tier: &Tier, eps: &[Arc<Endpoint>], ok: &impl Fn(usize) -> bool) -> Option<usize> {
    let first = tier.start + tier.draw(tier.end - tier.start);
    if ok(first) {
        return Some(first);
    }
    let weight = |i: usize| u64::from(eps[i].weight.max(1));
    let total: u64 = (tier.start..tier.end).filter(|&i| ok(i)).map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(..total);
    for i in (tier.start..tier.end).filter(|&i| ok(i)) {
        let w = weight(i);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_matches_nginx() {
        // nginx's documented example: weights 5,1,1 -> a a b a c a a.
        assert_eq!(smooth_wrr(0, &[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_wrr(2, &[1, 1]), vec![2, 3]);
    }

    #[test]
    fn tried_set() {
        let mut t = Tried::default();
        for i in [3, 64, 100, 255, 256] {
            t.insert(i);
        }
        assert!(t.contains(3) && t.contains(64) && t.contains(100) && t.contains(255));
        assert!(!t.contains(2) && !t.contains(65) && !t.contains(36) && !t.contains(256));
    }
}
