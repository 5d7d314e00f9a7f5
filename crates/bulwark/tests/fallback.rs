//! Fallback: triggers on the chosen kinds only, hands the error to the alternative,
//! reports events, and works as a tower layer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark::fallback::{Fallback, FallbackLayer, KINDS};
use bulwark::{BoxError, Error, Event, Outcome};
use tower::{service_fn, Layer, ServiceExt};

type E = Error<&'static str>;

fn all_errors() -> Vec<E> {
    vec![
        Error::Inner("boom"),
        Error::CircuitOpen {
            name: "b".into(),
            retry_after: Duration::from_secs(1),
        },
        Error::Timeout,
        Error::BulkheadFull,
        Error::RateLimited {
            retry_after: Duration::from_secs(1),
        },
        Error::Shed,
        Error::RetryBudgetExhausted,
    ]
}

type Seen = Arc<Mutex<Vec<Event>>>;

fn recorder() -> (Seen, impl Fn(&Event) + Send + Sync + 'static) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |e: &Event| s.lock().unwrap().push(e.clone()))
}

fn fallback_kinds(seen: &Seen) -> Vec<&'static str> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|e| match e {
            Event::Fallback { kind, .. } => *kind,
            other => panic!("unexpected event {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn default_triggers_on_every_kind_and_alternative_gets_the_error() {
    let (seen, listener) = recorder();
    let fb = Fallback::builder()
        .name("fb")
        .listener(listener)
        .build()
        .unwrap();
    for err in all_errors() {
        let expected = err.clone();
        let r = fb
            .call(
                || async move { Err::<u32, E>(err) },
                |got| async move {
                    assert_eq!(got, expected);
                    Ok(7)
                },
            )
            .await;
        assert_eq!(r, Ok(7));
    }
    assert_eq!(fallback_kinds(&seen), KINDS.to_vec());
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|e| matches!(e, Event::Fallback { name, .. } if &**name == "fb")));
}

#[tokio::test]
async fn chosen_kinds_only() {
    let (seen, listener) = recorder();
    let fb = Fallback::builder()
        .on_kinds(["circuit_open", "timeout"])
        .listener(listener)
        .build()
        .unwrap();
    for err in all_errors() {
        let kind = err.kind();
        let alt_ran = Arc::new(Mutex::new(false));
        let a = alt_ran.clone();
        let r = fb
            .call(
                || async move { Err::<u32, E>(err) },
                |_| async move {
                    *a.lock().unwrap() = true;
                    Ok(1)
                },
            )
            .await;
        let should = kind == "circuit_open" || kind == "timeout";
        assert_eq!(*alt_ran.lock().unwrap(), should, "kind {kind}");
        if should {
            assert_eq!(r, Ok(1));
        } else {
            assert_eq!(r.unwrap_err().kind(), kind, "error returned unchanged");
        }
    }
    assert_eq!(fallback_kinds(&seen), ["circuit_open", "timeout"]);
}

#[tokio::test]
async fn success_never_runs_the_alternative_nor_emits() {
    let (seen, listener) = recorder();
    let fb = Fallback::builder().listener(listener).build().unwrap();
    let r = fb
        .call(
            || async { Ok::<u32, E>(3) },
            |_| async { panic!("must not run") },
        )
        .await;
    assert_eq!(r, Ok(3));
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn predicate_trigger_and_failing_alternative() {
    let fb = Fallback::builder()
        .when(|e: &E| matches!(e, Error::Inner(msg) if msg.starts_with("retryable")))
        .build()
        .unwrap();
    let r = fb
        .call(
            || async { Err::<u32, E>(Error::Inner("retryable: reset")) },
            |e| async move {
                assert_eq!(e, Error::Inner("retryable: reset"));
                Err(Error::Inner("alt failed"))
            },
        )
        .await;
    assert_eq!(r, Err(Error::Inner("alt failed")));
    let r = fb
        .call(
            || async { Err::<u32, E>(Error::Inner("fatal")) },
            |_| async { Ok(0) },
        )
        .await;
    assert_eq!(r, Err(Error::Inner("fatal")));
    let r = fb
        .call(
            || async { Err::<u32, E>(Error::Timeout) },
            |_| async { Ok(0) },
        )
        .await;
    assert_eq!(r, Err(Error::Timeout));
}

#[tokio::test]
async fn plain_operation_with_question_mark() {
    async fn fetch() -> Result<u32, std::io::Error> {
        Err(std::io::Error::other("down"))
    }
    let fb = Fallback::builder().build().unwrap();
    let r = fb
        .call(
            || async { Ok::<_, Error<std::io::Error>>(fetch().await?) },
            |e| async move {
                assert_eq!(e.to_string(), "down");
                Ok(0)
            },
        )
        .await;
    assert_eq!(r.unwrap(), 0);
}

#[tokio::test]
async fn call_with_falls_back_on_classified_ok() {
    let (seen, listener) = recorder();
    let fb = Fallback::builder()
        .on_kinds(["timeout"])
        .listener(listener)
        .build()
        .unwrap();
    let classify = |r: &Result<u16, E>| match r {
        Ok(s) if *s >= 500 => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(Error::Inner("not found")) => Outcome::Ignore,
        Err(_) => Outcome::Failure,
    };
    // 503 arrived as Ok: falls back, the alternative sees the whole result.
    let r = fb
        .call_with(
            &classify,
            || async { Ok(503) },
            |failed| async move {
                assert_eq!(failed, Ok(503));
                Ok(200)
            },
        )
        .await;
    assert_eq!(r, Ok(200));
    // 404 is a success for this classifier.
    let r = fb
        .call_with(&classify, || async { Ok(404) }, |_| async { Ok(200) })
        .await;
    assert_eq!(r, Ok(404));
    // An ignored error is returned as is.
    let r = fb
        .call_with(
            &classify,
            || async { Err(Error::Inner("not found")) },
            |_| async { Ok(200) },
        )
        .await;
    assert_eq!(r, Err(Error::Inner("not found")));
    // A failure of a kind not chosen is returned as is.
    let r = fb
        .call_with(
            &classify,
            || async { Err(Error::Shed) },
            |_| async { Ok(200) },
        )
        .await;
    assert_eq!(r, Err(Error::Shed));
    // A timeout is chosen.
    let r = fb
        .call_with(
            &classify,
            || async { Err(Error::Timeout) },
            |failed| async move {
                assert_eq!(failed, Err(Error::Timeout));
                Ok(201)
            },
        )
        .await;
    assert_eq!(r, Ok(201));
    assert_eq!(fallback_kinds(&seen), ["inner", "timeout"]);
}

#[test]
fn builder_rejects_unknown_or_empty_kinds_and_empty_name() {
    let e = Fallback::builder()
        .on_kinds(["timout"])
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "on_kinds");
    assert!(e.reason().contains("timout"));
    let e = Fallback::builder().on_kinds([]).build().unwrap_err();
    assert_eq!(e.field(), "on_kinds");
    let e = Fallback::builder().name("").build().unwrap_err();
    assert_eq!(e.field(), "name");
}

#[tokio::test]
async fn layer_answers_chosen_errors_and_passes_others_through() {
    let (seen, listener) = recorder();
    let policy = Fallback::builder()
        .name("edge")
        .on_kinds(["circuit_open", "inner"])
        .listener(listener)
        .build()
        .unwrap();
    let layer = FallbackLayer::new(policy, |err: Error| async move {
        match err {
            Error::Inner(e) if e.to_string() == "decline" => Err(e),
            other => Ok(format!("fallback for {}", other.kind())),
        }
    });
    let svc = layer.layer(service_fn(|req: &'static str| async move {
        match req {
            "ok" => Ok("fine".to_string()),
            "open" => Err::<String, BoxError>(Box::new(Error::<BoxError>::CircuitOpen {
                name: "up".into(),
                retry_after: Duration::from_secs(3),
            })),
            "timeout" => Err(Box::new(Error::<BoxError>::Timeout) as BoxError),
            "io" => Err(Box::new(std::io::Error::other("refused")) as BoxError),
            _ => Err("decline".into()),
        }
    }));

    assert_eq!(svc.clone().oneshot("ok").await.unwrap(), "fine");
    assert_eq!(
        svc.clone().oneshot("open").await.unwrap(),
        "fallback for circuit_open"
    );
    assert_eq!(
        svc.clone().oneshot("io").await.unwrap(),
        "fallback for inner"
    );

    // Not chosen: the boxed policy error comes out as a boxed policy error.
    let err = svc.clone().oneshot("timeout").await.unwrap_err();
    assert!(matches!(err.downcast_ref::<Error>(), Some(Error::Timeout)));

    // The fallback function may decline with an error.
    let err = svc.clone().oneshot("decline").await.unwrap_err();
    assert_eq!(err.to_string(), "decline");

    assert_eq!(fallback_kinds(&seen), ["circuit_open", "inner", "inner"]);
}

#[tokio::test]
async fn layer_passes_untriggered_inner_errors_through_unchanged() {
    let policy = Fallback::builder().on_kinds(["shed"]).build().unwrap();
    let layer = FallbackLayer::new(policy, |_e: Error| async { Ok::<_, BoxError>(0u8) });
    let svc = layer.layer(service_fn(|()| async {
        Err::<u8, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ))
    }));
    let err = svc.oneshot(()).await.unwrap_err();
    let io = err
        .downcast_ref::<std::io::Error>()
        .expect("the io error itself");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
}

fn assert_send<T: Send>(_: &T) {}
fn assert_send_sync<T: Send + Sync>() {}

#[tokio::test]
async fn futures_and_policy_are_send() {
    assert_send_sync::<Fallback>();
    let fb = Fallback::builder().build().unwrap();
    let fut = fb.call(|| async { Ok::<u8, Error>(1) }, |_| async { Ok(2) });
    assert_send(&fut);
    let layer = FallbackLayer::new(fb.clone(), |_e: Error| async { Ok::<_, BoxError>(0u8) });
    let mut svc = layer.layer(service_fn(|x: u8| async move { Ok::<_, BoxError>(x) }));
    let fut = tower::Service::call(&mut svc, 1);
    assert_send(&fut);
    assert_eq!(fut.await.unwrap(), 1);
}
