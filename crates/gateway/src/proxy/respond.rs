//! The one place that turns what happened into what the client sees.
//!
//! Every status code the gateway produces itself is chosen here, from one classification of what acted
//! ([`Failure`] for the attempt loop, [`Local`] for the listener and router). A response that came from
//! an upstream is passed through unchanged except for the `x-bulwark-*` headers.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::body::RespBody;

/// `x-bulwark-reason`: what acted.
pub static X_BULWARK_REASON: HeaderName = HeaderName::from_static("x-bulwark-reason");
/// `x-bulwark-attempts`: how many attempts were sent upstream.
pub static X_BULWARK_ATTEMPTS: HeaderName = HeaderName::from_static("x-bulwark-attempts");

/// Why the gateway could not return a successful upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Every upstream in the chain had its breaker open.
    CircuitOpen {
        /// Until a probe is allowed.
        retry_after: Duration,
    },
    /// No endpoint was available (health checks, ejection).
    NoHealthyEndpoint,
    /// The route's deadline or the last attempt's timeout expired.
    Timeout,
    /// A rate limit refused the request.
    RateLimited {
        /// Until a request would be admitted.
        retry_after: Duration,
    },
    /// A bulkhead was full.
    BulkheadFull,
    /// A retry was needed but the retry budget was spent.
    BudgetExhausted,
    /// Attempts failed without a response (connect failures, resets).
    UpstreamError,
    /// The admission queue shed the request (full of more important ones, or no slot in time).
    Shed,
    /// The gateway's operating mode refused the request before any attempt.
    Mode {
        /// `maintenance`, `read_only` or `degraded`.
        mode: crate::config::Mode,
        /// `mode_retry_after`.
        retry_after: Duration,
    },
}

impl Failure {
    /// The `x-bulwark-reason` value.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::CircuitOpen { .. } => "circuit_open",
            Failure::NoHealthyEndpoint => "no_healthy_endpoint",
            Failure::Timeout => "timeout",
            Failure::RateLimited { .. } => "rate_limited",
            Failure::BulkheadFull => "bulkhead_full",
            Failure::BudgetExhausted => "budget_exhausted",
            Failure::UpstreamError => "upstream_error",
            Failure::Mode { mode, .. } => mode.as_str(),
            Failure::Shed => "shed",
        }
    }

    fn status_and_retry_after(self) -> (StatusCode, Option<Duration>) {
        match self {
            Failure::CircuitOpen { retry_after } => {
                (StatusCode::SERVICE_UNAVAILABLE, Some(retry_after))
            }
            Failure::NoHealthyEndpoint => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, None),
            Failure::RateLimited { retry_after } => {
                (StatusCode::TOO_MANY_REQUESTS, Some(retry_after))
            }
            Failure::BulkheadFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            Failure::BudgetExhausted => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            Failure::UpstreamError => (StatusCode::BAD_GATEWAY, None),
            Failure::Shed => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(1)),
            ),
            Failure::Mode { retry_after, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, Some(retry_after))
            }
        }
    }
}

/// Responses the gateway gives before or instead of routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// No route matched.
    NoRoute,
    /// The request body is over `limits.max_body_bytes`.
    BodyTooLarge,
    /// The request head is over `limits.max_header_bytes`.
    HeadersTooLarge,
    /// The request could not be read (malformed, or the client's body failed).
    BadRequest,
    /// The client stopped sending its request body for `limits.idle_timeout`.
    BodyTimeout,
    /// The client went away in the middle of its request body: counted and logged as a 499
    /// `client_closed`, as a request dropped before its answer is (what is sent reaches no one,
    /// or a client that only closed its sending side).
    ClientClosed,
}

/// A route's static fallback response, prepared once.
#[derive(Debug, Clone)]
pub struct FallbackResponse {
    status: StatusCode,
    body: Bytes,
    content_type: Option<HeaderValue>,
}

impl FallbackResponse {
    /// From config (status and content type already validated).
    pub fn new(c: &crate::config::Fallback) -> Self {
        FallbackResponse {
            status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            body: Bytes::from(c.body.clone()),
            content_type: c
                .content_type
                .as_deref()
                .and_then(|c| HeaderValue::from_str(c).ok()),
        }
    }
}

fn attempts_value(n: u32) -> HeaderValue {
    HeaderValue::from(n)
}

fn retry_after_value(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// The response for a failure (or the route's fallback, which replaces it).
pub fn failure(
    f: Failure,
    attempts: u32,
    fallback: Option<&FallbackResponse>,
) -> Response<RespBody> {
    if let Some(fb) = fallback {
        return fallback_response(fb, attempts);
    }
    let (status, retry_after) = f.status_and_retry_after();
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    h.insert(
        X_BULWARK_REASON.clone(),
        HeaderValue::from_static(f.reason()),
    );
    if attempts > 0 {
        h.insert(X_BULWARK_ATTEMPTS.clone(), attempts_value(attempts));
    }
    if let Some(d) = retry_after {
        h.insert(RETRY_AFTER, retry_after_value(d));
    }
    resp
}

/// The answer of an injected abort (`fault.abort`): its status, an empty body, and
/// `x-bulwark-reason: fault`. A fallback does not replace it: the fault is what is being tested.
pub fn fault_abort(status: StatusCode) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if may_have_content(status) {
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    h.insert(X_BULWARK_REASON.clone(), HeaderValue::from_static("fault"));
    resp
}

/// Whether a response with `status` has content whose length a `content-length` gives: not a 204
/// (none), nor a 304 (its length would be the representation's, which the gateway does not know).
fn may_have_content(status: StatusCode) -> bool {
    !(status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED)
}

fn fallback_response(fb: &FallbackResponse, attempts: u32) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(fb.body.clone()));
    *resp.status_mut() = fb.status;
    let h = resp.headers_mut();
    if may_have_content(fb.status) {
        h.insert(CONTENT_LENGTH, HeaderValue::from(fb.body.len()));
    }
    if let Some(ct) = &fb.content_type {
        h.insert(CONTENT_TYPE, ct.clone());
    }
    h.insert(
        X_BULWARK_REASON.clone(),
        HeaderValue::from_static("fallback"),
    );
    if attempts > 0 {
        h.insert(X_BULWARK_ATTEMPTS.clone(), attempts_value(attempts));
    }
    resp
}

/// An upstream response that ended the attempt loop as a failure (e.g. a provider's 503 with its body):
/// passed through unchanged with `x-bulwark-attempts` and `x-bulwark-reason`, unless the route has a
/// fallback, which replaces it.
pub fn failed_upstream_response(
    mut resp: Response<RespBody>,
    attempts: u32,
    reason: Failure,
    fallback: Option<&FallbackResponse>,
) -> Response<RespBody> {
    if let Some(fb) = fallback {
        return fallback_response(fb, attempts);
    }
    let h = resp.headers_mut();
    h.insert(X_BULWARK_ATTEMPTS.clone(), attempts_value(attempts));
    h.insert(
        X_BULWARK_REASON.clone(),
        HeaderValue::from_static(reason.reason()),
    );
    resp
}

/// A successful upstream response; after retries it says how many attempts it took.
pub fn success(mut resp: Response<RespBody>, attempts: u32) -> Response<RespBody> {
    if attempts > 1 {
        resp.headers_mut()
            .insert(X_BULWARK_ATTEMPTS.clone(), attempts_value(attempts));
    }
    resp
}

/// [`local`], for a request that failed on the client's side (its body too large, too slow, or
/// malformed) after `attempts` attempts went upstream: they are counted in `x-bulwark-attempts`.
pub fn local_after(l: Local, attempts: u32) -> Response<RespBody> {
    let mut resp = local(l);
    if attempts > 0 {
        resp.headers_mut()
            .insert(X_BULWARK_ATTEMPTS.clone(), attempts_value(attempts));
    }
    resp
}

/// nginx's status for a request whose client went away before its answer.
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// A response the gateway gives on its own (routing, limits).
pub fn local(l: Local) -> Response<RespBody> {
    let (status, reason) = match l {
        Local::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
        Local::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
        Local::HeadersTooLarge => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
        ),
        Local::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
        Local::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
        Local::ClientClosed => (CLIENT_CLOSED, "client_closed"),
    };
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    h.insert(X_BULWARK_REASON.clone(), HeaderValue::from_static(reason));
    if l != Local::NoRoute {
        // The connection's state is unknown after a refused body or head.
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr<'a>(r: &'a Response<RespBody>, n: &str) -> Option<&'a str> {
        r.headers().get(n).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn each_failure_maps_to_status_reason_and_retry_after() {
        let cases = [
            (
                Failure::CircuitOpen {
                    retry_after: Duration::from_millis(2500),
                },
                503,
                "circuit_open",
                Some("3"),
            ),
            (
                Failure::NoHealthyEndpoint,
                503,
                "no_healthy_endpoint",
                Some("1"),
            ),
            (Failure::Timeout, 504, "timeout", None),
            (
                Failure::RateLimited {
                    retry_after: Duration::from_secs(7),
                },
                429,
                "rate_limited",
                Some("7"),
            ),
            (Failure::BulkheadFull, 503, "bulkhead_full", Some("1")),
            (Failure::BudgetExhausted, 503, "budget_exhausted", Some("1")),
            (Failure::UpstreamError, 502, "upstream_error", None),
        ];
        for (f, status, reason, retry_after) in cases {
            let r = failure(f, 2, None);
            assert_eq!(r.status().as_u16(), status, "{f:?}");
            assert_eq!(hdr(&r, "x-bulwark-reason"), Some(reason));
            assert_eq!(hdr(&r, "retry-after"), retry_after, "{f:?}");
            assert_eq!(hdr(&r, "x-bulwark-attempts"), Some("2"));
        }
    }

    #[test]
    fn fallback_replaces_failures() {
        let fb = FallbackResponse::new(&crate::config::Fallback {
            status: 200,
            body: "{\"cached\":true}".into(),
            content_type: Some("application/json".into()),
        });
        let r = failure(Failure::Timeout, 1, Some(&fb));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(hdr(&r, "x-bulwark-reason"), Some("fallback"));
        assert_eq!(hdr(&r, "content-type"), Some("application/json"));
        let passed = failed_upstream_response(
            Response::new(RespBody::empty()),
            3,
            Failure::UpstreamError,
            Some(&fb),
        );
        assert_eq!(hdr(&passed, "x-bulwark-reason"), Some("fallback"));
    }
}
