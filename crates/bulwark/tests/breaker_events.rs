//! Breaker transitions reach listeners in the order they happened: two threads moving the breaker
//! at once, a listener that itself moves the breaker, and a listener that panics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bulwark::breaker::CircuitBreaker;
use bulwark::events::BreakerState::{self, Closed, ForcedOpen, Open};
use bulwark::Event;

type Seen = Arc<Mutex<Vec<(BreakerState, BreakerState)>>>;

fn record(seen: &Seen, e: &Event) {
    if let Event::BreakerTransition { from, to, .. } = e {
        seen.lock().unwrap().push((*from, *to));
    }
}

/// Thread A forces the breaker open and its listener is slow (it stops until released); thread
/// B closes the breaker meanwhile. A gauge fed by the listener must end at "closed": the events
/// arrive as open, then closed. Before, B delivered its own event at once, ahead of A's.
#[test]
fn two_threads_deliver_in_decision_order() {
    let seen: Seen = Arc::default();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let gate = Mutex::new((Some(entered_tx), release_rx));
    let first = AtomicBool::new(true);
    let s = seen.clone();
    let breaker = CircuitBreaker::builder()
        .listener(move |e: &Event| {
            if matches!(e, Event::BreakerTransition { .. }) && first.swap(false, Ordering::SeqCst) {
                let g = gate.lock().unwrap();
                g.0.as_ref().unwrap().send(()).unwrap();
                g.1.recv_timeout(Duration::from_secs(10)).unwrap();
            }
            record(&s, e);
        })
        .build()
        .unwrap();

    let b = breaker.clone();
    let a = thread::spawn(move || b.force_open());
    entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let b = breaker.clone();
    thread::spawn(move || b.close()).join().unwrap();
    assert_eq!(breaker.state(), Closed);
    release_tx.send(()).unwrap();
    a.join().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(Closed, ForcedOpen), (ForcedOpen, Closed)]
    );
}

/// A listener that reacts to the breaker opening by forcing it open does not deadlock, and its
/// transition is delivered after the one it reacted to.
#[test]
fn listener_that_moves_the_breaker() {
    let seen: Seen = Arc::default();
    let slot: Arc<Mutex<Option<CircuitBreaker>>> = Arc::default();
    let (s, sl) = (seen.clone(), slot.clone());
    let breaker = CircuitBreaker::builder()
        .count_window(1)
        .minimum_calls(1)
        .listener(move |e: &Event| {
            record(&s, e);
            if let Event::BreakerTransition { to: Open, .. } = e {
                let b = sl.lock().unwrap().clone();
                if let Some(b) = b {
                    b.force_open();
                }
            }
        })
        .build()
        .unwrap();
    *slot.lock().unwrap() = Some(breaker.clone());
    let permit = breaker.try_acquire().unwrap();
    permit.failure();
    assert_eq!(breaker.state(), ForcedOpen);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(Closed, Open), (Open, ForcedOpen)]
    );
    slot.lock().unwrap().take();
}

/// A listener that panics loses its own event, not every later one.
#[test]
fn panicking_listener_does_not_stop_later_events() {
    let seen: Seen = Arc::default();
    let first = AtomicBool::new(true);
    let s = seen.clone();
    let breaker = CircuitBreaker::builder()
        .listener(move |e: &Event| {
            if first.swap(false, Ordering::SeqCst) {
                panic!("listener bug");
            }
            record(&s, e);
        })
        .build()
        .unwrap();
    let b = breaker.clone();
    assert!(thread::spawn(move || b.force_open()).join().is_err());
    breaker.close();
    breaker.disable();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(ForcedOpen, Closed), (Closed, BreakerState::Disabled)]
    );
}

/// Thread A delivers its own transition (closed -> forced open) and the listener is still at it
/// when thread B closes the breaker: B pushes its transition into the outbox, sees A delivering,
/// and returns, leaving its event to A. The listener then panics on A's event. The `Delivering`
/// guard only reopens the outbox (`delivering = false`); B's event stays queued and is delivered
/// only if and when some later transition happens, which may be never: a state gauge fed by the
/// listener shows "forced open" while the breaker is closed. Before the change B delivered its
/// own event. (The existing test `panicking_listener_does_not_stop_later_events` only checks
/// events decided after the panic, which trigger their own delivery.)
#[test]
fn an_event_left_to_a_deliverer_whose_listener_panics_is_still_delivered() {
    let seen: Seen = Arc::default();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let gate = Mutex::new((entered_tx, release_rx));
    let first = AtomicBool::new(true);
    let s = seen.clone();
    let breaker = CircuitBreaker::builder()
        .listener(move |e: &Event| {
            if let Event::BreakerTransition { from, to, .. } = e {
                if first.swap(false, Ordering::SeqCst) {
                    let g = gate.lock().unwrap();
                    g.0.send(()).unwrap();
                    g.1.recv_timeout(Duration::from_secs(10)).unwrap();
                    panic!("listener bug on its first event");
                }
                s.lock().unwrap().push((*from, *to));
            }
        })
        .build()
        .unwrap();

    let b = breaker.clone();
    let a = thread::spawn(move || b.force_open());
    entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // B closes the breaker while A's listener runs: its event is left to A.
    let b = breaker.clone();
    thread::spawn(move || b.close()).join().unwrap();
    assert_eq!(breaker.state(), Closed);
    release_tx.send(()).unwrap();
    assert!(a.join().is_err(), "A's listener panicked");

    // B's transition happened; it must have reached the listener (no further transition comes):
    // A delivered it before its listener's panic went on.
    assert!(
        seen.lock().unwrap().contains(&(ForcedOpen, Closed)),
        "the breaker is closed, but its (ForcedOpen -> Closed) transition was never delivered: \
         seen {:?}",
        seen.lock().unwrap()
    );
}

/// `restore` puts a breaker into a manual state as if built in it: no transition reaches the
/// listeners (a gateway re-applying an operator's override to a breaker a reload rebuilt must
/// not count a change nobody saw), later transitions are delivered as usual, and the states a
/// caller cannot set by hand are refused.
#[test]
fn restore_sets_a_manual_state_without_an_event() {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let breaker = CircuitBreaker::builder()
        .listener(move |e: &Event| record(&s, e))
        .build()
        .unwrap();
    assert!(breaker.restore(ForcedOpen));
    assert_eq!(breaker.state(), ForcedOpen);
    assert!(breaker.try_acquire().is_err());
    assert!(breaker.restore(BreakerState::Disabled));
    assert_eq!(breaker.state(), BreakerState::Disabled);
    assert!(!breaker.restore(Open));
    assert!(!breaker.restore(BreakerState::HalfOpen));
    assert_eq!(breaker.state(), BreakerState::Disabled);
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    breaker.close();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(BreakerState::Disabled, Closed)]
    );
}
