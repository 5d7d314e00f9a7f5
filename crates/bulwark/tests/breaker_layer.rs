//! The circuit breaker as tower middleware.

use std::time::Duration;

use bulwark::breaker::{CircuitBreaker, CircuitBreakerLayer};
use bulwark::events::BreakerState;
use bulwark::{BoxError, Outcome};
use tokio::time::advance;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection refused")
    }
}

impl std::error::Error for Refused {}

fn breaker() -> CircuitBreaker {
    CircuitBreaker::builder()
        .name("upstream")
        .count_window(4)
        .minimum_calls(4)
        .open_duration(Duration::from_secs(5))
        .half_open_calls(1)
        .build()
        .unwrap()
}

/// Answers `req` as the status, or fails with `Refused` for 0.
async fn upstream(req: u16) -> Result<u16, Refused> {
    if req == 0 {
        Err(Refused)
    } else {
        Ok(req)
    }
}

#[tokio::test(start_paused = true)]
async fn opens_and_rejects_with_a_downcastable_circuit_open() {
    let b = breaker();
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(b.clone()))
        .service(service_fn(upstream));

    for _ in 0..4 {
        let err = svc.ready().await.unwrap().call(0).await.unwrap_err();
        // The inner error passes through unchanged.
        assert!(err.downcast_ref::<Refused>().is_some(), "{err}");
    }
    assert_eq!(b.state(), BreakerState::Open);

    let err: BoxError = svc.ready().await.unwrap().call(200).await.unwrap_err();
    match err.downcast_ref::<bulwark::Error>() {
        Some(bulwark::Error::CircuitOpen { name, retry_after }) => {
            assert_eq!(&**name, "upstream");
            assert_eq!(*retry_after, Duration::from_secs(5));
        }
        other => panic!("expected CircuitOpen, got {other:?}"),
    }

    advance(Duration::from_secs(5)).await;
    assert_eq!(svc.ready().await.unwrap().call(200).await.unwrap(), 200);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_classifier_sees_ok_responses() {
    let b = breaker();
    let layer =
        CircuitBreakerLayer::new(b.clone()).classifier(|r: &Result<u16, Refused>| match r {
            Ok(s) if *s >= 500 => Outcome::Failure,
            Ok(404) => Outcome::Ignore,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        });
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(upstream));
    for _ in 0..10 {
        assert_eq!(svc.ready().await.unwrap().call(404).await.unwrap(), 404);
    }
    assert_eq!(b.snapshot().calls, 0);
    for _ in 0..4 {
        assert_eq!(svc.ready().await.unwrap().call(503).await.unwrap(), 503);
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_response_future_frees_the_probe() {
    let b = breaker();
    let mut svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(b.clone()))
        .service(service_fn(|hang: bool| async move {
            if hang {
                std::future::pending::<()>().await;
            }
            Ok::<_, Refused>(())
        }));
    for _ in 0..4 {
        b.try_acquire().unwrap().failure();
    }
    advance(Duration::from_secs(5)).await;
    let hung = svc.ready().await.unwrap().call(true);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    // The only probe slot is taken.
    let err = svc.ready().await.unwrap().call(false).await.unwrap_err();
    assert!(err.downcast_ref::<bulwark::Error>().is_some());
    drop(hung);
    svc.ready().await.unwrap().call(false).await.unwrap();
    assert_eq!(b.state(), BreakerState::Closed);
}
