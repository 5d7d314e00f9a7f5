//! Body types on both sides of the proxy, as enums (no boxing per request).

use std::pin::Pin;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::upstream::{Endpoint, UpstreamBody};

/// Error type of request bodies: hyper's (client I/O) or the length limit.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A request body as the client sends it: read from our own HTTP/1.1 connection loop
    /// ([`super::h1`]) or from hyper's HTTP/2 server.
    #[derive(Debug)]
    #[project = ClientBodyProj]
    pub enum ClientBody {
        /// No body (no `Content-Length`, or zero, and not chunked).
        Empty,
        /// An HTTP/1.1 body, read from the connection as it is polled.
        H1 { inner: super::h1::RequestBody },
        /// An HTTP/2 stream's body.
        H2 {
            #[pin]
            inner: Incoming,
            stall: Stall,
            stream: Arc<super::h2::Progress>,
            conn: super::ConnActivity,
        },
    }
}

impl ClientBody {
    /// Where the body comes from (its HTTP/1.1 connection, its HTTP/2 stream): told later how the
    /// body streams upstream, so that it can tell the upstream side when it gives the body up
    /// ([`StreamState::abandon`]).
    pub(crate) fn link(&self) -> Option<BodyLink> {
        match self {
            ClientBody::H1 { inner } => Some(BodyLink::H1(inner.link())),
            ClientBody::H2 { stream, .. } => Some(BodyLink::H2(stream.clone())),
            ClientBody::Empty => None,
        }
    }

    /// An HTTP/2 stream's body, cut when it makes no progress for `idle` ([`Stall`]) until the
    /// response has started, or when its stream is cut (see [`super::h2`]).
    /// Each of its frames stamps the connection's activity (`conn`): an upload still moving after
    /// its response ended keeps the connection from being closed as idle.
    pub(crate) fn h2(
        inner: Incoming,
        idle: Duration,
        stream: Arc<super::h2::Progress>,
        conn: super::ConnActivity,
    ) -> Self {
        ClientBody::H2 {
            inner,
            stall: Stall::new(idle),
            stream,
            conn,
        }
    }
}

/// Where a request body comes from ([`ClientBody::link`]).
#[derive(Debug)]
pub(crate) enum BodyLink {
    H1(super::h1::Link),
    H2(Arc<super::h2::Progress>),
}

impl BodyLink {
    /// The body streams upstream as `state`: told if its source gives it up.
    pub(crate) fn streamed_as(&self, state: std::sync::Weak<StreamState>) {
        match self {
            BodyLink::H1(l) => l.streamed_as(state),
            BodyLink::H2(p) => p.streamed_as(state),
        }
    }
}

/// The client stopped sending its request body: nothing of it arrived for `limits.idle_timeout`
/// before the response started. The client gets 408 `body_timeout`.
#[derive(Debug)]
pub struct BodyStalled;

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client sent nothing more of its request body for idle_timeout")
    }
}

impl std::error::Error for BodyStalled {}

/// Watches a request body for a stall. The deadline is armed when a read first finds nothing, and
/// moved on when a read finds nothing after the body moved: one clock read per wait at most, none
/// while data keeps coming, and no timer at all for a body that never waits.
#[derive(Debug)]
pub struct Stall {
    after: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    moved: bool,
}

impl Stall {
    pub fn new(after: Duration) -> Self {
        Stall {
            after,
            timer: None,
            moved: false,
        }
    }

    /// A read returned data.
    pub fn moved(&mut self) {
        self.moved = true;
    }

    /// A read found nothing: whether the body has now been still for `after` (if not, `cx` is
    /// woken when it will have been).
    pub fn pending(&mut self, cx: &mut Context<'_>) -> bool {
        let after = self.after;
        let timer = match &mut self.timer {
            Some(t) => {
                if self.moved {
                    t.as_mut().reset(tokio::time::Instant::now() + after);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(after))),
        };
        self.moved = false;
        std::future::Future::poll(timer.as_mut(), cx).is_ready()
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ClientBodyProj::Empty => Poll::Ready(None),
            ClientBodyProj::H1 { inner } => Pin::new(inner)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(BoxError::from))),
            ClientBodyProj::H2 {
                inner,
                stall,
                stream,
                conn,
            } => match inner.poll_frame(cx) {
                _ if stream.poll_cut(cx) => Poll::Ready(Some(Err(super::h2::StreamCut.into()))),
                Poll::Pending if !stream.responding() && stall.pending(cx) => {
                    Poll::Ready(Some(Err(BodyStalled.into())))
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => {
                    stall.moved();
                    stream.upload_moved();
                    conn.stamp();
                    Poll::Ready(r.map(|r| {
                        r.map(|mut frame| {
                            if let Some(t) = frame.trailers_mut() {
                                super::headers::strip_forbidden_trailers(t);
                            }
                            frame
                        })
                        .map_err(BoxError::from)
                    }))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1 { inner } => inner.is_end_stream(),
            ClientBody::H2 { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1 { inner } => inner.size_hint(),
            ClientBody::H2 { inner, .. } => inner.size_hint(),
        }
    }
}

pin_project! {
    /// A request body sent upstream.
    #[project = ReqBodyProj]
    pub enum ReqBody {
        /// Buffered in full (so it can be re-sent); `None` once sent. Handed over in pieces of
        /// at most [`PIECE`] bytes (see `ReqBody::hold`).
        Full {
            data: Option<Bytes>,
            // Kept until the body is dropped (see `ReqBody::hold`).
            _held: Option<Box<dyn std::any::Any + Send + Sync>>,
        },
        /// Streamed from the client (cannot be re-sent): an already-read prefix, then the rest;
        /// `state` says whether the client's body came to its end, or failed.
        Stream {
            prefix: Option<Bytes>,
            #[pin] rest: Limited<ClientBody>,
            state: Arc<StreamState>,
            // Kept until the body is dropped (see `ReqBody::hold`).
            _held: Option<Box<dyn std::any::Any + Send + Sync>>,
        },
    }
}

/// What became of a request body streamed from the client, shared with the attempt that sends it:
/// an upstream client (hyper's HTTP/2 one) may report a failing request body only as a stream it
/// reset itself, which must not be taken for the upstream's failure.
#[derive(Default)]
pub struct StreamState {
    ended: AtomicBool,
    /// When `ended` was set (a per-try timeout counts from then).
    ended_at: std::sync::OnceLock<tokio::time::Instant>,
    /// The client went away before the whole body was sent (see [`StreamState::abandon`]).
    gone: AtomicBool,
    /// The upstream side waiting for `gone` (its connection's task).
    watch: futures_util::task::AtomicWaker,
    /// Run once when `gone` is set (an HTTP/2 stream's slot gives up its connection).
    on_gone: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// What the client gets for its body's failure: 0 none, else a [`Local`] code.
    failed: std::sync::atomic::AtomicU8,
}

impl std::fmt::Debug for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamState")
            .field("ended", &self.ended())
            .field("gone", &self.gone.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl StreamState {
    /// Whether the client has sent its whole body.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// When the client had sent its whole body, if it has.
    pub fn ended_at(&self) -> Option<tokio::time::Instant> {
        self.ended_at.get().copied()
    }

    fn end(&self) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            let _ = self.ended_at.set(tokio::time::Instant::now());
        }
    }

    /// The client's connection ended with the body unfinished. Whoever sends it upstream is
    /// told at once: the body itself would fail only at its next poll, and the upstream
    /// connection that holds it polls it only when it can write (an upstream that stopped reading
    /// would hold the body, its connection and the client's socket for ever).
    pub(crate) fn abandon(&self) {
        if self.ended() || self.gone.swap(true, Ordering::AcqRel) {
            return;
        }
        self.watch.wake();
        self.run_on_gone();
    }

    /// Runs (once) what [`StreamState::on_abandon`] left to run.
    fn run_on_gone(&self) {
        let f = self.on_gone.lock().ok().and_then(|mut g| g.take());
        if let Some(f) = f {
            f();
        }
    }

    /// Whether the client went away with the body unfinished; if not, `cx` is woken when it does.
    pub(crate) fn poll_abandoned(&self, cx: &mut Context<'_>) -> bool {
        if self.gone.load(Ordering::Acquire) {
            return true;
        }
        self.watch.register(cx.waker());
        self.gone.load(Ordering::Acquire)
    }

    /// Runs `f` when the client goes away with the body unfinished (at once if it has).
    pub(crate) fn on_abandon(&self, f: Box<dyn FnOnce() + Send>) {
        if let Ok(mut g) = self.on_gone.lock() {
            *g = Some(f);
        }
        if self.gone.load(Ordering::Acquire) {
            self.run_on_gone();
        }
    }

    /// When reading the client's body failed: what the client gets for it.
    pub fn client_error(&self) -> Option<super::respond::Local> {
        use super::respond::Local;
        match self.failed.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(Local::BodyTooLarge),
            2 => Some(Local::BodyTimeout),
            4 => Some(Local::ClientClosed),
            _ => Some(Local::BadRequest),
        }
    }

    fn fail(&self, err: &(dyn std::error::Error + 'static)) {
        use super::respond::Local;
        let code = match refusal(err) {
            Local::BodyTooLarge => 1,
            Local::BodyTimeout => 2,
            Local::ClientClosed => 4,
            _ => 3,
        };
        self.failed.store(code, Ordering::Relaxed);
    }
}

impl ReqBody {
    /// A body streamed from the client: `prefix` (already read), then `rest`.
    pub fn stream(prefix: Option<Bytes>, rest: Limited<ClientBody>) -> Self {
        ReqBody::Stream {
            prefix,
            rest,
            state: Arc::default(),
            _held: None,
        }
    }

    /// Keeps `guard` as long as this body: an HTTP/2 stream's place on its connection, which the
    /// stream holds while its request half is still being sent (an upstream may answer an upload
    /// before it ends). A body in memory is handed over in pieces too: hyper's HTTP/2 client takes
    /// the next one only when the upstream's flow-control window has room (and drops the body
    /// after the last), so a body larger than the window holds its place until all but its last
    /// piece went out.
    pub fn hold(&mut self, guard: Box<dyn std::any::Any + Send + Sync>) {
        match self {
            ReqBody::Stream { _held, .. } | ReqBody::Full { _held, .. } => *_held = Some(guard),
        }
    }

    /// A body in memory (`None`: none).
    pub fn full(data: Option<Bytes>) -> Self {
        ReqBody::Full { data, _held: None }
    }

    /// For a body streamed from the client, what became of it (shared: it is read after the body
    /// was handed over).
    pub fn stream_state(&self) -> Option<Arc<StreamState>> {
        match self {
            ReqBody::Stream { state, .. } => Some(state.clone()),
            ReqBody::Full { .. } => None,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ReqBody::full(None)
    }
}

/// The largest piece of a body in memory handed to an upstream client at once: HTTP/2's default
/// frame size, so hyper's client asks for the next one as the upstream's window opens.
const PIECE: usize = 16 * 1024;

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ReqBodyProj::Full { data, .. } => Poll::Ready(data.take().map(|mut d| {
                if d.len() > PIECE {
                    *data = Some(d.split_off(PIECE));
                }
                Ok(Frame::data(d))
            })),
            ReqBodyProj::Stream {
                prefix,
                mut rest,
                state,
                ..
            } => {
                if let Some(p) = prefix.take() {
                    if rest.is_end_stream() {
                        state.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                let frame = rest.as_mut().poll_frame(cx);
                match &frame {
                    Poll::Ready(Some(Err(e))) => state.fail(&**e),
                    Poll::Ready(None) => state.end(),
                    _ if rest.is_end_stream() => state.end(),
                    _ => {}
                }
                frame
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Full { data, .. } => data.is_none(),
            ReqBody::Stream {
                prefix,
                rest,
                state,
                ..
            } => {
                // A sender that sees the end here stops polling (hyper's HTTP/2 client does): the
                // client has sent everything, and its flag must say so.
                let end = prefix.is_none() && rest.is_end_stream();
                if end {
                    state.end();
                }
                end
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqBody::Stream { prefix, rest, .. } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
        }
    }
}

/// What reading the client's body up to the retry buffer produced.
#[derive(Debug)]
pub enum Buffered {
    /// The whole body (replayable).
    Full(Bytes),
    /// A prefix and the rest of the stream (not replayable).
    Partial(Bytes, Limited<ClientBody>),
}

/// Reads up to `max` bytes of `body`. Errors are the client's (body too large, or I/O).
pub async fn buffer(mut body: Limited<ClientBody>, max: usize) -> Result<Buffered, BoxError> {
    let mut first: Option<Bytes> = None;
    let mut acc: Vec<u8> = Vec::new();
    // Seen the end ourselves: `is_end_stream` may stay false after the last chunk of a chunked
    // body (the terminating chunk is only read by the next poll), so it cannot tell a small chunked
    // body from a long one.
    let mut ended = false;
    loop {
        let len = first.as_ref().map_or(0, Bytes::len) + acc.len();
        if len > max {
            break;
        }
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                // Trailers on a request to be retried are dropped; rare, and not replayable anyway.
                if let Ok(data) = frame.into_data() {
                    if first.is_none() && acc.is_empty() {
                        first = Some(data);
                    } else {
                        if let Some(f) = first.take() {
                            acc.extend_from_slice(&f);
                        }
                        acc.extend_from_slice(&data);
                    }
                }
            }
        }
    }
    let bytes = first.unwrap_or_else(|| Bytes::from(acc));
    if ended || body.is_end_stream() {
        Ok(Buffered::Full(bytes))
    } else {
        Ok(Buffered::Partial(bytes, body))
    }
}

/// Whether any error in the chain starting at `first` satisfies `is`.
fn in_chain(
    first: Option<&(dyn std::error::Error + 'static)>,
    is: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    std::iter::successors(first, |e| e.source()).any(is)
}

/// Whether a hyper client error was caused by our client's request body (too large, or aborted).
pub fn is_client_body_error(err: &hyper::Error) -> bool {
    in_chain(std::error::Error::source(err), |e| {
        e.is::<LengthLimitError>()
            || e.is::<hyper::Error>()
            || e.is::<super::h1::BodyError>()
            || e.is::<BodyStalled>()
    })
}

/// What the client gets when reading its body failed (`err` and its causes): 413 over the length
/// limit, 408 for a body that stalled, 499 when the client went away (its connection ended or
/// broke, or it reset its HTTP/2 stream), 400 otherwise (a malformed body).
pub fn refusal(err: &(dyn std::error::Error + 'static)) -> super::respond::Local {
    use super::respond::Local;
    if is_length_error(err) {
        Local::BodyTooLarge
    } else if in_chain(Some(err), |e| e.is::<BodyStalled>()) {
        Local::BodyTimeout
    } else if in_chain(Some(err), client_went_away) {
        Local::ClientClosed
    } else {
        Local::BadRequest
    }
}

/// Whether `e` says the client went away: its HTTP/1.1 body ended early or its socket failed, its
/// HTTP/2 connection failed, or it reset its stream (not a stream the gateway reset, say for a
/// malformed body).
fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(b) = e.downcast_ref::<super::h1::BodyError>() {
        return b.client_went_away();
    }
    if let Some(h) = e.downcast_ref::<::h2::Error>() {
        return h.is_io() || (h.is_remote() && (h.is_reset() || h.is_go_away()));
    }
    e.is::<std::io::Error>()
}

/// Whether an upstream send error (its cause chain) was caused by the client's body exceeding the
/// limit.
pub fn is_length_error(err: &(dyn std::error::Error + 'static)) -> bool {
    in_chain(Some(err), |e| e.is::<LengthLimitError>())
}

/// Keeps an endpoint's in-flight count, the upstream admission and the gateway's admission slot
/// until the response body is done: read to its end from the upstream (before its last bytes go
/// to the client, who may send its next request as soon as it has them), or dropped.
#[derive(Debug)]
pub struct Lease {
    endpoint: Arc<Endpoint>,
    _admission: Option<crate::policy::Admission>,
    _slot: Option<bulwark::shed::ShedPermit>,
    /// The in-flight count was given back (the body ended).
    ended: bool,
}

impl Lease {
    /// Counts one request in flight on `endpoint`.
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.inc();
        Lease {
            endpoint,
            _admission: None,
            _slot: None,
            ended: false,
        }
    }
    /// Attaches the upstream admission to release with the body.
    pub fn hold(&mut self, admission: crate::policy::Admission) {
        self._admission = Some(admission);
    }
    /// Gives the upstream's bulkhead slot back before the body ends.
    fn release_upstream_slot(&mut self) {
        if let Some(a) = &mut self._admission {
            a.release_slot();
        }
    }
    /// Attaches the gateway's admission slot to release with the body (at once if it has ended).
    fn hold_slot(&mut self, slot: bulwark::shed::ShedPermit) {
        if !self.ended {
            self._slot = Some(slot);
        }
    }
    /// The body was read to its end: puts `inner`'s connection back into the endpoint's pool and
    /// gives back everything held (the in-flight count, the bulkhead slot, the admission slot), so
    /// that the client's next request, which may come as soon as the last bytes reach it, finds
    /// them free.
    fn release(&mut self, inner: &mut UpstreamBody) {
        self.endpoint.pool.reclaim(inner);
        self._admission = None;
        self._slot = None;
        if !std::mem::replace(&mut self.ended, true) {
            self.endpoint.dec();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.ended {
            self.endpoint.dec();
        }
    }
}

pin_project! {
    /// A response body sent to the client.
    #[project = RespBodyProj]
    pub enum RespBody {
        /// Generated by the gateway.
        Full { data: Option<Bytes> },
        /// Streamed from the upstream, frame by frame (so server-sent events are not buffered).
        /// Its connection goes back to the pool as soon as the body was read to its end; a body
        /// dropped before closes it.
        Upstream { inner: UpstreamBody, lease: Lease },
    }
}

impl RespBody {
    /// A body of `data`.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let b = data.into();
        RespBody::Full {
            data: (!b.is_empty()).then_some(b),
        }
    }
    /// No body.
    pub fn empty() -> Self {
        RespBody::Full { data: None }
    }
    /// Keeps the gateway's admission `slot` until this body is done: until a streamed upstream
    /// body ends (or is dropped); a body already in memory releases it at once.
    pub fn hold_slot(&mut self, slot: bulwark::shed::ShedPermit) {
        match self {
            RespBody::Upstream { lease, .. } => lease.hold_slot(slot),
            RespBody::Full { .. } => drop(slot),
        }
    }
    /// Gives the upstream's bulkhead slot back now (the body is kept, but not necessarily
    /// forwarded).
    pub fn release_upstream_slot(&mut self) {
        if let RespBody::Upstream { lease, .. } = self {
            lease.release_upstream_slot();
        }
    }
    /// Streams `inner` from the upstream, releasing `lease` when done.
    pub fn upstream(mut inner: UpstreamBody, mut lease: Lease) -> Self {
        if inner.is_end_stream() {
            lease.release(&mut inner);
        }
        RespBody::Upstream { inner, lease }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            RespBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RespBodyProj::Upstream { inner, lease } => {
                let mut r = Pin::new(&mut *inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &mut r {
                    if let Some(t) = frame.trailers_mut() {
                        super::headers::strip_forbidden_trailers(t);
                    }
                }
                match &r {
                    Poll::Ready(None) => lease.release(inner),
                    // hyper stops polling once `is_end_stream` says so, so look after each frame.
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => lease.release(inner),
                    _ => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full { data } => data.is_none(),
            RespBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RespBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

/// Reads a response's whole body when it is at most `max` bytes and has arrived by `by`: the
/// response then carries it in memory, and its upstream connection is released (back to the pool).
/// `None` when it is larger, slower or broken; the response is then dropped.
pub async fn read_small(
    resp: http::Response<RespBody>,
    max: usize,
    by: tokio::time::Instant,
) -> Option<http::Response<RespBody>> {
    let (parts, body) = resp.into_parts();
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut acc = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            // Trailers are dropped: rare on an error response, and this one was not a success.
            if let Ok(data) = frame.ok()?.into_data() {
                if acc.len() + data.len() > max {
                    return None;
                }
                acc.extend_from_slice(&data);
            }
        }
        Some(acc.freeze())
    };
    let data = tokio::time::timeout_at(by, read).await.ok()??;
    Some(http::Response::from_parts(parts, RespBody::full(data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A streamed body whose client side has already ended when its prefix is handed out: a sender
    /// that then checks `is_end_stream` and stops polling (hyper's HTTP/2 client) must still leave
    /// the body marked as complete, or a timeout of that attempt is blamed on the client.
    #[tokio::test]
    async fn a_stream_read_to_its_end_by_is_end_stream_is_marked_complete() {
        let mut body = ReqBody::stream(
            Some(Bytes::from_static(b"abc")),
            Limited::new(ClientBody::Empty, 1024),
        );
        let done = body.stream_state().unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "abc");
        assert!(done.ended(), "marked at the prefix");

        let body = ReqBody::stream(None, Limited::new(ClientBody::Empty, 1024));
        let done = body.stream_state().unwrap();
        assert!(body.is_end_stream());
        assert!(done.ended(), "marked by is_end_stream");
    }
}
