//! One policy shared by several threads: exact invariants after the threads join (review mt2).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use bulwark::keyed::Keyed;
use bulwark::rate_limit::KeyedRateLimiter;
use bulwark::retry::RetryBudget;

const THREADS: usize = 6;

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// The slice generation a withdrawal was counted in (its `Debug` form is
/// `Withdrawal { generation: N }`).
fn generation_of(w: &bulwark::retry::Withdrawal) -> u64 {
    let s = format!("{w:?}");
    let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("unexpected Debug form {s:?}"))
}

/// A budget with no deposits grants at most `min_retries_per_sec * ttl` retries in any ttl
/// window, whichever thread asks and however the clock moves meanwhile. Threads hammer
/// `withdraw` on a shared paused clock that the test moves one slice (ttl / 10) at a time;
/// for every slice that granted something, the grants counted in the ten slices ending there
/// must not exceed the reserve.
#[test]
// The stall guard is wall-clock time on purpose: the policy's clock is paused.
#[allow(clippy::disallowed_types)]
fn a_retry_budget_never_grants_more_than_its_reserve_in_a_window_across_threads() {
    let rt = paused_runtime();
    let handle = rt.handle().clone();
    let _g = handle.enter();
    const RESERVE: u64 = 50; // 50 retries/s over a 1 s ttl
    let budget = RetryBudget::builder()
        .ttl(Duration::from_secs(1))
        .min_retries_per_sec(RESERVE as u32)
        .percent_can_retry(0.0)
        .build()
        .unwrap();
    let slice = Duration::from_millis(100);
    let stop = AtomicBool::new(false);
    let grants: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let barrier = Barrier::new(THREADS + 1);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (budget, handle, stop, grants, barrier) =
                (&budget, &handle, &stop, &grants, &barrier);
            s.spawn(move || {
                let _g = handle.enter();
                let mut mine = Vec::new();
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    if let Some(w) = budget.withdraw() {
                        mine.push(generation_of(&w));
                    }
                }
                grants.lock().unwrap().extend(mine);
            });
        }
        barrier.wait();
        for _ in 0..1_500 {
            // Move on once the workers have (nearly) drained what this slice offers, so a
            // slice boundary often finds a token or two left and threads asking for them.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while budget.balance() > 2 {
                assert!(std::time::Instant::now() < deadline, "workers stalled");
                std::thread::yield_now();
            }
            rt.block_on(tokio::time::advance(slice));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let grants = grants.into_inner().unwrap();
    let max_gen = grants.iter().copied().max().unwrap_or(0) as usize;
    let mut per_gen = vec![0u64; max_gen + 1];
    for g in &grants {
        per_gen[*g as usize] += 1;
    }
    let mut over = Vec::new();
    for s in 0..=max_gen {
        if per_gen[s] == 0 {
            continue;
        }
        let in_window: u64 = per_gen[s.saturating_sub(9)..=s].iter().sum();
        if in_window > RESERVE {
            over.push((s, in_window));
        }
    }
    assert!(
        over.is_empty(),
        "{} windows granted more than the reserve of {RESERVE} (first ones, as (last slice, \
         grants)): {:?}",
        over.len(),
        &over[..over.len().min(10)]
    );
}

/// Threads that race on the first use of one key of a keyed map get the same instance: the
/// key's own, never the overflow one beside it (the map has room for exactly that key).
#[test]
fn racing_first_uses_of_a_key_get_one_instance() {
    let rt = paused_runtime();
    let handle = rt.handle().clone();
    let _g = handle.enter();
    let mut split = 0;
    for _ in 0..1_000 {
        let k = Keyed::builder()
            .max_keys(1)
            .build(|_: &u32| AtomicU64::new(0))
            .unwrap();
        let barrier = Barrier::new(THREADS);
        let overflowed = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let (k, handle, barrier, overflowed) = (&k, &handle, &barrier, &overflowed);
                s.spawn(move || {
                    let _g = handle.enter();
                    barrier.wait();
                    if k.get(&7).is_overflow() {
                        overflowed.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(k.len(), 1);
        if overflowed.load(Ordering::Relaxed) > 0 {
            split += 1;
        }
    }
    assert_eq!(
        split, 0,
        "rounds in which key 7 got both its own instance and the overflow one"
    );
}

/// The same race as a user sees it: a keyed rate limiter with a burst of one admits one call
/// per key, even when that key's first calls arrive on several threads at once.
#[test]
fn a_keyed_rate_limiter_admits_one_burst_per_key_under_a_first_use_race() {
    let rt = paused_runtime();
    let handle = rt.handle().clone();
    let _g = handle.enter();
    let mut over = Vec::new();
    for round in 0..1_000 {
        let limiter = KeyedRateLimiter::builder()
            .per_minute(1)
            .burst(1)
            .max_keys(1)
            .build()
            .unwrap();
        let barrier = Barrier::new(THREADS);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let (limiter, handle, barrier, admitted) = (&limiter, &handle, &barrier, &admitted);
                s.spawn(move || {
                    let _g = handle.enter();
                    barrier.wait();
                    if limiter.check(&"tenant").is_ok() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let n = admitted.load(Ordering::Relaxed);
        if n > 1 {
            over.push((round, n));
        }
    }
    assert!(
        over.is_empty(),
        "rounds admitting more than the burst of 1 for one key, as (round, admitted): {:?}",
        &over[..over.len().min(10)]
    );
}
