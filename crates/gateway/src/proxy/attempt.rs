//! The attempt loop: one request, its route's deadline, retries and failover chain.
//!
//! Order per request: deadline starts; for each upstream of the chain (primary, then failover), ask the
//! upstream's policies for admission, pick an endpoint (not one already tried when another is
//! available), send with the per-try timeout; classify; retry with backoff while attempts, budget and
//! deadline allow; then move on to the next upstream when this one was unavailable or exhausted.
//! Every policy decision is a call on [`crate::policy`] types, so the library's policies plug in there.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::Limited;
use tokio::time::Instant;

use super::body::{self, Buffered, Lease, ReqBody, RespBody};
use super::headers::{self, IDEMPOTENCY_KEY};
use super::respond::{self, Failure, Local};
use super::route::Route;
use super::Runtime;
use crate::policy::{self, Admission, Reject, RetryToken};
use crate::upstream::{retry_after, FailKind, Observed, Tried, Upstream};
use bulwark::Outcome;

/// The request body as the loop sees it: replayable (buffered) or streamed once.
enum BodySlot {
    Replay(Option<Bytes>),
    Once(Option<ReqBody>),
}

impl BodySlot {
    fn take(&mut self) -> Option<ReqBody> {
        match self {
            BodySlot::Replay(b) => Some(ReqBody::full(b.clone())),
            BodySlot::Once(b) => b.take(),
        }
    }
    fn replayable(&self) -> bool {
        matches!(self, BodySlot::Replay(_))
    }
}

/// What the last attempt left us with.
// `Last` lives on one request's stack and is moved a few times; boxing the response would add an
// allocation to every failed attempt for no benefit.
#[allow(clippy::large_enum_variant)]
enum Last {
    Response(Response<RespBody>),
    Failure(Failure),
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn reject_to_failure(r: Reject) -> Failure {
    match r {
        Reject::CircuitOpen { retry_after } => Failure::CircuitOpen { retry_after },
        Reject::RateLimited { retry_after } => Failure::RateLimited { retry_after },
        Reject::BulkheadFull => Failure::BulkheadFull,
        Reject::Deadline => Failure::Timeout,
    }
}

fn content_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Builds the request for one attempt to `up`'s endpoint `ei`. With `reuse` false this is the only
/// attempt that can be sent, so the headers are moved rather than copied.
fn build_request(
    parts: &mut Parts,
    reuse: bool,
    body: ReqBody,
    up: &Upstream,
    ei: usize,
) -> Request<ReqBody> {
    let ep = &up.endpoints[ei];
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    let pq = parts.uri.path_and_query().cloned();
    *req.uri_mut() = if up.http2 {
        let scheme = if ep.pool.is_tls() { "https" } else { "http" };
        let mut b = Uri::builder()
            .scheme(scheme)
            .authority(ep.authority.clone());
        if let Some(pq) = pq {
            b = b.path_and_query(pq);
        }
        b.build().unwrap_or_default()
    } else if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        parts.uri.clone()
    } else {
        pq.map(Uri::from).unwrap_or_else(|| Uri::from_static("/"))
    };
    *req.version_mut() = if up.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    // `Host` goes into the kept headers before the copy (each attempt overwrites it), so the copy is
    // made at its final size and never grows.
    parts
        .headers
        .insert(http::header::HOST, ep.host_header.clone());
    *req.headers_mut() = if reuse {
        parts.headers.clone()
    } else {
        std::mem::take(&mut parts.headers)
    };
    if parts.version == Version::HTTP_2 && !up.http2 {
        // `te: trailers`, kept for an HTTP/2 upstream (see `headers::keep_te_trailers`), is
        // hop-by-hop to an HTTP/1.1 one.
        req.headers_mut().remove(http::header::TE);
    }
    if up.http2 && req.headers().contains_key(http::header::UPGRADE) {
        // A WebSocket upgrade is tunnelled over HTTP/1.1 only: to an HTTP/2 upstream it goes as
        // a plain request (connection-specific headers are not allowed there).
        req.headers_mut().remove(http::header::UPGRADE);
        req.headers_mut().remove(http::header::CONNECTION);
    }
    if let Some(extra) = &up.request_headers {
        // On this attempt's copy: the kept head stays as the client sent it, so an upstream's
        // headers (its credentials) never reach another upstream of a failover chain.
        extra.apply(req.headers_mut());
    }
    req
}

/// The request one attempt sends.
// Lives on one request's stack for one attempt; boxing the owned request would allocate per attempt.
#[allow(clippy::large_enum_variant)]
enum Outgoing<'a> {
    /// A request of its own (HTTP/2 upstreams, streamed bodies, hedges).
    Owned(Request<ReqBody>),
    /// An HTTP/1 request with a whole body, encoded straight from the kept head (with the
    /// endpoint's `Host` already set in it): no copy of the headers per attempt.
    Head {
        parts: &'a Parts,
        body: Option<Bytes>,
    },
}

/// The request for endpoint `ei` of `up`: the kept head itself when the upstream speaks HTTP/1,
/// the body is whole and the upstream changes no headers, else a built request (see
/// [`build_request`]).
fn outgoing<'a>(
    parts: &'a mut Parts,
    reuse: bool,
    body: ReqBody,
    up: &Upstream,
    ei: usize,
) -> Outgoing<'a> {
    match body {
        ReqBody::Full { data, .. } if !up.http2 && up.request_headers.is_none() => {
            parts
                .headers
                .insert(http::header::HOST, up.endpoints[ei].host_header.clone());
            if parts.version == Version::HTTP_2 {
                // As in `build_request`. Taken out of the kept head: a later attempt on an HTTP/2
                // upstream (a failover chain mixing both, which gRPC cannot use anyway) goes
                // without it.
                parts.headers.remove(http::header::TE);
            }
            Outgoing::Head { parts, body: data }
        }
        body => Outgoing::Owned(build_request(parts, reuse, body, up, ei)),
    }
}

/// How one attempt ended, when it was not a success.
// Like `Last`: lives on one request's stack; boxing the response would cost every failed attempt.
#[allow(clippy::large_enum_variant)]
enum Miss {
    /// The upstream's policies refused it; nothing was sent.
    Rejected(Reject),
    /// No endpoint could take it; nothing was sent.
    NoEndpoint,
    /// A failed response (5xx, 429, a configured status), kept to be passed through.
    Response {
        resp: Response<RespBody>,
        retryable: bool,
        retry_after: Option<Duration>,
    },
    /// No response: connect failure, reset or timeout. `unsent`: nothing reached the upstream (a
    /// connect failure), so the next upstream can take the request even when it may not be retried.
    Failed {
        failure: Failure,
        retryable: bool,
        unsent: bool,
    },
    /// The client's request body failed: final, and not the upstream's fault.
    Client(Local),
    /// Inside a hedge race: a failed response, set aside (see `forward`) until the race ends.
    Kept { retryable: bool },
}

type AttemptResult = Result<Response<RespBody>, Miss>;

/// A failed response an attempt of a hedge race got, set aside until the race ends.
struct Kept {
    resp: Response<RespBody>,
    retryable: bool,
    retry_after: Option<Duration>,
    /// When it came: a failure of an attempt started before then was not sent after it.
    at: Instant,
}

/// How the hedge race sees an attempt. A response that is not a failure wins, and so does
/// anything final: a failed response the route does not retry (passed through as Envoy passes a
/// non-retriable response), a client body error. Any other failure (a retryable response, a reset
/// or timeout whether retried or not, a connect failure) starts no hedge and stops hedging for the
/// request: a failure is the retry loop's to answer, with its backoff, `Retry-After` and
/// `attempts` (gRPC's rule of hedging at once on a failure made `attempts: 1` a retry, and spent
/// hedges without backoff); the attempts still running go on, and one of them may yet succeed (as
/// Envoy waits for its other requests in flight after a reset); when none is left, the last
/// failure decides what comes next. A hedge the upstream refused (or found no endpoint for) sent
/// nothing, and stops hedging the same way.
fn hedge_outcome(r: &AttemptResult) -> Outcome {
    match r {
        Ok(_) => Outcome::Success,
        // Final: ends the race as a success does (a hedge's `Ignore` would not, while another
        // attempt runs: the library takes it for a local refusal).
        Err(Miss::Client(_))
        | Err(Miss::Response {
            retryable: false, ..
        })
        | Err(Miss::Kept {
            retryable: false, ..
        }) => Outcome::Success,
        Err(_) => {
            policy::stop_hedging();
            Outcome::Failure
        }
    }
}

/// What the attempts of one step of the loop (one attempt, or a hedge race with its losers) did,
/// counted where it happens.
pub(crate) struct Tally {
    /// Requests sent (a request the deadline stopped before it was sent is not one) since the
    /// attempt loop last took them.
    sent: AtomicU32,
    /// Requests sent in all, for a request dropped before its answer (its access-log line).
    pub(crate) total: AtomicU32,
    /// Whether a request sent may have reached the upstream (it was not a connect failure).
    reached: AtomicBool,
    /// The upstream (index in the runtime) of the request's latest attempt, for its access-log
    /// line; [`NO_UPSTREAM`] before one.
    upstream: std::sync::atomic::AtomicUsize,
    /// Whether the route's deadline was counted (`bulwark_timeouts_total{kind="total"}`): once per
    /// request, however many attempts of a hedge race it stopped.
    deadline_counted: AtomicBool,
}

/// [`Tally::upstream`] before any attempt.
const NO_UPSTREAM: usize = usize::MAX;

impl Default for Tally {
    fn default() -> Self {
        Tally {
            sent: AtomicU32::new(0),
            total: AtomicU32::new(0),
            reached: AtomicBool::new(false),
            upstream: std::sync::atomic::AtomicUsize::new(NO_UPSTREAM),
            deadline_counted: AtomicBool::new(false),
        }
    }
}

impl Tally {
    /// The upstream of the request's latest attempt (a failover's, when it failed over).
    pub(crate) fn upstream(&self) -> Option<usize> {
        Some(self.upstream.load(Ordering::Relaxed)).filter(|&u| u != NO_UPSTREAM)
    }
}

/// Counts the route's deadline as a timeout of the request, once.
fn count_deadline(route: &Route, tally: &Tally) {
    if !tally.deadline_counted.swap(true, Ordering::Relaxed) {
        route.policies.on_timeout("total");
    }
}

/// The route's deadline passed before a request could be sent: a total timeout, and final.
fn deadline_passed(route: &Route, tally: &Tally) -> Miss {
    count_deadline(route, tally);
    Miss::Failed {
        failure: Failure::Timeout,
        retryable: false,
        unsent: true,
    }
}

/// One attempt on `up`'s endpoint `ei` (`None`: no endpoint was available): admission, send within
/// the per-try timeout and the route deadline, classification, and the reports to the breaker,
/// outlier detection, cooldown and (when `alone`, not one of a hedge race) the route's latency
/// window. A request sent is counted in `tally`, and sets `went` if given. A failed response keeps
/// its bulkhead slot when `alone` (the loop gives it back before anything else is tried, so a
/// response passed through to the client holds it to its end, as a success does); in a race it
/// gives it back at once (another attempt of the race may be waiting for it).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    up: &Upstream,
    route: &Route,
    target: Option<(usize, Outgoing<'_>)>,
    deadline: Instant,
    alone: bool,
    admitted: Option<Admission>,
    tally: &Tally,
    went: Option<&AtomicBool>,
) -> AttemptResult {
    let Some((ei, req)) = target else {
        return Err(Miss::NoEndpoint);
    };
    let mut admission = match admitted {
        Some(a) => a,
        None => match up.policies.admit_by(Some(deadline)).await {
            Ok(a) => a,
            Err(Reject::Deadline) => return Err(deadline_passed(route, tally)),
            Err(r) => return Err(Miss::Rejected(r)),
        },
    };
    let ep = &up.endpoints[ei];
    let now = Instant::now();
    if now >= deadline {
        return Err(deadline_passed(route, tally));
    }
    let try_deadline = route
        .per_try_timeout
        .map_or(deadline, |t| (now + t).min(deadline));
    let mut lease = Lease::new(ep.clone());
    tally.sent.fetch_add(1, Ordering::Relaxed);
    tally.total.fetch_add(1, Ordering::Relaxed);
    if let Some(w) = went {
        w.store(true, Ordering::Relaxed);
    }
    // A body streamed from the client: whether the client has sent all of it.
    let client_body = match &req {
        Outgoing::Owned(r) => r.body().stream_state(),
        Outgoing::Head { .. } => None,
    };
    let mut unanswered = Unanswered {
        up,
        ei,
        since: Some(now),
        client_body: client_body.clone(),
    };
    // The attempt's own timer, when it comes before the route's deadline: a connection still being
    // opened then is a timeout of a request never sent (retried under `timeout` or
    // `connect_failure`, failed over at no cost, whatever the method), not of one the upstream may
    // have processed. (For a body streamed from the client, the timer starts once the client has
    // sent it all.)
    let by = (route.per_try_timeout.is_some() && try_deadline < deadline && client_body.is_none())
        .then_some(try_deadline);
    let send = async {
        match req {
            Outgoing::Owned(req) => ep.pool.send(req, by).await,
            Outgoing::Head { parts, body } => ep.pool.send_head(parts, body.as_ref(), by).await,
        }
    };
    let result = match (&client_body, route.per_try_timeout) {
        (Some(body), Some(per_try)) if try_deadline < deadline => {
            per_try_after_upload(send, body, now, per_try, deadline).await
        }
        _ => tokio::time::timeout_at(try_deadline, send).await,
    };
    unanswered.since = None;
    // Neither a connect failure nor a refused stream reached anything that processed it.
    if !matches!(&result, Ok(Err(e)) if e.kind.unsent()) {
        tally.reached.store(true, Ordering::Relaxed);
    }
    match result {
        Ok(Ok(resp)) => {
            let end = Instant::now();
            // A body streamed from the client: the upstream's time runs from the upload's end when
            // it ended before the answer (a slow client is not a slow upstream), for the breaker's
            // slow calls, the endpoint's latency and the route's latency record alike.
            let uploaded = client_body.as_ref().and_then(|b| b.ended_at());
            let from = uploaded.map_or(now, |t| t.max(now));
            if uploaded.is_some() {
                admission.measure_from(from);
            }
            let latency = end.saturating_duration_since(from);
            let status = resp.status().as_u16();
            let retryable = route.retry_on.status(status);
            // 5xx and 429 are failures (passed through with x-bulwark-*, replaced by a fallback) even
            // when the route does not retry them.
            let failed = retryable || crate::upstream::server_error(status) || status == 429;
            let (parts_r, inner) = resp.into_parts();
            let mut resp = Response::from_parts(parts_r, ());
            headers::strip_hop_by_hop(resp.headers_mut());
            let ra = if failed || up.cools_down_on(status) {
                retry_after::retry_after(resp.headers(), SystemTime::now())
            } else {
                None
            };
            // A failed answer is no sign of speed: peak-EWMA passes the endpoint over for a
            // while, or one answering instant 503s would draw every request (a quota answer
            // that starts a cooldown takes the endpoint out anyway).
            if failed && !up.starts_cooldown(status, ra) {
                ep.observe_failure(latency, end);
            } else {
                ep.observe_latency(latency, end);
            }
            up.observe(
                ei,
                Observed::Response {
                    status,
                    latency,
                    retry_after: ra,
                },
            );
            // A quota answer that starts a cooldown is the cooldown's business, not a sign of a
            // broken upstream: it does not count towards opening the breaker.
            let quota = up.starts_cooldown(status, ra);
            admission.record(match (failed, ra) {
                _ if quota => Outcome::Ignore,
                (false, _) => Outcome::Success,
                (true, Some(d)) => Outcome::FailureRetryAfter(d),
                (true, None) => Outcome::Failure,
            });
            if failed && !alone {
                admission.release_slot();
            }
            lease.hold(admission);
            let resp = resp.map(|()| RespBody::upstream(inner, lease));
            if !failed {
                if alone {
                    route.policies.latency().record(latency);
                }
                return Ok(resp);
            }
            Err(Miss::Response {
                resp,
                retryable,
                retry_after: ra,
            })
        }
        Ok(Err(e)) => {
            // The client's body failed (too large, stalled, broken): its fault, whatever the
            // upstream connection made of it (hyper's HTTP/2 client reports it only as a stream
            // it reset itself).
            let client_failed = client_body.as_ref().and_then(|b| b.client_error());
            if e.kind == FailKind::ClientBody || client_failed.is_some() {
                admission.record(Outcome::Ignore);
                return Err(Miss::Client(client_failed.unwrap_or_else(|| {
                    e.source
                        .as_deref()
                        .map_or(Local::BadRequest, |e| body::refusal(e))
                })));
            }
            admission.record(Outcome::Failure);
            up.observe(ei, Observed::Failed);
            tracing::debug!(endpoint = %ep.url, kind = ?e.kind, error = ?e.source, "attempt failed");
            // Peak-EWMA learns the failure (passed over for a while, and the time it took): an
            // endpoint that refuses connections would otherwise keep the cost of one never
            // measured, the lowest, and draw every request.
            let end = Instant::now();
            ep.observe_failure(end.saturating_duration_since(now), end);
            let failure = match e.kind {
                FailKind::Timeout => Failure::Timeout,
                FailKind::ConnectCut => {
                    route.policies.on_timeout("attempt");
                    Failure::Timeout
                }
                _ => Failure::UpstreamError,
            };
            Err(Miss::Failed {
                failure,
                retryable: route.retry_on.fail(e.kind),
                unsent: e.kind.unsent(),
            })
        }
        Err(_elapsed) => {
            // Which timer fired: the route's deadline, or the attempt's own (which a streamed
            // upload may have pushed on to the deadline, see `per_try_after_upload`).
            if Instant::now() < deadline {
                route.policies.on_timeout("attempt");
            } else {
                count_deadline(route, tally);
            }
            // A client that had not sent all of its body stalled the exchange, not the upstream
            // (which may well have been waiting for it): as for Envoy, whose route timeout starts
            // once the request is complete, it is not the upstream's failure (for its breaker or
            // outlier detection), or any client could eject endpoints by stalling uploads.
            if client_body.as_ref().is_some_and(|b| !b.ended()) {
                admission.record(Outcome::Ignore);
            } else {
                admission.record(Outcome::Failure);
                up.observe(ei, Observed::Failed);
                // The endpoint took at least this long: peak-EWMA learns it (as tower's records
                // the time of a cancelled call), or an endpoint that never answers would keep the
                // cost of one never measured and win every comparison.
                let end = Instant::now();
                ep.observe_failure(end.saturating_duration_since(now), end);
            }
            Err(Miss::Failed {
                failure: Failure::Timeout,
                retryable: Instant::now() < deadline && route.retry_on.fail(FailKind::Timeout),
                unsent: false,
            })
        }
    }
}

/// Runs `send` (an attempt whose body streams from the client) under `per_try`, counted from when
/// the client had sent all of its body, as Envoy's per-try timeout starts once the downstream
/// request is complete: a slow upload is the client's time, not the upstream's (the route's
/// `deadline` still bounds it all). While the body is still coming, the timer is pushed on by
/// `per_try` at each expiry; once it has ended, the last expiry is its end plus `per_try`.
async fn per_try_after_upload<F: std::future::Future>(
    send: F,
    body: &body::StreamState,
    start: Instant,
    per_try: Duration,
    deadline: Instant,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut send = std::pin::pin!(send);
    let mut at = (start + per_try).min(deadline);
    loop {
        match tokio::time::timeout_at(at, send.as_mut()).await {
            Ok(out) => return Ok(out),
            Err(elapsed) => {
                // Still coming, or ended a moment ago (its time not yet stamped): from now.
                let now = Instant::now();
                let next = (body.ended_at().unwrap_or(now) + per_try).min(deadline);
                if next <= now {
                    return Err(elapsed);
                }
                at = next;
            }
        }
    }
}

/// An attempt on its way: when its future is dropped before an answer or a timeout (a hedge that
/// lost the race, a client gone), the time it ran is a lower bound of the endpoint's latency, for
/// peak-EWMA and latency outlier detection; it is neither a success nor a failure. Without it, an
/// endpoint whose every attempt a hedge beats would look like one never measured (the cheapest).
struct Unanswered<'a> {
    up: &'a Upstream,
    ei: usize,
    /// When the attempt started; `None` once it ended.
    since: Option<Instant>,
    /// A body streamed from the client: while the client had not sent all of it, the time is
    /// the client's as much as the endpoint's (an upload abandoned half-way says nothing of the
    /// endpoint, as for a timeout).
    client_body: Option<Arc<body::StreamState>>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.client_body.as_ref().is_some_and(|b| !b.ended()) {
            return;
        }
        if let Some(since) = self.since {
            let end = Instant::now();
            let latency = end.saturating_duration_since(since);
            self.up.endpoints[self.ei].observe_latency_floor(latency, end);
            self.up.observe(self.ei, Observed::Cancelled { latency });
        }
    }
}

/// What a client is told when `up` had no endpoint: when every usable endpoint is in a quota
/// cooldown, a rate limit with the time until the first one ends; otherwise no healthy endpoint.
fn no_endpoint(up: &Upstream) -> Failure {
    match up.cooldown_wait() {
        Some(retry_after) => Failure::RateLimited { retry_after },
        None => Failure::NoHealthyEndpoint,
    }
}

/// The response to a request that ended with `failure` before any attempt (refused by the operating
/// mode, or a delay that reached the deadline): the failure's, or the route's fallback.
pub(crate) fn answer_unsent(route: &Route, failure: Failure) -> Response<RespBody> {
    finish(Last::Failure(failure), 0, None, route)
}

/// Forwards one routed request received at `start` (the route's deadline counts from there); always
/// returns a response (errors are mapped by [`respond`]). With `no_retries` (`degraded` mode) the
/// request gets one attempt per upstream: it is neither retried nor hedged, and fails over only from
/// an upstream it was not sent to.
pub(crate) async fn forward(
    rt: &Runtime,
    route: &Route,
    mut parts: Parts,
    (body, link): (Limited<body::ClientBody>, Option<body::BodyLink>),
    start: Instant,
    no_retries: bool,
    tally: &Tally,
) -> Response<RespBody> {
    let deadline = start + route.timeout;
    // A body that streams upstream: its client connection tells the upstream side if it gives
    // the body up (see `StreamState::abandon`).
    let streamed = |b: ReqBody| {
        if let (Some(l), Some(s)) = (&link, b.stream_state()) {
            l.streamed_as(Arc::downgrade(&s));
        }
        b
    };
    let retry_allowed = !no_retries
        && (is_idempotent(&parts.method)
            || route.retry_non_idempotent
            || parts.headers.contains_key(&IDEMPOTENCY_KEY));
    // Only for idempotent methods: a hedge is a second copy sent while the first is in flight
    // (`retry_non_idempotent` and `Idempotency-Key` allow retries, one after another, not that).
    // Not for an upgrade: each hedge would open a tunnel of its own.
    let hedge = route.policies.hedge().filter(|_| {
        !no_retries
            && is_idempotent(&parts.method)
            && !parts.headers.contains_key(http::header::UPGRADE)
    });
    // A connect failure sent nothing, so whatever the method the request may go to another
    // endpoint (as nginx's `proxy_next_upstream error` and HAProxy's `retry-on conn-failure`
    // resend it): a retry like any other (attempts, budget, backoff), only not a replay.
    // So did an attempt whose own timeout cut its connect short (retried under `timeout` too).
    let cut = route.per_try_timeout.is_some() && route.retry_on.fail(FailKind::ConnectCut);
    let resend_unsent =
        !no_retries && route.attempts > 1 && (route.retry_on.fail(FailKind::ConnectFailure) || cut);
    // With a failover chain the body is kept even when the request may not be retried: after a
    // connect failure (nothing sent) the next upstream takes it.
    let may_replay =
        (retry_allowed && (route.attempts > 1 || hedge.is_some())) || route.chain.len() > 1;
    // Whether the kept head must outlive the first attempt. (A chunked body is buffered only for
    // `may_replay`: one that may not be replayed after a response streams at once, and a connect
    // failure then has nothing to resend it from.)
    let keep_head = may_replay || resend_unsent;

    let mut slot = if body.is_end_stream() {
        BodySlot::Replay(None)
    } else if match content_length(&parts) {
        Some(n) => n > route.retry_buffer as u64,
        None => !may_replay,
    } {
        // A body declared no larger than the retry buffer is read before the request goes out even
        // when it will not be replayed (it is bounded and already on its way): it is then written
        // together with the head and its connection goes back to the pool, while a streamed body
        // needs a full-duplex exchange of its own (see `upstream::pool`). A chunked body that may
        // not be replayed streams at once: the client may be waiting for an early response.
        BodySlot::Once(Some(streamed(ReqBody::stream(None, body))))
    } else {
        match tokio::time::timeout_at(deadline, body::buffer(body, route.retry_buffer)).await {
            Err(_) => {
                route.policies.on_timeout("total");
                return finish(Last::Failure(Failure::Timeout), 0, None, route);
            }
            Ok(Err(e)) => return respond::local(body::refusal(&*e)),
            Ok(Ok(Buffered::Full(b))) => BodySlot::Replay((!b.is_empty()).then_some(b)),
            Ok(Ok(Buffered::Partial(prefix, rest))) => {
                let prefix = (!prefix.is_empty()).then_some(prefix);
                BodySlot::Once(Some(streamed(ReqBody::stream(prefix, rest))))
            }
        }
    };
    // Hedging needs a body it can send twice.
    let hedge = hedge.filter(|_| slot.replayable());

    route.policies.deposit_at(start);
    let mut sent: u32 = 0;
    // Whether a request may have reached an upstream: from then on, failing over is a retry.
    let mut delivered = false;
    let mut last = Last::Failure(Failure::NoHealthyEndpoint);
    // A retry's budget token taken but not yet spent on a request sent: given back if the retry
    // sends nothing (refused, no endpoint, deadline, or the client gone during its backoff), so the
    // budget counts only retries that went out or are waiting in backoff.
    let mut withdrawn = Withdrawn {
        route,
        tally,
        token: None,
        retry: None,
    };

    for (chain_pos, &ui) in route.chain.iter().enumerate() {
        let up = &*rt.upstreams[ui];
        if chain_pos > 0 && delivered {
            // Failing over after a request reached an upstream is a retry: it needs a replayable
            // body, time for an attempt, and budget. (After refusals and connect failures only,
            // nothing was sent: no budget, whatever the method.)
            if !(retry_allowed && slot.replayable()) {
                break;
            }
            if !route.policies.retry_fits(Duration::ZERO, deadline) {
                return finish(last, sent, None, route);
            }
            let Some(token) = route.policies.withdraw() else {
                route.policies.on_budget_exhausted();
                return finish(last, sent, Some(Failure::BudgetExhausted), route);
            };
            withdrawn.take(token, ("failover", sent + 1, Duration::ZERO));
        }
        let mut tried = Tried::default();
        let mut on_this: u32 = 0;
        loop {
            on_this += 1;
            // Something else is tried now: a response kept in case nothing better comes must not
            // hold its upstream's bulkhead slot meanwhile (this attempt may need it). One passed
            // through to the client keeps it to its end.
            if let Last::Response(r) = &mut last {
                r.body_mut().release_upstream_slot();
            }
            // Admission first, hedged or not: a request the upstream's policies refuse was not
            // sent (no budget is spent failing over from it, and no hedge races it) and keeps its
            // body for the next upstream. Waiting in the bulkhead's queue ends with the deadline.
            // The rate limit's token is taken once an endpoint is picked (one that finds none
            // sends nothing).
            let admission = match up.policies.reserve_by(Some(deadline)).await {
                Ok(a) => a,
                Err(Reject::Deadline) => {
                    withdrawn.refund();
                    count_deadline(route, tally);
                    refused(&mut last, Failure::Timeout, delivered);
                    return finish(last, sent, None, route);
                }
                Err(r) => {
                    withdrawn.refund();
                    refused(&mut last, reject_to_failure(r), delivered);
                    break;
                }
            };
            let Some(ei) = up.pick(tried) else {
                withdrawn.refund();
                refused(&mut last, no_endpoint(up), delivered);
                break;
            };
            if let Err(r) = up.policies.take_rate_token() {
                withdrawn.refund();
                refused(&mut last, reject_to_failure(r), delivered);
                break;
            }
            let Some(req_body) = slot.take() else {
                withdrawn.refund();
                return finish(last, sent, None, route);
            };
            tried.insert(ei);
            tally.upstream.store(ui, Ordering::Relaxed);
            let result = match hedge {
                None => {
                    let req = outgoing(&mut parts, keep_head, req_body, up, ei);
                    let target = Some((ei, req));
                    let admitted = Some(admission);
                    attempt(up, route, target, deadline, true, admitted, tally, None).await
                }
                Some(h) => {
                    let req = Outgoing::Owned(build_request(&mut parts, true, req_body, up, ei));
                    // The library's hedge races the attempts: the original (admitted above), then
                    // each call of this factory picks an endpoint this request has not tried when
                    // one is available, and the hedge asks the route's budget before each extra
                    // attempt (the hedge's own admission is in `attempt`).
                    let mut original = Some((ei, req, admission));
                    // The race reports only its last failure: a response an attempt got is kept
                    // here (the race sees `Miss::Kept`) so that a later refused hedge cannot
                    // hide it from the client.
                    let kept: std::sync::Mutex<Option<Kept>> = std::sync::Mutex::new(None);
                    // And the last attempt that failed without a response (a reset, a timeout):
                    // a hedge started at once after it that then sent nothing (no endpoint left
                    // untried, refused) must not end the request as if nothing had been tried.
                    // With when that attempt started.
                    let failed: std::sync::Mutex<Option<(Failure, bool, bool, Instant)>> =
                        std::sync::Mutex::new(None);
                    let mut hedges = 0;
                    let make = || {
                        let (target, admission, hedge) = match original.take() {
                            Some((ei, req, admission)) => (Some((ei, req)), Some(admission), None),
                            None => {
                                let token = policy::take_hedge_token();
                                // Never to an endpoint this request already tried (one endpoint
                                // left: its Retry-After and the backoff are the retry's to wait),
                                // nor to a lower-priority tier. As for a retry, no hedge starts
                                // that the deadline cannot finish (a typical attempt's time left).
                                let fits = route.policies.retry_fits(Duration::ZERO, deadline);
                                let target = fits.then(|| up.pick_hedge(tried)).flatten();
                                if target.is_none() {
                                    // None now, none for the hedges after it either.
                                    policy::stop_hedging();
                                }
                                let target = target.map(|ei| {
                                    tried.insert(ei);
                                    hedges += 1;
                                    // Hedging is only on with a replayable body, which `take`
                                    // always yields.
                                    let body = slot.take().unwrap_or_else(ReqBody::empty);
                                    let req = build_request(&mut parts, true, body, up, ei);
                                    (ei, Outgoing::Owned(req))
                                });
                                let hedge = HedgeGuard {
                                    route,
                                    token,
                                    went: AtomicBool::new(false),
                                    number: hedges,
                                };
                                (target, None, Some(hedge))
                            }
                        };
                        let kept = &kept;
                        let failed = &failed;
                        async move {
                            let went = hedge.as_ref().map(|h| &h.went);
                            let started = Instant::now();
                            let r =
                                attempt(up, route, target, deadline, false, admission, tally, went)
                                    .await;
                            drop(hedge);
                            match r {
                                Err(Miss::Response {
                                    resp,
                                    retryable,
                                    retry_after,
                                }) => {
                                    if let Ok(mut k) = kept.lock() {
                                        *k = Some(Kept {
                                            resp,
                                            retryable,
                                            retry_after,
                                            at: Instant::now(),
                                        });
                                    }
                                    Err(Miss::Kept { retryable })
                                }
                                other => {
                                    if let Err(Miss::Failed {
                                        failure,
                                        retryable,
                                        unsent,
                                    }) = &other
                                    {
                                        if let Ok(mut f) = failed.lock() {
                                            *f = Some((*failure, *retryable, *unsent, started));
                                        }
                                    }
                                    other
                                }
                            }
                        }
                    };
                    // Boxed: the race holds several attempt futures; inline, it would make every
                    // request's future that much larger, hedged or not. One allocation per hedged
                    // request, next to the extra upstream requests hedging sends anyway.
                    let raced =
                        match Box::pin(policy::hedged(h.call_with(&hedge_outcome, make))).await {
                            Ok(resp) => Ok(resp),
                            Err(bulwark::Error::Inner(miss)) => Err(miss),
                            // The hedge reports nothing of its own; this arm is never taken.
                            Err(_) => Err(Miss::NoEndpoint),
                        };
                    let kept = kept.into_inner().ok().flatten();
                    let failed = failed.into_inner().ok().flatten();
                    match (raced, kept, failed) {
                        // A hedge that sent nothing ended the race after an attempt failed
                        // without a response: that failure decides what comes next.
                        (
                            Err(Miss::Rejected(_) | Miss::NoEndpoint),
                            None,
                            Some((failure, retryable, unsent, _)),
                        ) => Err(Miss::Failed {
                            failure,
                            retryable,
                            unsent,
                        }),
                        (Err(Miss::Kept { .. }), None, _) => Err(Miss::NoEndpoint),
                        // A hedge that sent nothing (refused, no endpoint) ended the race after
                        // an attempt got a failed response: that response decides what comes
                        // next (a retry after its Retry-After and the backoff, or the client).
                        (
                            Err(Miss::Kept { .. } | Miss::Rejected(_) | Miss::NoEndpoint),
                            Some(k),
                            _,
                        ) => Err(Miss::Response {
                            resp: k.resp,
                            retryable: k.retryable,
                            retry_after: k.retry_after,
                        }),
                        // The race's last failure came from an attempt started before that
                        // response came (a hedge out while the original got its 503): it was not
                        // sent after the response, which stands, as without hedging.
                        (Err(Miss::Failed { .. }), Some(k), Some((.., started)))
                            if started < k.at =>
                        {
                            Err(Miss::Response {
                                resp: k.resp,
                                retryable: k.retryable,
                                retry_after: k.retry_after,
                            })
                        }
                        (other, kept, _) => {
                            if let (Err(_), Some(k)) = (&other, kept) {
                                last = Last::Response(k.resp);
                            }
                            other
                        }
                    }
                }
            };
            let went_out = tally.sent.swap(0, Ordering::Relaxed);
            sent += went_out;
            if went_out > 0 {
                withdrawn.spent();
            } else {
                withdrawn.refund();
            }
            delivered |= tally.reached.swap(false, Ordering::Relaxed);

            // What failed, for the retry's `reason` label; whether this failure may be retried;
            // and whether it sent nothing (a connect failure): when such a retry is refused
            // (budget, time), the next upstream of the chain still takes the request for free,
            // as it would have without the retry.
            let mut sent_nothing = false;
            let (retryable, retry_after, reason, allowed) = match result {
                Ok(resp) => return respond::success(resp, sent),
                Err(Miss::Client(local)) => return respond::local_after(local, sent),
                Err(Miss::Rejected(r)) => {
                    // Only a hedge gets here (the original was admitted above); nothing was sent.
                    refused(&mut last, reject_to_failure(r), delivered);
                    break;
                }
                // (`Kept` never leaves the hedge branch above.)
                Err(Miss::NoEndpoint) | Err(Miss::Kept { .. }) => {
                    refused(&mut last, no_endpoint(up), delivered);
                    break;
                }
                Err(Miss::Response {
                    resp,
                    retryable,
                    retry_after,
                }) => {
                    last = Last::Response(resp);
                    if !retryable {
                        return finish(last, sent, None, route);
                    }
                    (true, retry_after, retry_reason(&last), retry_allowed)
                }
                Err(Miss::Failed {
                    failure,
                    retryable,
                    unsent,
                }) => {
                    if unsent {
                        // Nothing was sent (a connect failure, the deadline): it does not replace
                        // a response an earlier attempt got.
                        refused(&mut last, failure, delivered);
                    } else {
                        last = Last::Failure(failure);
                    }
                    if failure == Failure::Timeout && Instant::now() >= deadline {
                        return finish(last, sent, None, route);
                    }
                    let allowed = retry_allowed || (unsent && resend_unsent);
                    sent_nothing = unsent;
                    if unsent && !(retryable && allowed) && slot.replayable() {
                        break; // a connect failure sent nothing: the next upstream takes it
                    }
                    (retryable, None, failure_reason(failure), allowed)
                }
            };
            if !retryable || !allowed || !slot.replayable() {
                return finish(last, sent, None, route);
            }
            if on_this >= route.attempts {
                break; // exhausted: fail over
            }
            // A Retry-After is a wait before asking again: the retry waits it out unless it can go
            // to an endpoint this request has not tried (with a quota cooldown, the one that asked
            // is out of rotation meanwhile). Back to a tried endpoint (a single one, or its peers
            // down), it waits, as Envoy's `rate_limited_retry_back_off` does.
            let mut delay = route.policies.backoff(on_this);
            if let Some(ra) = retry_after {
                if !up.has_untried(tried) {
                    delay = delay.max(ra);
                }
            }
            let next_upstream = chain_pos + 1 < route.chain.len();
            let fails_over_free = sent_nothing && next_upstream;
            // No retry starts that the deadline cannot finish (backoff plus a typical attempt).
            // This upstream is then done with for this request, and the next one of the chain
            // takes it when time is left for an attempt (as a failover, with its own checks).
            if !route.policies.retry_fits(delay, deadline) {
                if next_upstream {
                    break;
                }
                return finish(last, sent, None, route);
            }
            let Some(token) = route.policies.withdraw() else {
                if fails_over_free {
                    break;
                }
                route.policies.on_budget_exhausted();
                return finish(last, sent, Some(Failure::BudgetExhausted), route);
            };
            withdrawn.take(token, (reason, sent + 1, delay));
            // The retry is on: the kept response gives its bulkhead slot back now, not after the
            // backoff (its body may take the whole backoff to read).
            if let Last::Response(r) = &mut last {
                r.body_mut().release_upstream_slot();
            }
            if !delay.is_zero() {
                let retry_at = Instant::now() + delay;
                // Read the failed response's body (it is usually a short error) so that its
                // connection goes back to the pool while the retry waits, and the response can
                // still be passed through if the retry gets none. One too large or too slow to
                // read in the backoff is dropped (the request then ends as if it had got none).
                if let Last::Response(resp) = last {
                    // At least a short while, so that a backoff of a few milliseconds (full
                    // jitter) does not decide whether the client can get the provider's answer;
                    // never past the route's deadline.
                    let by = retry_at.max(Instant::now() + MIN_BODY_READ).min(deadline);
                    last = match body::read_small(resp, route.retry_buffer, by).await {
                        Some(resp) => Last::Response(resp),
                        None => Last::Failure(Failure::UpstreamError),
                    };
                    // The read may have taken longer than the backoff: the retry must still fit.
                    let wait = retry_at.saturating_duration_since(Instant::now());
                    if !route.policies.retry_fits(wait, deadline) {
                        withdrawn.refund();
                        return finish(last, sent, None, route);
                    }
                }
                tokio::time::sleep_until(retry_at).await;
            }
        }
    }
    finish(last, sent, None, route)
}

/// A hedge, until its attempt ends (or is cancelled because another attempt won): one that sent
/// its request (`went`) is counted (`bulwark_hedges_total`); one that sent nothing (refused, no
/// endpoint, the deadline, or cancelled while it waited) gives its budget token back.
struct HedgeGuard<'a> {
    route: &'a Route,
    token: Option<RetryToken>,
    went: AtomicBool,
    number: u32,
}

impl Drop for HedgeGuard<'_> {
    fn drop(&mut self) {
        if self.went.load(Ordering::Relaxed) {
            self.route.policies.on_hedge(self.number);
        } else if let Some(t) = self.token.take() {
            self.route.policies.refund(t);
        }
    }
}

/// The least time a failed response's body may take to be read during a backoff (see `forward`).
const MIN_BODY_READ: Duration = Duration::from_millis(100);

/// A step that sent nothing (refused by the upstream's policies, or no endpoint) replaces the
/// outcome of an earlier attempt only when that attempt got no response: a response an upstream
/// gave is what the client sees, as the last answer any attempt got. Nor does it replace the
/// failure of a request that reached an upstream (`delivered`: it timed out, or was reset), unless
/// the route's deadline ran out (`why` is a timeout): a 503 `circuit_open` would tell the client
/// that its request went nowhere. When two upstreams of a chain refused alike (open breakers, rate
/// limits, or one of each), the client gets the refusal of the upstream that takes requests again
/// first, and its `Retry-After`: a rate-limited primary and a failover whose breaker is open give
/// the primary's 429, not a 503 `circuit_open` (not every breaker of the chain is open).
fn refused(last: &mut Last, why: Failure, delivered: bool) {
    use Failure::{CircuitOpen, RateLimited};
    let wait = |f: &Failure| match f {
        CircuitOpen { retry_after } | RateLimited { retry_after } => Some(*retry_after),
        _ => None,
    };
    let why = match (&*last, why) {
        (Last::Failure(earlier), why) => match (wait(earlier), wait(&why)) {
            (Some(a), Some(b)) if a <= b => *earlier,
            _ => why,
        },
        (_, why) => why,
    };
    let keep = match last {
        Last::Response(_) => true,
        Last::Failure(_) => delivered && why != Failure::Timeout,
    };
    if !keep {
        *last = Last::Failure(why);
    }
}

/// The budget token of a retry not yet sent, if one is held: given back by [`Withdrawn::refund`]
/// when the retry sends nothing, and when the request is dropped before the retry went out (the
/// client went away during the backoff).
struct Withdrawn<'a> {
    route: &'a Route,
    tally: &'a Tally,
    token: Option<RetryToken>,
    /// The retry's event (`reason`, attempt number, backoff), reported once its request went out
    /// (`bulwark_retry_attempts_total` counts retries sent, as `bulwark_hedges_total` hedges).
    retry: Option<(&'static str, u32, Duration)>,
}

impl Withdrawn<'_> {
    /// A retry (or failover) decided: `token` is its budget, `retry` its event.
    fn take(&mut self, token: RetryToken, retry: (&'static str, u32, Duration)) {
        self.token = Some(token);
        self.retry = Some(retry);
    }

    /// The retry's request went out: the token is spent and the retry counted.
    fn spent(&mut self) {
        self.token = None;
        if let Some((reason, attempt, delay)) = self.retry.take() {
            self.route.policies.on_retry(reason, attempt, delay);
        }
    }

    /// The retry sent nothing: the token goes back and the retry is not counted.
    fn refund(&mut self) {
        self.retry = None;
        if let Some(token) = self.token.take() {
            self.route.policies.refund(token);
        }
    }
}

impl Drop for Withdrawn<'_> {
    fn drop(&mut self) {
        // Dropped mid-attempt after the retry's request went out: spent.
        if self.tally.sent.load(Ordering::Relaxed) == 0 {
            self.refund();
        } else {
            self.spent();
        }
    }
}

/// What failed, for the `reason` label of a retry after a response.
fn retry_reason(last: &Last) -> &'static str {
    match last {
        Last::Response(r) => match r.status().as_u16() {
            429 => "429",
            s if crate::upstream::server_error(s) => "5xx",
            _ => "status",
        },
        Last::Failure(f) => failure_reason(*f),
    }
}

/// What failed, for the `reason` label of a retry after an attempt that got no response.
fn failure_reason(f: Failure) -> &'static str {
    match f {
        Failure::Timeout => "timeout",
        _ => "upstream_error",
    }
}

/// Maps the loop's end state to the client response. `because` overrides the reason (budget).
fn finish(last: Last, sent: u32, because: Option<Failure>, route: &Route) -> Response<RespBody> {
    let fb = route.fallback.as_ref();
    if fb.is_some() {
        let reason = match &last {
            Last::Response(_) => because.unwrap_or(Failure::UpstreamError).reason(),
            Last::Failure(f) => because.unwrap_or(*f).reason(),
        };
        route.policies.on_fallback(reason);
    }
    match last {
        Last::Response(resp) => respond::failed_upstream_response(
            resp,
            sent,
            because.unwrap_or(Failure::UpstreamError),
            fb,
        ),
        Last::Failure(f) => respond::failure(because.unwrap_or(f), sent, fb),
    }
}
