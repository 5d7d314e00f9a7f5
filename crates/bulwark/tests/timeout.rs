//! Timeout and Deadline: exact firing on paused time, scope nesting, the tower layer.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::timeout::{Deadline, Timeout, TimeoutKind, TimeoutLayer};
use bulwark::{BoxError, Error, Event};
use tokio::time::{sleep, Instant};
use tower::{service_fn, Layer, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn take(d: Duration) -> Result<&'static str, &'static str> {
    sleep(d).await;
    Ok("done")
}

#[tokio::test(start_paused = true)]
async fn fires_exactly_at_the_duration() {
    let t = Timeout::attempt(ms(100));
    let start = Instant::now();
    let r = t.call(|| take(ms(5000))).await;
    assert_eq!(r, Err(Error::Timeout));
    assert_eq!(start.elapsed(), ms(100));
}

#[tokio::test(start_paused = true)]
async fn a_call_finishing_in_time_passes_through() {
    let t = Timeout::attempt(ms(100));
    let start = Instant::now();
    assert_eq!(t.call(|| take(ms(99))).await, Ok("done"));
    assert_eq!(start.elapsed(), ms(99));
    // Ready exactly at the deadline: the result wins over the timer.
    assert_eq!(t.call(|| take(ms(100))).await, Ok("done"));
    // The operation's own error is Inner.
    let r = t.call(|| async { Err::<(), _>("refused") }).await;
    assert_eq!(r, Err(Error::Inner("refused")));
}

#[tokio::test(start_paused = true)]
async fn emits_an_event_with_name_and_kind() {
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let s = seen.clone();
    let t = Timeout::builder()
        .name("db")
        .duration(ms(10))
        .kind(TimeoutKind::Total)
        .listener(move |e: &Event| s.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let _ = t.call(|| take(ms(5))).await;
    assert!(seen.lock().unwrap().is_empty(), "no event on success");
    let _ = t.call(|| take(ms(50))).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [Event::Timeout {
            name: "db".into(),
            kind: "total"
        }]
    );
}

#[test]
fn builder_validates() {
    assert_eq!(
        Timeout::builder().build().unwrap_err().field(),
        "duration",
        "duration is required"
    );
    assert!(Timeout::builder().duration(Duration::ZERO).build().is_err());
    let t = Timeout::builder().duration(ms(5)).build().unwrap();
    assert_eq!((t.duration(), t.kind()), (ms(5), TimeoutKind::Attempt));
    assert_eq!(Timeout::total(ms(1)).kind().as_str(), "total");
}

#[tokio::test(start_paused = true)]
async fn deadline_basics() {
    let d = Deadline::after(ms(100));
    assert_eq!(d.instant(), Instant::now() + ms(100));
    assert_eq!(d.remaining(), ms(100));
    assert!(!d.is_expired());
    sleep(ms(60)).await;
    assert_eq!(d.remaining(), ms(40));
    sleep(ms(40)).await;
    assert!(d.is_expired());
    assert_eq!(d.remaining(), Duration::ZERO);
    assert_eq!(Deadline::at(d.instant()), d);
    assert!(Deadline::after(Duration::MAX).remaining() > Duration::from_secs(1_000_000));
}

#[tokio::test(start_paused = true)]
async fn nested_scopes_take_the_earlier_deadline() {
    let early = Deadline::after(ms(100));
    let late = Deadline::after(ms(500));
    assert_eq!(Deadline::current(), None);
    // Outer earlier: the inner cannot extend it.
    Deadline::scope(early, async {
        assert_eq!(Deadline::current(), Some(early));
        Deadline::scope(late, async {
            assert_eq!(Deadline::current(), Some(early));
        })
        .await;
        assert_eq!(Deadline::current(), Some(early));
    })
    .await;
    // Inner earlier: it tightens the outer, only inside.
    Deadline::scope(late, async {
        Deadline::scope(early, async {
            assert_eq!(Deadline::current(), Some(early));
        })
        .await;
        assert_eq!(Deadline::current(), Some(late));
    })
    .await;
    assert_eq!(Deadline::current(), None);
    // Synchronous scope as well.
    Deadline::sync_scope(late, || {
        Deadline::sync_scope(early, || assert_eq!(Deadline::current(), Some(early)))
    });
}

#[tokio::test(start_paused = true)]
async fn nested_timeouts_expose_the_earlier_deadline() {
    let start = Instant::now();
    let outer = Timeout::total(ms(300));
    let inner = Timeout::attempt(ms(1000));
    let seen = outer
        .call(|| inner.call(|| async { Ok::<_, ()>(Deadline::current()) }))
        .await;
    assert_eq!(
        seen.map_err(Error::flatten),
        Ok(Some(Deadline::at(start + ms(300))))
    );
    // The outer fires at its own duration even though the inner would wait longer.
    let r = outer.call(|| inner.call(|| take(ms(5000)))).await;
    assert_eq!(r.map_err(Error::flatten), Err(Error::Timeout));
    assert_eq!(start.elapsed(), ms(300));
}

// ---------------------------------------------------------------- tower

#[tokio::test(start_paused = true)]
async fn layer_fires_exactly_at_the_duration() {
    let svc =
        TimeoutLayer::new(Timeout::attempt(ms(100))).layer(service_fn(|d: Duration| async move {
            sleep(d).await;
            Ok::<_, Infallible>(d)
        }));
    let start = Instant::now();
    let err = svc.clone().oneshot(ms(5000)).await.unwrap_err();
    assert!(matches!(err.downcast_ref::<Error>(), Some(Error::Timeout)));
    assert_eq!(start.elapsed(), ms(100));

    let start = Instant::now();
    assert_eq!(svc.oneshot(ms(99)).await.unwrap(), ms(99));
    assert_eq!(start.elapsed(), ms(99));
}

#[derive(Debug)]
struct Refused;
impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused")
    }
}
impl std::error::Error for Refused {}

#[tokio::test(start_paused = true)]
async fn layer_passes_inner_errors_through_unchanged() {
    let svc = TimeoutLayer::new(Timeout::attempt(ms(100)))
        .layer(service_fn(|()| async { Err::<(), _>(Refused) }));
    let err: BoxError = svc.oneshot(()).await.unwrap_err();
    assert!(err.is::<Refused>());
}

#[tokio::test(start_paused = true)]
async fn layer_puts_the_deadline_in_scope_for_call_and_future() {
    let start = Instant::now();
    let svc = TimeoutLayer::new(Timeout::total(ms(250))).layer(service_fn(|()| {
        let in_call = Deadline::current();
        async move { Ok::<_, Infallible>((in_call, Deadline::current())) }
    }));
    let (in_call, in_future) = svc.oneshot(()).await.unwrap();
    let expected = Some(Deadline::at(start + ms(250)));
    assert_eq!(in_call, expected);
    assert_eq!(in_future, expected);
}
