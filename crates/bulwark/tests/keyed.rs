//! Bounded-cardinality keyed policies: the key cap under floods, idle eviction at
//! exactly the idle timeout, in-use entries kept, top-N labels, and the keyed
//! bulkhead and rate limiter built on them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::bulkhead::KeyedBulkhead;
use bulwark::keyed::{Keyed, OTHER};
use bulwark::rate_limit::KeyedRateLimiter;
use bulwark::{Error, Event};
use tokio::time::advance;

const NS: Duration = Duration::from_nanos(1);
const MS: Duration = Duration::from_millis(1);
const MIN: Duration = Duration::from_secs(60);

fn counters(max_keys: usize) -> Keyed<u64, AtomicU64> {
    Keyed::builder()
        .max_keys(max_keys)
        .idle_timeout(MIN)
        .build(|_: &u64| AtomicU64::new(0))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_100k_distinct_keys_never_exceeds_max_keys() {
    let k = counters(100);
    for i in 0..100_000u64 {
        let e = k.get(&i);
        assert!(k.len() <= 100);
        assert_eq!(e.is_overflow(), i >= 100, "key {i}");
        if e.is_overflow() {
            assert_eq!(e.key(), None);
        } else {
            assert_eq!(e.key(), Some(&i));
        }
        e.fetch_add(1, Ordering::Relaxed);
    }
    assert_eq!(k.len(), 100);
    assert_eq!(k.overflow_calls(), 99_900);
    // Every overflowing key shared one instance.
    assert_eq!(k.overflow().unwrap().load(Ordering::Relaxed), 99_900);
    // Keys already present keep their own instance.
    let e = k.get(&7);
    assert!(!e.is_overflow());
    assert_eq!(e.load(Ordering::Relaxed), 1);
}

#[test]
fn concurrent_floods_never_exceed_max_keys() {
    let k = counters(1000);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let k = k.clone();
            std::thread::spawn(move || {
                for i in 0..25_000u64 {
                    let _ = k.get(&(t * 1_000_000 + i));
                    assert!(k.len() <= 1000);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(k.len(), 1000);
    assert_eq!(k.overflow_calls(), 99_000);
}

#[tokio::test(start_paused = true)]
async fn idle_entries_are_evicted_at_exactly_the_idle_timeout_to_make_room() {
    let k = counters(2);
    assert!(!k.get(&1).is_overflow());
    assert!(!k.get(&2).is_overflow());
    assert!(k.get(&3).is_overflow());

    advance(MIN - NS).await;
    assert!(k.get(&3).is_overflow(), "nothing is idle yet");
    assert_eq!(k.len(), 2);

    advance(NS).await;
    let e = k.get(&3);
    assert!(
        !e.is_overflow(),
        "1 and 2 were idle for exactly the timeout"
    );
    assert_eq!(k.len(), 1);
    assert!(k.peek(&1).is_none() && k.peek(&2).is_none());
}

#[tokio::test(start_paused = true)]
async fn recently_used_entries_are_kept() {
    let k = counters(2);
    let _ = k.get(&1);
    let _ = k.get(&2);
    advance(MIN / 2).await;
    let _ = k.get(&1); // 1 is used again at 30 s
    advance(MIN / 2).await;
    assert!(!k.get(&3).is_overflow(), "2 was evicted at 60 s");
    assert!(k.peek(&1).is_some());
    assert!(k.peek(&2).is_none());
    assert!(k.get(&4).is_overflow(), "1 is idle only from 90 s");
    advance(MIN / 2 - NS).await;
    assert!(k.get(&4).is_overflow());
    advance(NS).await;
    assert!(!k.get(&4).is_overflow());
    assert!(k.peek(&1).is_none());
}

#[tokio::test(start_paused = true)]
async fn entries_in_use_are_never_evicted() {
    let k = counters(1);
    let held = k.get(&1);
    advance(10 * MIN).await;
    assert!(k.get(&2).is_overflow(), "1 is idle but in use");
    assert_eq!(k.evict_idle(), 0);
    drop(held);
    // Idle from when it was given back.
    assert_eq!(k.evict_idle(), 0);
    advance(MIN).await;
    assert_eq!(k.evict_idle(), 1);
    assert!(!k.get(&2).is_overflow());
}

#[tokio::test(start_paused = true)]
async fn remove_frees_a_slot() {
    let k = counters(1);
    let _ = k.get(&1);
    assert!(k.remove(&1));
    assert!(!k.remove(&1));
    assert_eq!(k.len(), 0);
    assert!(!k.get(&2).is_overflow());
}

#[tokio::test(start_paused = true)]
async fn labels_name_only_the_top_keys_and_call_the_rest_other() {
    let k: Keyed<String, ()> = Keyed::builder()
        .max_keys(3)
        .top_n(2)
        .label_refresh(Duration::from_secs(10))
        .build(|_: &String| ())
        .unwrap();
    let key = |s: &str| s.to_string();
    for (name, calls) in [("a", 5), ("b", 3), ("c", 1), ("flood-1", 2), ("flood-2", 2)] {
        for _ in 0..calls {
            let _ = k.get(&key(name));
        }
    }
    assert_eq!(k.top_keys(), vec![(key("a"), 5), (key("b"), 3)]);
    assert_eq!(&*k.label(&key("a")), "a");
    assert_eq!(k.get(&key("b")).label(), "b");
    assert_eq!(&*k.label(&key("c")), OTHER);
    assert_eq!(
        &*k.label(&key("flood-1")),
        OTHER,
        "overflowed keys are other"
    );
    assert_eq!(&*k.label(&key("never-seen")), OTHER);
    assert_eq!(k.get(&key("flood-1")).label(), OTHER);

    // c becomes the busiest; labels follow at the next refresh, not before.
    for _ in 0..10 {
        let _ = k.get(&key("c"));
    }
    assert_eq!(&*k.label(&key("c")), OTHER);
    advance(Duration::from_secs(10)).await;
    let _ = k.get(&key("a")); // the first call after the interval refreshes
    assert_eq!(&*k.label(&key("c")), "c");
    assert_eq!(&*k.label(&key("a")), "a");
    assert_eq!(&*k.label(&key("b")), OTHER);
}

#[tokio::test(start_paused = true)]
async fn keyed_rate_limiter_keeps_keys_independent_and_exact() {
    let l = KeyedRateLimiter::builder()
        .per_second(10)
        .burst(2)
        .build()
        .unwrap();
    for key in ["a", "b"] {
        l.check(&key).unwrap();
        l.check(&key).unwrap();
    }
    assert_eq!(l.check(&"a").unwrap_err().retry_after(), Some(100 * MS));
    assert_eq!(l.remaining(&"c"), 2, "an unseen key has a full burst");
    advance(50 * MS).await;
    l.check(&"c").unwrap();
    assert_eq!(l.check(&"b").unwrap_err().retry_after(), Some(50 * MS));
    advance(50 * MS - NS).await;
    assert_eq!(l.check(&"a").unwrap_err().retry_after(), Some(NS));
    advance(NS).await;
    l.check(&"a").unwrap();
    l.check(&"b").unwrap();
    assert_eq!(
        l.remaining(&"c"),
        1,
        "c's cell taken at 50 ms conforms again at 150 ms"
    );

    assert_eq!(l.check_n(&"d", 2), Ok(Ok(())));
    assert!(l.check_n(&"d", 3).is_err(), "more than the burst");
    assert_eq!(
        l.call(&"d", || async { Ok::<_, ()>(1) }).await,
        Err(Error::RateLimited {
            retry_after: 100 * MS
        })
    );
    assert_eq!(l.call(&"e", || async { Ok::<_, ()>(1) }).await, Ok(1));
}

#[tokio::test(start_paused = true)]
async fn keyed_rate_limiter_flood_shares_the_overflow_budget_and_events_use_labels() {
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = names.clone();
    let l = KeyedRateLimiter::builder()
        .per_second(1)
        .burst(1)
        .max_keys(2)
        .top_n(1)
        .listener(move |e: &Event| {
            if let Event::RateLimited { name } = e {
                seen.lock().unwrap().push(name.to_string());
            }
        })
        .build()
        .unwrap();
    l.check(&1u32).unwrap();
    l.check(&2u32).unwrap();
    // Every further key shares one budget of 1 per second.
    l.check(&3u32).unwrap();
    for k in 4..1000u32 {
        assert!(l.check(&k).is_err());
    }
    assert_eq!(l.len(), 2);
    assert_eq!(l.overflow_calls(), 997);

    // Key 1 took the one label at its first call (key 2 found none left): its refusal is
    // named, the overflow's are `other`; the refresh keeps it (2 checks, the most).
    let _ = l.check(&1u32); // rejected: key 1 is spent
    let _ = l.top_keys();
    let _ = l.check(&1u32);
    let _ = l.check(&2u32);
    let names = names.lock().unwrap();
    assert_eq!(names.len(), 999);
    assert!(names[..996].iter().all(|n| n == OTHER));
    assert_eq!(names[996..], ["1", "1", OTHER]);
}

#[test]
fn keyed_rate_limiter_idle_timeout_must_cover_the_refill() {
    let e = KeyedRateLimiter::builder()
        .per_minute(60) // burst 60 × 1 s = 60 s to refill
        .idle_timeout(Duration::from_secs(59))
        .build::<u32>()
        .unwrap_err();
    assert_eq!(e.field(), "idle_timeout");
    assert!(KeyedRateLimiter::builder()
        .per_minute(60)
        .idle_timeout(Duration::from_secs(60))
        .build::<u32>()
        .is_ok());
    // Not set: the default grows to cover the refill.
    assert!(KeyedRateLimiter::builder()
        .rate(1, Duration::from_secs(3600))
        .build::<u32>()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn keyed_rate_limiter_evicts_only_refilled_keys() {
    let l = KeyedRateLimiter::builder()
        .per_second(1)
        .burst(1)
        .max_keys(1)
        .idle_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    l.check(&1u32).unwrap();
    advance(Duration::from_secs(1)).await;
    l.check(&2u32).unwrap(); // key 1 (refilled, idle 1 s) made room
    assert_eq!(l.len(), 1);
    assert_eq!(l.overflow_calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn keyed_bulkhead_isolates_keys_and_keeps_busy_keys() {
    let rejected = Arc::new(AtomicUsize::new(0));
    let seen = rejected.clone();
    let b = KeyedBulkhead::builder()
        .max_concurrent(1)
        .max_keys(2)
        .idle_timeout(MIN)
        .listener(move |e: &Event| {
            if let Event::BulkheadRejected { name } = e {
                // `a`, labelled from its first call (the map has labels to spare).
                assert_eq!(&**name, "a");
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let a = b.acquire(&"a").await.unwrap();
    assert!(!a.is_overflow());
    assert_eq!(b.in_flight(&"a"), 1);
    assert!(matches!(b.acquire(&"a").await, Err(Error::BulkheadFull)));
    assert_eq!(rejected.load(Ordering::SeqCst), 1);
    assert!(b.try_acquire(&"b").is_some(), "b has its own slot");

    // The map is full (a, b): c and d share the overflow bulkhead's one slot.
    let c = b.try_acquire(&"c").unwrap();
    assert!(c.is_overflow());
    assert!(b.try_acquire(&"d").is_none());
    drop(c);

    // Hours later, a (in use) is kept and b (idle) makes room for c.
    advance(60 * MIN).await;
    let c = b.try_acquire(&"c").unwrap();
    assert!(!c.is_overflow());
    assert_eq!(b.in_flight(&"a"), 1, "a kept its bulkhead and its call");
    assert!(b.try_acquire(&"a").is_none());
    drop(a);
    assert!(b.try_acquire(&"a").is_some());

    let r = b.call(&"a", || async { Err::<(), _>("inner") }).await;
    assert_eq!(r, Err(Error::Inner("inner")));
}

/// The shared overflow breaker's events are named `other`, even when the key it was first built
/// for has since got its own entry and is a top key.
#[tokio::test(start_paused = true)]
async fn the_overflow_breaker_reports_as_other() {
    use bulwark::breaker::KeyedCircuitBreaker;
    use bulwark::Event;
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let kb = KeyedCircuitBreaker::builder()
        .breaker(|b| {
            b.count_window(1)
                .minimum_calls(1)
                .open_duration(Duration::from_secs(1))
        })
        .max_keys(1)
        .idle_timeout(Duration::from_secs(1))
        .listener(move |e: &Event| {
            if let Event::BreakerTransition { name, .. } = e {
                s2.lock().unwrap().push(name.to_string())
            }
        })
        .build::<String>()
        .unwrap();
    let ok = || async { Ok::<(), ()>(()) };
    kb.call(&"a".to_string(), ok).await.unwrap(); // map: {a}
    kb.call(&"b".to_string(), ok).await.unwrap(); // b -> overflow breaker (built for "b")
    tokio::time::advance(Duration::from_secs(2)).await;
    kb.call(&"b".to_string(), ok).await.unwrap(); // a evicted, b gets its own entry
    let _ = kb.top_keys(); // b is now a top key
    let _ = kb
        .call(&"c".to_string(), || async { Err::<(), ()>(()) })
        .await; // trips overflow breaker
    assert_eq!(*seen.lock().unwrap(), vec!["other".to_string()]);
}

/// `top_n` has no upper bound: `usize::MAX` means every key gets its own label (it used to
/// overflow sizing the scan's vector on the first refresh).
#[tokio::test(start_paused = true)]
async fn top_n_of_usize_max_labels_every_key() {
    for top_n in [usize::MAX / 2, usize::MAX] {
        let k: Keyed<u64, AtomicU64> = Keyed::builder()
            .max_keys(10)
            .idle_timeout(MIN)
            .top_n(top_n)
            .build(|_: &u64| AtomicU64::new(0))
            .expect("build accepts any top_n");
        for i in 0..3u64 {
            let _ = k.get(&i);
        }
        assert_eq!(
            k.top_keys().len(),
            3,
            "top_n = {top_n}: every key is a top key"
        );
        assert_eq!(&*k.label(&1), "1");
    }
}

/// A listener set on the per-key template (`.breaker(|b| b.listener(..))`) is dropped, as
/// `breaker`'s doc says: the keyed builder's listeners get every key's events under its label
/// (the template's would have heard all keys under one name; review ev2).
#[tokio::test(start_paused = true)]
async fn a_listener_on_the_per_key_template_is_replaced_by_the_keyed_ones() {
    use bulwark::breaker::KeyedCircuitBreaker;
    let template_heard = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (t2, s2) = (template_heard.clone(), seen.clone());
    let kb = KeyedCircuitBreaker::builder()
        .breaker(move |b| {
            b.count_window(1)
                .minimum_calls(1)
                .listener(move |_: &Event| {
                    t2.fetch_add(1, Ordering::SeqCst);
                })
        })
        .listener(move |e: &Event| {
            if let Event::BreakerTransition { name, .. } = e {
                s2.lock().unwrap().push(name.to_string())
            }
        })
        .build::<String>()
        .unwrap();
    let _ = kb
        .call(&"a".to_string(), || async { Err::<(), ()>(()) })
        .await;
    assert_eq!(
        *seen.lock().unwrap(),
        ["a"],
        "the keyed listener heard the trip"
    );
    assert_eq!(template_heard.load(Ordering::SeqCst), 0);
}

/// A key takes a label at its first call while the map has labels to spare: a keyed limiter's
/// one key is named in its first refusal, not `other` until the first label refresh 10 s later
/// (review dc2).
#[tokio::test(start_paused = true)]
async fn a_new_key_is_named_from_its_first_event_while_labels_are_spare() {
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = names.clone();
    let limiter = KeyedRateLimiter::builder()
        .name("tenants")
        .per_second(1)
        .burst(1)
        .listener(move |e: &Event| {
            if let Event::RateLimited { name } = e {
                seen.lock().unwrap().push(name.to_string());
            }
        })
        .build::<&'static str>()
        .unwrap();
    limiter.check(&"acme").unwrap();
    assert!(limiter.check(&"acme").is_err());
    assert_eq!(*names.lock().unwrap(), ["tenants/acme"]);
}

/// So one keyed breaker's trip and recovery land in one series (its trip was reported as
/// `tenants/other` and its recovery as `tenants/acme`, leaving the `other` state gauge at open;
/// review dc2).
#[tokio::test(start_paused = true)]
async fn a_new_keys_breaker_reports_its_trip_and_recovery_under_one_name() {
    use bulwark::breaker::KeyedCircuitBreaker;
    use bulwark::events::BreakerState;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let breakers = KeyedCircuitBreaker::builder()
        .name("tenants")
        .breaker(|b| {
            b.count_window(2)
                .minimum_calls(2)
                .half_open_calls(1)
                .open_duration(Duration::from_secs(10))
        })
        .listener(move |e: &Event| {
            if let Event::BreakerTransition { name, to, .. } = e {
                s2.lock().unwrap().push((name.to_string(), *to));
            }
        })
        .build::<&'static str>()
        .unwrap();
    for _ in 0..2 {
        let _ = breakers
            .call(&"acme", || async { Err::<(), _>("down") })
            .await;
    }
    advance(Duration::from_secs(10)).await;
    breakers
        .call(&"acme", || async { Ok::<_, ()>(()) })
        .await
        .unwrap();
    let acme = "tenants/acme".to_string();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (acme.clone(), BreakerState::Open),
            (acme.clone(), BreakerState::HalfOpen),
            (acme, BreakerState::Closed),
        ]
    );
}

/// The label of an evicted key is free again: a new key (or the same one coming back) takes
/// it at its first call, not `other` until the next refresh (diff review df8).
#[tokio::test(start_paused = true)]
async fn an_evicted_keys_label_goes_to_the_next_new_key() {
    let k: Keyed<&'static str, ()> = Keyed::builder()
        .top_n(1)
        .idle_timeout(Duration::from_secs(1))
        .label_refresh(Duration::from_secs(3600))
        .build(|_: &&'static str| ())
        .unwrap();
    assert_eq!(k.get(&"old").label(), "old");
    advance(Duration::from_secs(2)).await;
    assert_eq!(k.evict_idle(), 1);
    assert_eq!(k.get(&"new").label(), "new");
    assert_eq!(k.get(&"other-key").label(), OTHER, "one label, held");
    advance(Duration::from_secs(2)).await;
    assert_eq!(k.evict_idle(), 2);
    assert_eq!(
        k.get(&"new").label(),
        "new",
        "coming back, it is named again"
    );
}
