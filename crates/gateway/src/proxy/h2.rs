//! HTTP/2 streams' progress timeout.
//!
//! hyper's HTTP/2 server polls a response body only when the client's flow-control window has
//! room, so a timer inside the body never fires for a client that stops reading. Each stream's
//! task is therefore spawned by [`StreamExec`] inside a [`Watched`] future, which cuts the stream
//! (drops it: hyper then resets it with `CANCEL`) when its response body has yielded no frame for
//! `idle`, whether the upstream sent nothing more or the client read nothing. Dropping it drops the
//! body, and with it the upstream connection, the upstream's admission and the gateway's slot.
//!
//! The response body ([`WatchedBody`]) finds its stream's [`Progress`] through a task-local set
//! while the stream's task is polled: the service's future runs inside that task.
//!
//! Abuse of the connection itself: streams the client resets right after opening them ("rapid
//! reset", CVE-2023-44487) are counted and close the connection ([`Resets`]), and a header block
//! the client leaves open (a HEADERS frame whose CONTINUATIONs do not come) is cut at
//! `header_read_timeout` ([`HeaderWatch`]).
//!
//! Also WebSocket over HTTP/2 (RFC 8441): an extended `CONNECT` with `:protocol websocket`
//! ([`take_connect`]) goes on as the HTTP/1.1 upgrade the rest of the proxy knows (a `GET` with a
//! fresh `Sec-WebSocket-Key`), and an upstream's 101 becomes the stream's 200, after which the
//! stream is tunnelled to the upstream connection ([`answer_connect`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::h2frame::{FrameHead, FrameSink, Frames};

use super::body::{BoxError, RespBody};
use super::Streaming;

/// The HTTP/2 layer's own limit on a request's header list (`SETTINGS_MAX_HEADER_LIST_SIZE`) for
/// `max_header_bytes` = `limit`: set high enough that it refuses nothing the gateway's exact check
/// (`route_and_forward`, which answers with `x-bulwark-reason` and logs the request) would pass.
///
/// HTTP/2 counts each field 32 bytes over its name and value (RFC 7541 4.1), pseudo-headers
/// included, where the exact check counts the 4 of an HTTP/1.1 head (`: ` and CRLF). A field is at
/// least 5 bytes of that head, so a head within `limit` is at most `limit + 28 * limit / 5` to
/// HTTP/2, plus its pseudo-headers (`:authority` is not in the HTTP/1.1 count).
pub(crate) fn header_list_ceiling(limit: usize) -> u32 {
    const PSEUDO_HEADERS: usize = 4096;
    let ceiling = limit
        .saturating_add(limit.saturating_mul(28) / 5)
        .saturating_add(PSEUDO_HEADERS);
    u32::try_from(ceiling).unwrap_or(u32::MAX)
}

/// Whether an HTTP/2 request's `host` fields leave its host ambiguous: more than one, or one that
/// names another host than `:authority` after scheme-based normalization (RFC 9110 4.2.3: the
/// host's case, and a default or empty port, do not matter).
pub(crate) fn ambiguous_host<B>(req: &Request<B>) -> bool {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return false;
    };
    if hosts.next().is_some() {
        return true;
    }
    let Some(authority) = req.uri().authority() else {
        return false;
    };
    let Ok(host) = http::uri::Authority::try_from(host.as_bytes()) else {
        return true;
    };
    let default = if req.uri().scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = |a: &http::uri::Authority| a.port_u16().unwrap_or(default);
    !(authority.host().eq_ignore_ascii_case(host.host()) && port(authority) == port(&host))
}

/// Whether a field value of an HTTP/2 request starts or ends with a space or a tab: malformed
/// (RFC 9113 8.2.1). An HTTP/1.1 upstream would drop that whitespace (it is optional whitespace
/// there), and read another value than the one routes matched and rate limits keyed on.
pub(crate) fn padded_field<B>(req: &Request<B>) -> bool {
    let padded = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    req.headers().values().any(|v| {
        let v = v.as_bytes();
        padded(v.first()) || padded(v.last())
    })
}

/// A stream the client resets this soon after opening it, before its response, counts as a
/// premature reset (Envoy's `premature_reset_min_stream_lifetime_seconds`).
const PREMATURE_LIFETIME: Duration = Duration::from_secs(1);

/// Streams after which the share of premature resets decides (Envoy's
/// `premature_reset_total_stream_count`).
const PREMATURE_STREAMS: u32 = 500;

/// One connection's streams and premature resets, for the rapid-reset rule (CVE-2023-44487, as
/// Envoy applies it): the connection is closed with a GOAWAY once half of its streams were reset
/// prematurely, judged over at least [`PREMATURE_STREAMS`] streams (so at the 250th premature reset
/// among the first 500, whatever came before). Each such stream made the gateway start an upstream
/// request the client never wanted; `max_concurrent_streams` does not bound them, as a reset stream
/// no longer counts against it.
#[derive(Debug, Default)]
pub(crate) struct Resets {
    streams: AtomicU32,
    premature: AtomicU32,
    /// Notified when the connection is to be closed.
    pub(crate) trip: tokio::sync::Notify,
}

impl Resets {
    /// A stream opened: the returned guard counts a premature reset if it is dropped before
    /// [`EarlyReset::answered`] within [`PREMATURE_LIFETIME`].
    pub(crate) fn opened(self: &Arc<Self>) -> EarlyReset {
        self.streams.fetch_add(1, Ordering::Relaxed);
        EarlyReset {
            resets: self.clone(),
            opened: Some(Instant::now()),
        }
    }

    /// Whether the client has opened any stream on this connection.
    pub(crate) fn any(&self) -> bool {
        self.streams.load(Ordering::Relaxed) > 0
    }

    fn too_many(premature: u32, streams: u32) -> bool {
        let premature = u64::from(premature) * 2;
        if streams < PREMATURE_STREAMS {
            premature >= u64::from(PREMATURE_STREAMS)
        } else {
            premature >= u64::from(streams)
        }
    }
}

/// See [`Resets::opened`].
pub(crate) struct EarlyReset {
    resets: Arc<Resets>,
    opened: Option<Instant>,
}

impl EarlyReset {
    /// The stream's response is ready: a reset from now on is not premature.
    pub(crate) fn answered(mut self) {
        self.opened = None;
    }
}

impl Drop for EarlyReset {
    fn drop(&mut self) {
        let Some(opened) = self.opened else {
            return;
        };
        if opened.elapsed() >= PREMATURE_LIFETIME {
            return;
        }
        let r = &self.resets;
        let premature = r.premature.fetch_add(1, Ordering::Relaxed) + 1;
        if Resets::too_many(premature, r.streams.load(Ordering::Relaxed)) {
            r.trip.notify_one();
        }
    }
}

/// The bytes before an HTTP/2 client's first frame: the connection preface (RFC 9113 3.4).
const PREFACE_LEN: u32 = 24;

/// A client connection's reads, watched for a request head that stops coming: a header block
/// (HEADERS or PUSH_PROMISE, then CONTINUATIONs up to the one with END_HEADERS; RFC 9113 6.10)
/// whose frames have not all arrived, or a frame header cut short. Left so for `timeout`, the
/// read fails and the connection ends: over HTTP/1.1 a head that does not complete is cut at
/// `header_read_timeout`, and h2 itself would hold the partial block (up to the header list
/// limit) for as long as the client likes. The time is per head: a read that completes one and
/// ends inside the next starts the next one's time. Only the 9-byte frame headers are looked at,
/// as they pass, and the timer is armed only when a read ends inside a head: a block that arrives
/// whole costs no timer.
pub(crate) struct HeaderWatch<I> {
    io: I,
    frames: Frames,
    block: OpenBlock,
    timeout: Duration,
    /// Armed while a read has ended inside a head.
    deadline: Option<Pin<Box<Sleep>>>,
}

/// Whether a header block is open: a header-block frame has begun, and the frame with
/// END_HEADERS has not ended.
#[derive(Default)]
struct OpenBlock {
    open: bool,
    /// The current frame is the block's last.
    last: bool,
    /// Header blocks completed so far (wrapping): one that completes within a read ends its
    /// timer, and a head begun after it gets a fresh one.
    done: u32,
    /// Frame headers seen so far (wrapping): outside a header block, a frame header cut short is
    /// timed from the end of the frame before it.
    heads: u32,
}

impl<I> HeaderWatch<I> {
    pub(crate) fn new(io: I, timeout: Duration) -> Self {
        HeaderWatch {
            io,
            frames: Frames::after(PREFACE_LEN),
            block: OpenBlock::default(),
            timeout,
            deadline: None,
        }
    }

    /// Follows `data`, the next bytes read: arms the timer when they end inside a head (if it is
    /// not armed already), disarms it when they end outside one.
    fn watch(&mut self, data: &[u8]) {
        let (done, heads) = (self.block.done, self.block.heads);
        self.frames.feed(data, &mut self.block);
        if self.block.done != done || (!self.block.open && self.block.heads != heads) {
            // A head completed (or, outside a block, a frame header): what is still open began
            // after it, and is timed from now, not from when the completed one began
            // (`header_read_timeout` is per head).
            self.deadline = None;
        }
        if self.block.open || self.frames.mid_head() {
            if self.deadline.is_none() {
                self.deadline = Some(Box::pin(tokio::time::sleep(self.timeout)));
            }
        } else {
            self.deadline = None;
        }
    }
}

impl FrameSink for OpenBlock {
    fn head(&mut self, head: FrameHead) -> bool {
        self.heads = self.heads.wrapping_add(1);
        if matches!(
            head.kind,
            FrameHead::HEADERS | FrameHead::PUSH_PROMISE | FrameHead::CONTINUATION
        ) {
            self.open = true;
            self.last = head.flags & FrameHead::END_HEADERS != 0;
        } else {
            self.last = false;
        }
        false
    }

    fn end(&mut self) {
        if self.last {
            self.open = false;
            self.last = false;
            self.done = self.done.wrapping_add(1);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeaderWatch<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.watch(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = match &mut this.deadline {
                    Some(d) => d.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    tracing::debug!(
                        "HTTP/2 header block left open for header_read_timeout: connection closed"
                    );
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "HTTP/2 header block left open for header_read_timeout",
                    )));
                }
                Poll::Pending
            }
            r => r,
        }
    }
}

write_through!(HeaderWatch);

tokio::task_local! {
    static PROGRESS: Arc<Progress>;
}

/// One stream as its watcher and its bodies see it.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// 0 while no response body is streaming (before the head, and after the body's end), else 1 +
    /// the frames it has yielded.
    frames: AtomicU64,
    /// The response has started: the request body's stall timer stops (a quiet upload under a
    /// streaming response is left alone).
    responding: AtomicBool,
    /// The watcher cut the stream: the request body, which may be held by an upstream connection's
    /// task rather than the stream's, fails at its next poll (`waker`), so that task ends and lets
    /// go of the client's stream too.
    cut: AtomicBool,
    waker: AtomicWaker,
    /// The upstream copy of the request body, when it streams: told when the stream's task has
    /// ended with the body unfinished and still (see `StreamState::abandon`).
    upload: std::sync::Mutex<Option<std::sync::Weak<super::body::StreamState>>>,
    /// Request body frames read so far.
    uploaded: AtomicU64,
}

impl Progress {
    /// The request body streams upstream as `state`.
    pub(crate) fn streamed_as(&self, state: std::sync::Weak<super::body::StreamState>) {
        if let Ok(mut u) = self.upload.lock() {
            *u = Some(state);
        }
    }

    /// A request body frame was read.
    pub(crate) fn upload_moved(&self) {
        self.uploaded.fetch_add(1, Ordering::Relaxed);
    }

    /// The stream's task has ended (its response is done, or the client reset it or left). An
    /// upload still streaming upstream may go on (an upstream may answer an upload early and read
    /// on), but one that stays still for `idle` (as the HTTP/1.1 listener waits on it) is given up:
    /// its sender may not poll it again to learn that the client is gone (see
    /// `StreamState::abandon`).
    fn task_ended(self: &Arc<Self>, idle: Duration) {
        let Some(upload) = self.upload.lock().ok().and_then(|mut u| u.take()) else {
            return;
        };
        if upload.upgrade().is_none_or(|s| s.ended()) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            let mut seen = me.uploaded.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(idle).await;
                let Some(s) = upload.upgrade() else { return };
                if s.ended() {
                    return;
                }
                let now = me.uploaded.load(Ordering::Relaxed);
                if now == seen {
                    s.abandon();
                    return;
                }
                seen = now;
            }
        });
    }

    fn started(&self) {
        self.frames.store(1, Ordering::Relaxed);
    }
    fn moved(&self) {
        self.frames.fetch_add(1, Ordering::Relaxed);
    }
    fn ended(&self) {
        self.frames.store(0, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
    /// The response head is ready.
    pub(crate) fn respond(&self) {
        self.responding.store(true, Ordering::Relaxed);
    }
    /// Whether the response has started.
    pub(crate) fn responding(&self) -> bool {
        self.responding.load(Ordering::Relaxed)
    }
    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.waker.wake();
    }
    /// Whether the stream was cut; if not, `cx` is woken when it is.
    pub(crate) fn poll_cut(&self, cx: &Context<'_>) -> bool {
        if self.cut.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.cut.load(Ordering::Acquire)
    }
}

/// The stream was reset: its response body stayed still for `limits.idle_timeout`.
#[derive(Debug)]
pub(crate) struct StreamCut;

impl std::fmt::Display for StreamCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the stream's response stayed still for idle_timeout")
    }
}

impl std::error::Error for StreamCut {}

/// The executor of the HTTP/2 server: spawns each stream's task [`Watched`] for `idle`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamExec {
    pub(crate) idle: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let progress = Arc::<Progress>::default();
        tokio::spawn(Watched {
            fut,
            end: TaskEnd(progress.clone(), self.idle),
            progress,
            idle: self.idle,
            timer: None,
            seen: 0,
            moved_at: None,
        });
    }
}

/// Tells a stream's [`Progress`] that its task has ended, however it ends.
struct TaskEnd(Arc<Progress>, Duration);

impl Drop for TaskEnd {
    fn drop(&mut self) {
        self.0.task_ended(self.1);
    }
}

pin_project! {
    /// A stream's task, dropped when its response body has been still for `idle`.
    struct Watched<F> {
        #[pin]
        fut: F,
        progress: Arc<Progress>,
        end: TaskEnd,
        idle: Duration,
        // Armed when a body first waits; moved on lazily (only when it fires), so a body that
        // keeps moving costs one clock read per wait and no timer operation.
        timer: Option<Pin<Box<Sleep>>>,
        seen: u64,
        moved_at: Option<Instant>,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let fut = this.fut;
        if PROGRESS
            .sync_scope(this.progress.clone(), || fut.poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        let now = this.progress.get();
        if now == 0 {
            *this.timer = None;
            return Poll::Pending;
        }
        let moved_at = match *this.moved_at {
            Some(t) if now == *this.seen => t,
            _ => {
                *this.seen = now;
                *this.moved_at.insert(Instant::now())
            }
        };
        let due = moved_at + *this.idle;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= due {
                tracing::debug!("HTTP/2 response body still for idle_timeout: stream reset");
                this.progress.cut();
                return Poll::Ready(());
            }
            timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}

/// The progress of the stream whose task is running (a new one, never cut, outside a watched
/// task).
pub(crate) fn current() -> Arc<Progress> {
    PROGRESS.try_with(Arc::clone).unwrap_or_default()
}

/// A response body sent on an HTTP/2 stream, reporting each frame to the stream's watcher.
pub(crate) struct WatchedBody {
    inner: RespBody,
    progress: Arc<Progress>,
    // The connection is not idle while this body streams.
    _streaming: Option<Streaming>,
}

impl WatchedBody {
    /// `inner`, reporting to `progress` (the stream's, from [`current`]) and keeping `streaming`
    /// until dropped.
    pub(crate) fn new(
        inner: RespBody,
        progress: Arc<Progress>,
        streaming: Option<Streaming>,
    ) -> Self {
        if !inner.is_end_stream() {
            progress.started();
        }
        WatchedBody {
            inner,
            progress,
            _streaming: streaming,
        }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(item) = &r {
            match item {
                Some(Ok(_)) => this.progress.moved(),
                _ => this.progress.ended(),
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What an HTTP/2 request's method asks of the stream.
pub(crate) enum Connect {
    /// Not a `CONNECT`: an ordinary request.
    No,
    /// An RFC 8441 WebSocket request, rewritten as an HTTP/1.1 upgrade; the stream becomes the
    /// client's side of the tunnel once a 2xx is sent.
    WebSocket(OnUpgrade),
    /// A `CONNECT` the gateway does not tunnel (a plain one, or another `:protocol`): 400, as over
    /// HTTP/1.1.
    Refused,
}

/// The request came as an RFC 8441 extended `CONNECT`: only a route with `websocket: true` takes it
/// (no plain answer can be given to it: a 2xx would open a tunnel to nothing). `accept` is the
/// `Sec-WebSocket-Accept` the upstream's 101 must carry for the key the gateway made up.
#[derive(Debug, Clone)]
pub(crate) struct ExtendedConnect {
    pub(crate) accept: HeaderValue,
}

/// Sorts out a `CONNECT` on an HTTP/2 stream; an RFC 8441 WebSocket one is rewritten in place
/// into the HTTP/1.1 upgrade request the proxy forwards (`GET`, a new `Sec-WebSocket-Key`, the
/// offer of `websocket`), keeping its `Sec-WebSocket-Version`, `-Protocol` and `-Extensions`.
pub(crate) fn take_connect<B>(req: &mut Request<B>) -> Connect {
    if req.method() != Method::CONNECT {
        return Connect::No;
    }
    let websocket = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket {
        return Connect::Refused;
    }
    let on = hyper::upgrade::on(&mut *req);
    *req.method_mut() = Method::GET;
    let key = websocket_key();
    let accept = websocket_accept(&key);
    req.headers_mut().insert(header::SEC_WEBSOCKET_KEY, key);
    let ext = req.extensions_mut();
    ext.remove::<hyper::ext::Protocol>();
    ext.insert(super::tunnel::UpgradeOffer(HeaderValue::from_static(
        "websocket",
    )));
    ext.insert(ExtendedConnect { accept });
    Connect::WebSocket(on)
}

/// The `Sec-WebSocket-Accept` an upstream answers `key` with (RFC 6455 4.2.2): the base64 of
/// the SHA-1 of the key and the protocol's GUID. (SHA-1 from `ring`, which rustls already uses.)
fn websocket_accept(key: &HeaderValue) -> HeaderValue {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut input = Vec::with_capacity(key.len() + GUID.len());
    input.extend_from_slice(key.as_bytes());
    input.extend_from_slice(GUID);
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    HeaderValue::from_str(&accept).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// A WebSocket handshake nonce (RFC 6455 4.1): 16 random bytes, base64.
fn websocket_key() -> HeaderValue {
    let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key)
        .unwrap_or_else(|_| HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAA=="))
}

/// The answer to an RFC 8441 WebSocket request, before it is counted and logged: anything but an
/// upstream's accepted upgrade (a 101 carrying its connection) that would read as a success (a
/// 2xx, a fallback's or an injected fault's included, which would open a tunnel to nothing) is a
/// 502: `upstream_error` for an upstream's answer, the gateway's own reason (`fallback`,
/// `fault`) for its own, with the attempts it followed (none for a fault). Other answers stay as
/// they are.
pub(crate) fn refuse_unswitched(
    resp: Response<RespBody>,
    accept: &HeaderValue,
) -> Response<RespBody> {
    // The gateway is the upstream's WebSocket client here (it made up the key, and the client
    // never sees the accept): a 101 without the right accept is no WebSocket handshake (RFC 6455
    // 4.1), and is refused like any other unswitched answer.
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && resp.extensions().get::<super::tunnel::Upgraded>().is_some()
        && resp.headers().get(header::SEC_WEBSOCKET_ACCEPT) == Some(accept);
    if switched || !(resp.status().is_success() || resp.status().is_informational()) {
        return resp;
    }
    // The gateway's own answer (a fallback, an injected fault) says why, and was sent nowhere
    // unless it says how many attempts it followed; an upstream's 2xx was one attempt at least.
    let own = resp
        .headers()
        .get(&super::respond::X_BULWARK_REASON)
        .cloned();
    let attempts = resp
        .headers()
        .get(&super::respond::X_BULWARK_ATTEMPTS)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(if own.is_some() { 0 } else { 1 });
    let mut refused =
        super::respond::failure(super::respond::Failure::UpstreamError, attempts, None);
    if let Some(reason) = own {
        refused
            .headers_mut()
            .insert(super::respond::X_BULWARK_REASON.clone(), reason);
    }
    refused
}

/// The stream's answer to an RFC 8441 WebSocket request ([`refuse_unswitched`] already applied).
/// An upstream's accepted upgrade (its 101) becomes a 200 without the handshake's HTTP/1.1
/// headers, and a task then copies bytes between the stream (`on`) and the upstream connection
/// until both ends close or nothing moves for `idle`, holding `open` (the tunnel gauge and the
/// connection's activity) meanwhile. Other answers go back as they are.
/// A response to HEAD, a 204 or a 304 has no content (RFC 9110 9.3.2, 15.3.5, 15.4.5), whatever
/// its body holds (a fallback's text, a fault's), and a 204 no `content-length` (RFC 9110 8.6;
/// an upstream's `content-length: 0` is dropped). hyper's HTTP/2 server sends the body it is
/// given (it does not know the request's method), and an HTTP/2 client takes DATA on such a
/// response as malformed: the stream is reset and the answer lost. (HTTP/1.1: `h1::encode_head`.)
pub(crate) fn without_content(mut resp: Response<RespBody>, head: bool) -> Response<RespBody> {
    let status = resp.status();
    if status == StatusCode::NO_CONTENT {
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    // A body already at its end (an upstream's answer to HEAD) is kept: read to its end, it gives
    // its upstream connection back to the pool.
    let no_content = head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if no_content && !resp.body().is_end_stream() {
        *resp.body_mut() = RespBody::empty();
    }
    resp
}

pub(crate) fn answer_connect<G: Send + 'static>(
    resp: Response<RespBody>,
    on: OnUpgrade,
    idle: Duration,
    open: impl FnOnce() -> G,
) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    let side = (parts.status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| parts.extensions.remove::<super::tunnel::Upgraded>())
        .flatten()
        .and_then(|u| u.take());
    let Some(side) = side else {
        return Response::from_parts(parts, body);
    };
    drop(body);
    parts.status = StatusCode::OK;
    for h in [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_ACCEPT,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
    ] {
        parts.headers.remove(h);
    }
    let open = open();
    tokio::spawn(async move {
        let _open = open;
        match on.await {
            Ok(stream) => {
                let client = super::tunnel::ResetAware::new(TokioIo::new(stream));
                super::tunnel::run(client, Bytes::new(), side, idle).await
            }
            Err(e) => tracing::debug!(error = %e, "HTTP/2 WebSocket stream not upgraded"),
        }
    });
    Response::from_parts(parts, RespBody::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            flags,
        ];
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend(std::iter::repeat_n(0xaa, payload));
        f
    }

    /// Feeds `bytes` one byte at a time and in one piece; returns whether a header block is
    /// open after each way.
    fn open_after(bytes: &[u8]) -> (bool, bool) {
        let mut w = HeaderWatch::new((), Duration::from_secs(1));
        for b in bytes {
            w.watch(std::slice::from_ref(b));
        }
        let mut v = HeaderWatch::new((), Duration::from_secs(1));
        v.watch(bytes);
        (w.deadline.is_some(), v.deadline.is_some())
    }

    #[tokio::test]
    async fn header_blocks_are_followed_through_frames_cut_anywhere() {
        let mut conn = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        conn.extend(frame(0x4, 0, 12)); // SETTINGS
        assert_eq!(open_after(&conn), (false, false));
        // HEADERS without END_HEADERS: open, whatever its payload holds.
        conn.extend(frame(0x1, 0x1, 300));
        assert_eq!(open_after(&conn), (true, true));
        // A CONTINUATION without END_HEADERS keeps it open; one with it closes it.
        conn.extend(frame(0x9, 0, 70_000));
        assert_eq!(open_after(&conn), (true, true));
        conn.extend(frame(0x9, 0x4, 5));
        assert_eq!(open_after(&conn), (false, false));
        // DATA whose payload looks like a HEADERS frame header opens nothing.
        let mut data = frame(0x0, 0, 9);
        data[9..].copy_from_slice(&frame(0x1, 0, 0)[..9]);
        conn.extend(data);
        conn.extend(frame(0x1, 0x5, 20)); // HEADERS with END_HEADERS
        assert_eq!(open_after(&conn), (false, false));
        // A HEADERS frame with END_HEADERS whose payload stops short: still inside the head.
        let whole = frame(0x1, 0x5, 20);
        let cut = [&conn[..], &whole[..15]].concat();
        assert_eq!(open_after(&cut), (true, true));
        // A frame header cut short, whatever the frame.
        let cut = [&conn[..], &frame(0x0, 0, 4)[..5]].concat();
        assert_eq!(open_after(&cut), (true, true));
        // DATA cut in its payload: not a head.
        let cut = [&conn[..], &frame(0x0, 0, 40)[..20]].concat();
        assert_eq!(open_after(&cut), (false, false));
    }

    /// The time is per head: a read that completes one head and ends inside the next times the
    /// next from then; reads that each end inside the same head keep its first deadline.
    #[tokio::test(start_paused = true)]
    async fn each_head_is_timed_from_its_own_start() {
        let timeout = Duration::from_secs(1);
        let mut w = HeaderWatch::new((), timeout);
        w.watch(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let first = frame(0x1, 0x5, 20);
        let second = frame(0x1, 0x5, 20);
        w.watch(&first[..5]);
        let armed = w.deadline.as_ref().unwrap().deadline();
        tokio::time::advance(Duration::from_millis(600)).await;
        // More of the same head: its deadline stands.
        w.watch(&first[5..12]);
        assert_eq!(w.deadline.as_ref().unwrap().deadline(), armed);
        // It completes, and the read ends inside the next: a fresh second.
        w.watch(&[&first[12..], &second[..3]].concat());
        let next = w.deadline.as_ref().unwrap().deadline();
        assert_eq!(next, Instant::now() + timeout);
        assert!(next > armed);
        // A frame header cut short, outside a block, after a whole DATA frame: timed anew too.
        w.watch(&second[3..]);
        assert!(w.deadline.is_none());
        w.watch(&frame(0x0, 0, 4)[..6]);
        tokio::time::advance(Duration::from_millis(600)).await;
        w.watch(&[&frame(0x0, 0, 4)[6..], &frame(0x0, 0, 4)[..2]].concat());
        assert_eq!(
            w.deadline.as_ref().unwrap().deadline(),
            Instant::now() + timeout
        );
    }

    #[test]
    fn premature_resets_close_at_half_of_at_least_500_streams() {
        assert!(!Resets::too_many(249, 300));
        assert!(Resets::too_many(250, 300));
        assert!(!Resets::too_many(10, 10));
        assert!(!Resets::too_many(499, 1000));
        assert!(Resets::too_many(500, 1000));
    }
}
