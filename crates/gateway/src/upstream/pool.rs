//! Per-endpoint keep-alive connection pool.
//!
//! Owning the pool (rather than hyper-util's legacy client) gives exact error classes: a connect failure
//! happened before any byte of the request left, a reset happened after; and a request that could
//! not be written at all on a pooled connection (the upstream had closed it while idle) is re-sent
//! on a fresh connection, which is safe for every method.
//!
//! HTTP/1 exchanges use our own client (module `h1`): a pooled connection is a socket and its
//! buffers, and the request's future writes the request and reads the response head, then the
//! response body reads the rest; no task and no channel per connection. A connection goes back to
//! the pool when its response body was read to the end ([`UpstreamBody::take_conn`]). An idle
//! connection the upstream closed is noticed at checkout from the reactor's readiness (no system
//! call when nothing happened on it) and dropped.
//!
//! Two cases stay on hyper's client: HTTP/2 upstreams, and HTTP/1 requests whose body is streamed
//! from the client (not buffered by the proxy). The latter need a full-duplex exchange (an upstream
//! may answer before the body ended, and the body must still be forwarded after) and the client
//! body's own error classes (too large: 413); such a request takes a pooled socket (or a new one),
//! runs hyper's connection in a task of its own, and the socket is not pooled afterwards.
//!
//! `https://` endpoints: the pool holds the upstream's shared TLS client config and the endpoint's
//! server name, and every new connection does its TLS handshake right after the TCP connect,
//! within the same `connect_timeout`. A failed handshake (untrusted or expired certificate, wrong
//! name, not TLS, no `h2` by ALPN for an HTTP/2 upstream) is a connect failure like a refused
//! connection: nothing was sent, so it is retried elsewhere and counts for outlier detection. Every
//! path above (our HTTP/1 client, hyper's for streamed bodies and HTTP/2) runs the same over TLS.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::h1::{Io, Item, RecvBody, Stream};
use super::tls::ALPN_H2;
use crate::h2frame::{FrameHead, FrameSink, Frames};
use crate::proxy::body::{BoxError, ReqBody};
use crate::proxy::Rewind;

/// How an exchange with an endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// TCP connect or handshake failed: the request was never sent.
    ConnectFailure,
    /// The upstream refused the request without processing it (an HTTP/2 stream refused, or past
    /// a GOAWAY's last stream id, RFC 9113 8.7), on a new connection too: like a connect failure,
    /// it may go to another endpoint whatever its method.
    Refused,
    /// The connection broke after the request was (possibly) sent.
    Reset,
    /// The attempt took longer than its timeout.
    Timeout,
    /// The attempt's own timeout passed while its connection was still being opened
    /// ([`Pool::send`]'s `by`): a timeout, but of a request never sent, so it may go to another
    /// endpoint whatever its method.
    ConnectCut,
    /// The client's request body failed (too large, or the client went away): not the upstream's fault.
    ClientBody,
}

impl FailKind {
    /// Whether the request was not sent (nothing reached anything that could process it).
    pub fn unsent(self) -> bool {
        matches!(
            self,
            FailKind::ConnectFailure | FailKind::Refused | FailKind::ConnectCut
        )
    }
}

/// An exchange failure with its cause.
#[derive(Debug)]
pub struct SendError {
    /// Class.
    pub kind: FailKind,
    /// Cause, for logs (and the client body's error, for [`FailKind::ClientBody`]).
    pub source: Option<BoxError>,
}

impl SendError {
    fn connect(source: Option<BoxError>) -> Self {
        SendError {
            kind: FailKind::ConnectFailure,
            source,
        }
    }
}

/// Why a connect ended early: the attempt's own timeout came first (see [`Pool::send`]).
const CONNECT_TOO_LATE: &str = "the attempt's timeout passed while connecting";

/// The error of a connect the attempt's own timeout cut short.
fn connect_cut() -> SendError {
    SendError {
        kind: FailKind::ConnectCut,
        source: Some(CONNECT_TOO_LATE.into()),
    }
}

/// `connect`, given up at `by` (the attempt's own timeout) as [`FailKind::ConnectCut`].
async fn connect_by<T>(
    by: Option<Instant>,
    connect: impl Future<Output = Result<T, SendError>>,
) -> Result<T, SendError> {
    match by {
        None => connect.await,
        Some(by) => tokio::time::timeout_at(by, connect)
            .await
            .unwrap_or_else(|_| Err(connect_cut())),
    }
}

/// An idle HTTP/1 connection, checked out of the pool and put back with [`Pool::put`].
#[derive(Debug)]
pub struct Conn {
    // Boxed once per connection (not per request): a pooled connection moves between the pool and
    // the response bodies as a pointer.
    io: Box<Io>,
}

/// A response body from an upstream: our HTTP/1 client's, or hyper's (HTTP/2, streamed requests).
#[derive(Debug)]
pub struct UpstreamBody(Inner);

#[derive(Debug)]
enum Inner {
    H1(RecvBody),
    Hyper(Peeked),
    /// A response on a pooled HTTP/2 connection, holding its stream's slot there until dropped.
    H2 {
        body: Peeked,
        _slot: Arc<StreamSlot>,
    },
}

/// A hyper body whose first frame was looked at when its head came ([`Peeked::look`]).
#[derive(Debug)]
struct Peeked {
    body: Incoming,
    first: Option<Frame<Bytes>>,
}

impl Peeked {
    /// Polls `body` once, without waiting: a body already broken when its head arrives (an
    /// upstream that reset its stream, or sent a malformed first chunk, right after the head)
    /// fails the exchange as a reset would, so it is retried, counted and answered as the 502
    /// the client gets, as for the gateway's own HTTP/1.1 client ([`RecvBody::prefetch`]). A
    /// frame already there is kept for the first read.
    async fn look(mut body: Incoming) -> Result<Peeked, hyper::Error> {
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Err(e),
                Poll::Ready(Some(Ok(f))) => Ok(Some(f)),
                Poll::Ready(None) | Poll::Pending => Ok(None),
            })
        })
        .await?;
        Ok(Peeked { body, first })
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.body.size_hint();
        let Some(n) = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64)
        else {
            return rest;
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(n));
        if let Some(u) = rest.upper() {
            hint.set_upper(u.saturating_add(n));
        }
        hint
    }
}

impl UpstreamBody {
    /// The connection, once the body was read to its end and the connection can carry another
    /// request; put it back with [`Pool::put`]. `None` otherwise (and for hyper's connections).
    pub fn take_conn(&mut self) -> Option<Conn> {
        match &mut self.0 {
            Inner::H1(b) => b.take_conn().map(|io| Conn { io }),
            Inner::Hyper(_) | Inner::H2 { .. } => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Inner::H1(b) => b.poll_item(cx).map(|r| match r {
                Ok(Item::Data(d)) => Some(Ok(Frame::data(d))),
                Ok(Item::Trailers(t)) => Some(Ok(Frame::trailers(t))),
                Ok(Item::End) => None,
                Err(e) => Some(Err(e.into())),
            }),
            Inner::Hyper(b) | Inner::H2 { body: b, .. } => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::H1(b) => b.is_end_stream(),
            Inner::Hyper(b) | Inner::H2 { body: b, .. } => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::H1(b) => b.size_hint(),
            Inner::Hyper(b) | Inner::H2 { body: b, .. } => b.size_hint(),
        }
    }
}

struct Idle {
    io: Box<Io>,
    since: Instant,
}

/// The streams of one HTTP/2 connection to an upstream.
#[derive(Debug)]
struct H2Load {
    /// Streams open on it: requests sent whose response (or failure) has not been dropped yet,
    /// or whose streamed request body is still being sent.
    streams: AtomicUsize,
    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS`: 100 until its first SETTINGS frame says (as
    /// the `h2` crate assumes, RFC 9113's recommended minimum), unlimited if that one names none.
    peer_max: AtomicUsize,
    /// When its last stream ended (or it opened), while it has none.
    idle_since: Mutex<Instant>,
    /// Streams whose client went away mid-upload (see [`StreamSlot::abandon`]); while it has
    /// any, the connection takes no new stream, and it is closed once they are all it has.
    abandoned: AtomicUsize,
    /// Set to close the connection: its I/O fails from then on ([`PeerSettings`]), and with it
    /// every stream (hyper drives the connection in a task of its own, which only a failing
    /// I/O ends while a stream is open).
    killed: AtomicBool,
    /// The connection's task, woken when `killed` is set.
    io_waker: futures_util::task::AtomicWaker,
}

impl H2Load {
    fn new() -> Arc<Self> {
        Arc::new(H2Load {
            streams: AtomicUsize::new(0),
            peer_max: AtomicUsize::new(100),
            idle_since: Mutex::new(Instant::now()),
            abandoned: AtomicUsize::new(0),
            killed: AtomicBool::new(false),
            io_waker: futures_util::task::AtomicWaker::new(),
        })
    }

    /// A stream slot, if the peer allows one more stream now (none on a connection that holds
    /// abandoned streams: it is closed once they are all it has).
    fn try_take(self: &Arc<Self>) -> Option<StreamSlot> {
        if self.abandoned.load(Ordering::Acquire) > 0 || self.killed.load(Ordering::Acquire) {
            return None;
        }
        let max = self.peer_max.load(Ordering::Relaxed);
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot::new(self.clone()))
    }

    /// Whether the connection was closed ([`H2Load::close_if_abandoned`]); if not, `cx` (its
    /// task) is woken when it is.
    fn killed(&self, cx: &Context<'_>) -> bool {
        if self.killed.load(Ordering::Acquire) {
            return true;
        }
        self.io_waker.register(cx.waker());
        self.killed.load(Ordering::Acquire)
    }

    /// Closes the connection if it has abandoned streams and no other.
    fn close_if_abandoned(&self) {
        let abandoned = self.abandoned.load(Ordering::Acquire);
        if abandoned > 0 && self.streams.load(Ordering::Acquire) <= abandoned {
            tracing::debug!(
                "HTTP/2 upstream connection closed: its streams' clients left mid-upload"
            );
            self.killed.store(true, Ordering::Release);
            self.io_waker.wake();
        }
    }

    /// Whether it has had no stream for `timeout`.
    fn idle_for(&self, timeout: Duration) -> bool {
        self.streams.load(Ordering::Acquire) == 0
            && self.idle_since.lock().is_ok_and(|t| t.elapsed() > timeout)
    }
}

/// One stream's place on an HTTP/2 connection, given back when dropped.
#[derive(Debug)]
struct StreamSlot {
    load: Arc<H2Load>,
    abandoned: AtomicBool,
}

impl StreamSlot {
    fn new(load: Arc<H2Load>) -> Self {
        StreamSlot {
            load,
            abandoned: AtomicBool::new(false),
        }
    }

    /// The client went away while this stream's request body was still being sent: the body
    /// is polled only when the upstream grants flow-control window, so an upstream that stopped
    /// reading would keep the stream (and the body, and the connection) for ever. hyper gives no
    /// handle to reset one stream, so the connection takes no new stream from now on, and is
    /// closed (every stream it has then ends) once its abandoned streams are all it has.
    fn abandon(&self) {
        if !self.abandoned.swap(true, Ordering::AcqRel) {
            self.load.abandoned.fetch_add(1, Ordering::AcqRel);
            self.load.close_if_abandoned();
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let load = &self.load;
        if self.abandoned.load(Ordering::Acquire) {
            load.abandoned.fetch_sub(1, Ordering::AcqRel);
        }
        if load.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut t) = load.idle_since.lock() {
                *t = Instant::now();
            }
        }
        load.close_if_abandoned();
    }
}

/// One HTTP/2 connection of an endpoint.
struct H2Conn {
    generation: u64,
    sender: http2::SendRequest<ReqBody>,
    load: Arc<H2Load>,
}

/// Idle connections of one endpoint.
pub struct Pool {
    addr: String,
    http2: bool,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// For an `https://` endpoint: the upstream's TLS config and this endpoint's server name.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    // An uncontended std mutex around a Vec: one push/pop per request, never held across an await.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connections, oldest first; generations counted from 1. A request takes the
    /// first with a stream to spare (so traffic stays on few connections, and the others go
    /// idle and close); another opens when each is at its peer's stream limit.
    h2: Mutex<Vec<H2Conn>>,
    /// Held while an HTTP/2 connection is being opened (it guards the last generation handed
    /// out): requests that find no connection wait for that one instead of each opening their own.
    h2_connect: tokio::sync::Mutex<u64>,
    /// HTTP/2 connects that failed.
    h2_failures: AtomicU64,
    /// Connections opened (TCP connected, TLS handshake done), for the metrics.
    opened: AtomicU64,
    /// A reload took the endpoint out ([`Pool::retire`]): no connection goes (back) into the
    /// pool, which no reaper visits any more.
    retired: AtomicBool,
    /// HTTP/2: the ping interval and timeout of each connection.
    pings: (Duration, Duration),
    /// HTTP/2: the flow-control windows of each stream and of each connection.
    windows: (u32, u32),
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

/// What [`Pool::checkout_h2`] gives: a connection's sender, its generation, a stream's slot on
/// it, and whether it was already open.
type H2Checkout = (http2::SendRequest<ReqBody>, u64, Arc<StreamSlot>, bool);

type ConnectFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SendError>> + Send + 'a>>;

impl Pool {
    /// A pool for `addr` (`host:port`).
    pub fn new(
        addr: String,
        http2: bool,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        Pool {
            addr,
            http2,
            max_idle,
            idle_timeout,
            connect_timeout,
            tls: None,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(Vec::new()),
            h2_connect: tokio::sync::Mutex::new(0),
            h2_failures: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            pings: (
                crate::config::DEFAULT_POOL_PING_INTERVAL.get(),
                crate::config::DEFAULT_POOL_PING_TIMEOUT.get(),
            ),
            windows: (
                crate::config::DEFAULT_POOL_H2_STREAM_WINDOW.0 as u32,
                crate::config::DEFAULT_POOL_H2_CONNECTION_WINDOW.0 as u32,
            ),
        }
    }

    /// HTTP/2: pings each connection every `interval`, idle or not, and closes it when one
    /// is not answered within `timeout`, so that a connection gone silent (a host that vanished, a
    /// dropped NAT entry: no FIN, no reset) is replaced rather than waited on by every request.
    pub fn with_pings(mut self, interval: Duration, timeout: Duration) -> Self {
        self.pings = (interval, timeout);
        self
    }

    /// HTTP/2: the flow-control windows each connection advertises, per stream and for the
    /// whole connection. Data a client has not read yet holds both; a connection window many times
    /// the stream window keeps streams whose clients read nothing from stalling the others.
    pub fn with_h2_windows(mut self, stream: u32, connection: u32) -> Self {
        self.windows = (stream, connection);
        self
    }

    /// Makes this the pool of an `https://` endpoint: every connection does a TLS handshake with
    /// `config` (the upstream's, shared; its ALPN must match the pool's protocol), sending and
    /// verifying `server_name`.
    pub fn with_tls(
        mut self,
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    ) -> Self {
        self.tls = Some((TlsConnector::from(config), server_name));
        self
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The `host:port` connections go to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Number of idle HTTP/1 connections (for tests and the admin API).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// The connections the pool holds: idle HTTP/1 ones, or open HTTP/2 ones (busy or not); not
    /// those the upstream closed, which the next checkout or the reaper drops.
    pub fn pooled(&self) -> usize {
        if self.http2 {
            let h2 = self.h2.lock();
            h2.map_or(0, |v| v.iter().filter(|c| !c.sender.is_closed()).count())
        } else {
            let idle = self.idle.lock();
            idle.map_or(0, |mut v| {
                v.iter_mut().map(|c| usize::from(!c.io.is_stale())).sum()
            })
        }
    }

    /// Connections opened so far (TCP connected, and the TLS handshake done for `https://`).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// The most recently returned idle connection that is still good; closed or expired ones met on
    /// the way are dropped.
    fn pop(&self) -> Option<Box<Io>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(mut c) = idle.pop() {
            if !c.io.is_stale() && c.since.elapsed() <= self.idle_timeout {
                return Some(c.io);
            }
        }
        None
    }

    /// Takes `body`'s connection back into the pool if the body was read to its end and the
    /// connection can carry another request (see [`UpstreamBody::take_conn`]).
    pub fn reclaim(&self, body: &mut UpstreamBody) {
        if let Some(conn) = body.take_conn() {
            self.put(conn);
        }
    }

    /// Returns a connection taken from a response body read to its end. With the pool full, the
    /// entries the upstream closed or that outlived the idle timeout make room first, then the
    /// oldest one: the connection just used is the one most likely to be reusable.
    pub fn put(&self, conn: Conn) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        // Read under the lock `retire` takes after setting it: a connection pushed before is
        // cleared by it.
        if self.max_idle == 0 || self.retired.load(Ordering::Acquire) {
            return;
        }
        if idle.len() >= self.max_idle {
            let t = self.idle_timeout;
            idle.retain_mut(|c| !c.io.is_stale() && c.since.elapsed() <= t);
            if idle.len() >= self.max_idle {
                idle.remove(0);
            }
        }
        idle.push(Idle {
            io: conn.io,
            since: Instant::now(),
        });
    }

    /// How long an idle connection is kept.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The endpoint left the config: its idle connections close now, and its HTTP/2
    /// connections once the requests on them end (requests still in flight keep what they use).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
        if let Ok(mut h2) = self.h2.lock() {
            h2.clear();
        }
    }

    /// Drops idle connections past their idle timeout or closed by the upstream (called
    /// periodically): HTTP/1 ones in the pool, and HTTP/2 ones without a stream for that long
    /// (dropping the last sender closes the connection with a `GOAWAY`).
    pub fn reap(&self) {
        let t = self.idle_timeout;
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain_mut(|c| !c.io.is_stale() && c.since.elapsed() <= t);
        }
        if let Ok(mut h2) = self.h2.lock() {
            h2.retain(|c| !c.sender.is_closed() && !c.load.idle_for(t));
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| SendError::connect(None))?
            .map_err(|e| SendError::connect(Some(e.into())))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A new connection, counted in [`opened`](Self::opened) once made, within the connect
    /// timeout.
    async fn connect_stream(&self) -> Result<Stream, SendError> {
        let stream = self.connect_stream_uncounted().await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// A new connection: TCP, then the TLS handshake for an `https://` endpoint, both within the
    /// connect timeout.
    async fn connect_stream_uncounted(&self) -> Result<Stream, SendError> {
        let Some((connector, name)) = &self.tls else {
            return Ok(Stream::Tcp(self.connect_tcp().await?));
        };
        let handshake = async {
            let tcp = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| SendError::connect(Some(e.into())))?;
            let _ = tcp.set_nodelay(true);
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| SendError::connect(Some(format!("TLS handshake: {e}").into())))?;
            if self.http2 && tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(SendError::connect(Some(
                    "TLS: the server did not select HTTP/2 (ALPN `h2`)".into(),
                )));
            }
            Ok(Stream::Tls(Box::new(tls)))
        };
        tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| {
                SendError::connect(Some("connect (TLS handshake included) timed out".into()))
            })?
    }

    /// A new HTTP/1 connection.
    ///
    /// Boxed on purpose: a TCP connect is a future of its own size, and inline it would be part of
    /// every request's future (moved with it, and touched in cache), while it runs only when the
    /// pool has no idle connection, next to a TCP handshake that costs far more than one allocation.
    fn connect_h1(&self, by: Option<Instant>) -> ConnectFuture<'_, Box<Io>> {
        Box::pin(async move {
            let stream = connect_by(by, self.connect_stream()).await?;
            Ok(Box::new(Io::new(stream)))
        })
    }

    /// A stream on an HTTP/2 connection (not generation `stale`, one found closing or refusing):
    /// the first open one with a stream to spare, or a new one: its sender, generation, the
    /// stream's slot and whether it was already open. One connect at a time: requests that
    /// arrive while one is under way wait for it and share its connection, or fail with it
    /// (boxed as [`Pool::connect_h1`]).
    fn checkout_h2(
        &self,
        stale: Option<u64>,
        by: Option<Instant>,
    ) -> ConnectFuture<'_, H2Checkout> {
        Box::pin(async move {
            let current = || {
                let mut g = self.h2.lock().ok()?;
                g.retain(|c| !c.sender.is_closed());
                g.iter()
                    .filter(|c| Some(c.generation) != stale)
                    .find_map(|c| {
                        let slot = Arc::new(c.load.try_take()?);
                        Some((c.sender.clone(), c.generation, slot, true))
                    })
            };
            if let Some(found) = current() {
                return Ok(found);
            }
            let failures = self.h2_failures.load(Ordering::Acquire);
            let mut last_generation = match by {
                None => self.h2_connect.lock().await,
                Some(by) => tokio::time::timeout_at(by, self.h2_connect.lock())
                    .await
                    .map_err(|_| connect_cut())?,
            };
            if let Some(found) = current() {
                return Ok(found);
            }
            if self.h2_failures.load(Ordering::Acquire) != failures {
                // The connect this request waited for failed: fail with it rather than wait out
                // another connect timeout in line.
                return Err(SendError::connect(Some(
                    "the HTTP/2 connect this request waited for failed".into(),
                )));
            }
            let load = H2Load::new();
            let opened = async {
                let io = TokioIo::new(PeerSettings::new(
                    self.connect_stream().await?,
                    load.clone(),
                ));
                http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(self.pings.0)
                    .keep_alive_timeout(self.pings.1)
                    .keep_alive_while_idle(true)
                    .initial_stream_window_size(self.windows.0)
                    .initial_connection_window_size(self.windows.1)
                    // A response head may be as large as over HTTP/1.1 (hyper's default, 16 KiB
                    // of HPACK's count, would refuse a head HTTP/1.1 passes).
                    .max_header_list_size(crate::proxy::h2::header_list_ceiling(
                        super::h1::MAX_HEAD,
                    ))
                    .handshake(io)
                    .await
                    .map_err(|e| SendError::connect(Some(e.into())))
            };
            // Bounded by the connect timeout only: the requests waiting for this connect share
            // it. This request gives up at its own `by`, dropping the connect, which is not a
            // failed connect for those waiting: the next one in line opens its own.
            let (sender, conn) = match connect_by(by, opened).await {
                Ok(x) => x,
                Err(e) if e.kind == FailKind::ConnectCut => return Err(e),
                Err(e) => {
                    self.h2_failures.fetch_add(1, Ordering::Release);
                    return Err(e);
                }
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            *last_generation += 1;
            let generation = *last_generation;
            // The first stream of a new connection is this request's, whatever the limit (100
            // until the peer's SETTINGS say; a peer that allows none queues it in `h2`).
            load.streams.fetch_add(1, Ordering::AcqRel);
            let slot = Arc::new(StreamSlot::new(load.clone()));
            if let Ok(mut g) = self.h2.lock() {
                // A retired pool keeps no new connection: this request's sender holds it, and
                // it closes when that request ends.
                if !self.retired.load(Ordering::Acquire) {
                    g.push(H2Conn {
                        generation,
                        sender: sender.clone(),
                        load,
                    });
                }
            }
            Ok((sender, generation, slot, false))
        })
    }

    /// Sends `req` on a pooled or new connection. An HTTP/1 connection travels with the response
    /// body: take it back with [`UpstreamBody::take_conn`] once the body was read to its end.
    ///
    /// A connection still being opened at `by` (an attempt's own timeout, earlier than the
    /// connect timeout) fails as [`FailKind::ConnectCut`]: a timeout, of a request never sent.
    pub async fn send(
        &self,
        req: Request<ReqBody>,
        by: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if self.http2 {
            return self.send_h2(req, by).await;
        }
        let (parts, body) = req.into_parts();
        match body {
            ReqBody::Full { data, .. } => self.send_h1(&parts, data.as_ref(), by).await,
            streamed => {
                self.send_streamed(Request::from_parts(parts, streamed), by)
                    .await
            }
        }
    }

    /// Sends the request `parts` with the whole body `body` on an HTTP/1 connection, encoding the
    /// head straight from `parts` (which must carry the endpoint's `Host`). For HTTP/1 pools only:
    /// an HTTP/2 upstream's request is built with its own URI form and sent with [`Pool::send`];
    /// here it is refused unsent.
    pub async fn send_head(
        &self,
        parts: &Parts,
        body: Option<&Bytes>,
        by: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if self.http2 {
            return Err(SendError::connect(Some(
                "an HTTP/2 upstream takes a built request (Pool::send)".into(),
            )));
        }
        self.send_h1(parts, body, by).await
    }

    async fn send_h1(
        &self,
        parts: &Parts,
        body: Option<&Bytes>,
        by: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (mut io, mut reused) = match self.pop() {
            Some(io) => (io, true),
            None => (self.connect_h1(by).await?, false),
        };
        loop {
            let mut ex = io.start(parts, body);
            match std::future::poll_fn(|cx| io.poll_exchange(&mut ex, cx)).await {
                Ok(head) => {
                    if head.response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        let mut response = head.response;
                        // `parse_head` made sure there is one.
                        let protocol = response
                            .headers_mut()
                            .remove(http::header::UPGRADE)
                            .unwrap_or_else(|| http::HeaderValue::from_static("websocket"));
                        // A 101: the connection now carries the new protocol, for a tunnel. Only
                        // to the protocol the request offered: a switch to another (say h2c, a
                        // tunnel the client could send any request through) is refused.
                        let offered = parts.headers.get(http::header::UPGRADE);
                        if !offered
                            .is_some_and(|o| o.as_bytes().eq_ignore_ascii_case(protocol.as_bytes()))
                        {
                            return Err(SendError {
                                kind: FailKind::Reset,
                                source: Some(
                                    "a 101 to a protocol the request did not offer".into(),
                                ),
                            });
                        }
                        let (stream, read) = io.into_parts();
                        let side = crate::proxy::tunnel::UpstreamSide {
                            io: Box::new(stream),
                            read,
                            protocol,
                        };
                        let mut resp =
                            response.map(|()| UpstreamBody(Inner::H1(RecvBody::ended())));
                        resp.extensions_mut()
                            .insert(crate::proxy::tunnel::Upgraded::new(side));
                        return Ok(resp);
                    }
                    let keep_alive = head.keep_alive && ex.write_done();
                    let mut body = RecvBody::new(io, head.decoder, keep_alive);
                    body.finish_write(ex);
                    let first = std::future::poll_fn(|cx| Poll::Ready(body.prefetch(cx))).await;
                    if let Err(e) = first {
                        // Broken from its first byte: the exchange failed, as a reset would.
                        return Err(SendError {
                            kind: FailKind::Reset,
                            source: Some(e.into()),
                        });
                    }
                    return Ok(head.response.map(|()| UpstreamBody(Inner::H1(body))));
                }
                // The upstream closed the pooled connection before it took a byte: nothing was
                // sent, so a new connection gets the request (once). So does an idempotent
                // request it closed without a byte of answer: the stale keep-alive race (its
                // idle timeout ran out as the request came), which Go's and hyper's clients and
                // nginx also resend once; not a retry of the route.
                Err(f) if reused && (f.unsent || (f.unanswered && resendable(parts))) => {
                    reused = false;
                    io = self.connect_h1(by).await?;
                }
                Err(f) => {
                    return Err(SendError {
                        kind: FailKind::Reset,
                        source: Some(f.error.into()),
                    })
                }
            }
        }
    }

    /// A request with a streamed body, on hyper's HTTP/1 client (see the module doc).
    async fn send_streamed(
        &self,
        req: Request<ReqBody>,
        by: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut req = req;
        let (mut stream, mut reused) = match self.pop() {
            Some(io) => (io.into_stream(), true),
            None => (connect_by(by, self.connect_stream()).await?, false),
        };
        loop {
            let (mut sender, conn) = http1::Builder::new()
                .writev(false)
                // The response head's limit, as the gateway's own client has it (hyper's
                // default read buffer would let a head grow to ~400 KiB).
                .max_buf_size(super::h1::MAX_HEAD)
                .handshake::<_, ReqBody>(TokioIo::new(EarlyAnswer::new(stream)))
                .await
                .map_err(|e| SendError::connect(Some(e.into())))?;
            // Runs until the exchange ends (the request body may outlast the response), then closes:
            // the sender is dropped below. Or until the client goes away mid-upload: the body is
            // polled only when the upstream takes bytes, so one that stopped reading would hold
            // this connection (and the body, and the client's socket) for ever.
            let state = req.body().stream_state();
            tokio::spawn(async move {
                let abandoned = std::future::poll_fn(|cx| match &state {
                    Some(s) if s.poll_abandoned(cx) => Poll::Ready(()),
                    _ => Poll::Pending,
                });
                tokio::select! {
                    _ = conn => {}
                    _ = abandoned => tracing::debug!("client gone mid-upload: upstream connection closed"),
                }
            });
            match sender.try_send_request(req).await {
                Ok(mut resp) => {
                    // hyper's head, held to the framing rules of the gateway's own client.
                    let status = resp.status();
                    super::h1::vet_framing(status, resp.headers_mut()).map_err(|e| SendError {
                        kind: FailKind::Reset,
                        source: Some(e.into()),
                    })?;
                    let (head, body) = resp.into_parts();
                    let body = Peeked::look(body).await.map_err(|e| SendError {
                        kind: FailKind::Reset,
                        source: Some(e.into()),
                    })?;
                    return Ok(Response::from_parts(head, UpstreamBody(Inner::Hyper(body))));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => {
                        req = back;
                        reused = false;
                        stream = connect_by(by, self.connect_stream()).await?;
                    }
                    _ => {
                        let err = e.into_error();
                        return Err(SendError {
                            kind: classify(&err),
                            source: Some(err.into()),
                        });
                    }
                },
            }
        }
    }

    async fn send_h2(
        &self,
        req: Request<ReqBody>,
        by: Option<Instant>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut req = req;
        // A request in memory can go once more on a new connection if the upstream says it did
        // not process it (RFC 9113 8.7): a refused stream, or one past a GOAWAY's last stream.
        let mut again = in_memory_copy(&req);
        let (mut sender, mut generation, mut slot, mut reused) = self.checkout_h2(None, by).await?;
        loop {
            // The stream is open, and holds its place under the peer's limit, until both its
            // halves end: the response's, and the request's (an upstream may answer an upload
            // early and read on; see `ReqBody::hold` for a body in memory).
            req.body_mut().hold(Box::new(slot.clone()));
            if let Some(state) = req.body().stream_state() {
                let slot = Arc::downgrade(&slot);
                state.on_abandon(Box::new(move || {
                    if let Some(s) = slot.upgrade() {
                        s.abandon();
                    }
                }));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (head, body) = resp.into_parts();
                    let body = Peeked::look(body).await.map_err(|e| SendError {
                        kind: FailKind::Reset,
                        source: Some(e.into()),
                    })?;
                    let body = UpstreamBody(Inner::H2 { body, _slot: slot });
                    return Ok(Response::from_parts(head, body));
                }
                Err(mut e) => match e.take_message() {
                    // The connection was closing: another (or a new) one takes the request.
                    Some(back) if reused => {
                        req = back;
                        (sender, generation, slot, reused) =
                            self.checkout_h2(Some(generation), by).await?;
                    }
                    _ => {
                        let err = e.into_error();
                        let refused = not_processed(&err);
                        if let Some(copy) = again.take().filter(|_| refused) {
                            req = copy;
                            (sender, generation, slot, reused) =
                                self.checkout_h2(Some(generation), by).await?;
                            continue;
                        }
                        return Err(SendError {
                            kind: if refused {
                                FailKind::Refused
                            } else {
                                classify(&err)
                            },
                            source: Some(err.into()),
                        });
                    }
                },
            }
        }
    }
}

/// The upstream side of a streamed exchange. An upstream may answer an upload before reading all
/// of it (an early 413 or 401) and close, and the gateway's next write then fails (a broken pipe,
/// or a reset). hyper's client would fail the whole exchange on that write, though the answer is
/// there to read. So a write that fails that way waits until the connection is readable: when
/// answer bytes come (TCP delivers them before the close), that write and every later one are
/// taken as done (the rest of the body goes nowhere; the connection is not pooled after a
/// streamed exchange anyway) and hyper reads the answer. A write that fails with nothing to read
/// (a stale pooled connection) fails as before.
struct EarlyAnswer<S> {
    /// The connection, with answer bytes read while a write waited put back in front for hyper.
    io: Rewind<S>,
    /// A write that failed, waiting to learn whether an answer came.
    failed: Option<std::io::Error>,
    /// Bytes were read (by hyper) since a write failed.
    answered: bool,
    /// A write has failed with the answer there: writes go nowhere from now on.
    void: bool,
}

impl<S> EarlyAnswer<S> {
    fn new(io: S) -> Self {
        EarlyAnswer {
            io: Rewind {
                read: Bytes::new(),
                io,
            },
            failed: None,
            answered: false,
            void: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> EarlyAnswer<S> {
    /// After a failed write: ready when the answer came (writes go nowhere now) or when none will
    /// (the write's error).
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.answered {
            let mut answer = vec![0; 16 * 1024];
            let mut rb = ReadBuf::new(&mut answer);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    let n = rb.filled().len();
                    answer.truncate(n);
                    self.io.read = Bytes::from(answer);
                }
                Poll::Ready(_) => {
                    let e = self.failed.take();
                    return Poll::Ready(Err(
                        e.unwrap_or_else(|| std::io::ErrorKind::ConnectionReset.into())
                    ));
                }
            }
        }
        self.failed = None;
        self.void = true;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for EarlyAnswer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.failed.is_some() && buf.filled().len() > before {
            this.answered = true;
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for EarlyAnswer<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.failed.is_none() && !this.void {
            match Pin::new(&mut this.io).poll_write(cx, buf) {
                Poll::Ready(Err(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    this.failed = Some(e);
                }
                other => return other,
            }
        }
        if !this.void {
            std::task::ready!(this.poll_answer(cx))?;
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.void || this.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.void || this.failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A copy of `req` when its body is in memory (cheap to send again), else `None`.
fn in_memory_copy(req: &Request<ReqBody>) -> Option<Request<ReqBody>> {
    let ReqBody::Full { data, .. } = req.body() else {
        return None;
    };
    let mut copy = Request::new(ReqBody::full(data.clone()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether an HTTP/2 send error says the upstream did not process the request (RFC 9113 8.7): its
/// stream was refused (`REFUSED_STREAM`), or it was above the last stream id of a `GOAWAY` the
/// upstream sent, whatever that GOAWAY's error code (RFC 9113 6.8: such streams were not
/// processed; an upstream going away with `INTERNAL_ERROR` or `ENHANCE_YOUR_CALM` is when this
/// matters most). h2 gives the GOAWAY's error to exactly those streams; a stream at or below the
/// last id that the connection's end then cuts gets an I/O error, and is not resent.
fn not_processed(err: &hyper::Error) -> bool {
    let first: &(dyn std::error::Error + 'static) = err;
    std::iter::successors(Some(first), |e| e.source())
        .find_map(|e| e.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            h2.is_remote() && (h2.reason() == Some(h2::Reason::REFUSED_STREAM) || h2.is_go_away())
        })
}

/// The read side of an HTTP/2 connection to an upstream, watched for the peer's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` (hyper's client does not tell it): the pool opens another
/// connection when every one it has is at its peer's limit, as Envoy and Go's transport do,
/// rather than queue requests behind long-lived streams.
struct PeerSettings<I> {
    io: I,
    frames: Frames,
    limit: StreamLimit,
    load: Arc<H2Load>,
}

impl<I> PeerSettings<I> {
    fn new(io: I, load: Arc<H2Load>) -> Self {
        PeerSettings {
            io,
            frames: Frames::default(),
            limit: StreamLimit::default(),
            load,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PeerSettings<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.load.killed(cx) {
            return Poll::Ready(Err(killed()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.frames.feed(&buf.filled()[before..], &mut this.limit);
        if let Some(max) = this.limit.found.take() {
            this.load.peer_max.store(max, Ordering::Relaxed);
        }
        r
    }
}

fn killed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "closed: its streams' clients left mid-upload",
    )
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PeerSettings<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.load.killed(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.load.killed(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.load.killed(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Reads the `SETTINGS_MAX_CONCURRENT_STREAMS` of a peer's SETTINGS frames; every other frame's
/// payload is skipped by length.
#[derive(Debug, Default)]
struct StreamLimit {
    /// The limit a setting set since the last look (unlimited when the peer's first SETTINGS
    /// frame names none, RFC 9113 6.5.2).
    found: Option<usize>,
    /// In a SETTINGS frame's payload: the setting (6 bytes) being read, and how much has come.
    settings: bool,
    entry: [u8; 6],
    entry_len: usize,
    /// The current SETTINGS frame named `SETTINGS_MAX_CONCURRENT_STREAMS`.
    named: bool,
    /// A SETTINGS frame (not an ACK) has ended before.
    seen: bool,
}

impl StreamLimit {
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
}

impl FrameSink for StreamLimit {
    fn head(&mut self, head: FrameHead) -> bool {
        self.settings = head.kind == FrameHead::SETTINGS && head.flags & FrameHead::ACK == 0;
        self.entry_len = 0;
        self.named = false;
        self.settings
    }

    fn payload(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.entry[self.entry_len] = b;
            self.entry_len += 1;
            if self.entry_len == 6 {
                self.entry_len = 0;
                let e = self.entry;
                if u16::from_be_bytes([e[0], e[1]]) == Self::MAX_CONCURRENT_STREAMS {
                    self.named = true;
                    let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
                    self.found = Some(usize::try_from(v).unwrap_or(usize::MAX));
                }
            }
        }
    }

    fn end(&mut self) {
        if self.settings {
            if !self.seen && !self.named {
                self.found = Some(usize::MAX);
            }
            self.seen = true;
            self.settings = false;
        }
    }
}

/// Classifies a hyper send error: our client's body failing is not the upstream's fault.
fn classify(err: &hyper::Error) -> FailKind {
    if crate::proxy::body::is_client_body_error(err) {
        FailKind::ClientBody
    } else {
        FailKind::Reset
    }
}

/// Whether a request may go again on a fresh connection after a reused one closed without an
/// answer: idempotent (RFC 9110 9.2.2), or carrying an `Idempotency-Key`.
fn resendable(parts: &Parts) -> bool {
    crate::proxy::attempt::is_idempotent(&parts.method)
        || parts
            .headers
            .contains_key(&crate::proxy::headers::IDEMPOTENCY_KEY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SETTINGS frame, with `entries` (id, value).
    fn settings(ack: bool, entries: &[(u16, u32)]) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            4,
            u8::from(ack),
            0,
            0,
            0,
            0,
        ];
        for (id, v) in entries {
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f
    }

    /// A frame of another type with `len` payload bytes (all 0x03, 0x04: they look like settings).
    fn other(kind: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend((0..len).map(|i| if i % 2 == 0 { 3 } else { 4 }));
        f
    }

    /// A walk that reads the peer's stream limit.
    #[derive(Default)]
    struct Scan(Frames, StreamLimit);

    impl Scan {
        /// Feeds `bytes`; the limit they set, if any.
        fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
            self.0.feed(bytes, &mut self.1);
            self.1.found.take()
        }
    }

    /// Feeds `bytes` to a new scan cut at every `step` bytes; the last limit set.
    fn scan(bytes: &[u8], step: usize) -> Option<usize> {
        let mut s = Scan::default();
        bytes.chunks(step).fold(None, |last, c| s.feed(c).or(last))
    }

    #[test]
    fn the_peers_stream_limit_is_read_from_its_settings_frames() {
        let mut conn = settings(false, &[(1, 4096), (3, 1), (4, 65535)]);
        conn.extend(other(0, 300)); // DATA
        conn.extend(settings(true, &[]));
        for step in [1, 2, 5, 9, 1000] {
            assert_eq!(scan(&conn, step), Some(1), "step {step}");
        }
        // A later SETTINGS frame changes it; DATA between, whatever its bytes, does not.
        conn.extend(other(0, 70_000));
        conn.extend(settings(false, &[(3, 250)]));
        conn.extend(other(1, 12)); // HEADERS
        for step in [1, 7, 4096] {
            assert_eq!(scan(&conn, step), Some(250), "step {step}");
        }
        // A first SETTINGS frame that names no limit: unlimited; a later one without it: as it was.
        let mut s = Scan::default();
        assert_eq!(s.feed(&settings(false, &[(4, 1 << 20)])), Some(usize::MAX));
        assert_eq!(s.feed(&settings(false, &[(4, 1 << 20)])), None);
        assert_eq!(s.feed(&settings(false, &[])), None);
        // An ACK carries no settings.
        let mut s = Scan::default();
        assert_eq!(s.feed(&settings(true, &[])), None);
        assert_eq!(s.feed(&other(6, 8)), None); // PING
        assert_eq!(s.feed(&settings(false, &[(3, 7)])), Some(7));
    }

    /// A connection to a fresh listener on 127.0.0.1, and the server's end.
    async fn pair() -> (Conn, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let io = Box::new(Io::new(Stream::Tcp(c)));
        (Conn { io }, s)
    }

    #[tokio::test]
    async fn a_full_pool_drops_a_closed_connection_before_the_one_returned() {
        let pool = Pool::new(
            "127.0.0.1:1".into(),
            false,
            1,
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let (closed, server) = pair().await;
        pool.put(closed);
        drop(server);
        // The upstream's FIN is seen once the reactor has polled it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !pool.idle.lock().unwrap()[0].io.is_stale() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::task::yield_now().await;
        }
        let (live, _server) = pair().await;
        pool.put(live);
        assert_eq!(pool.idle_count(), 1);
        assert!(
            pool.pop().is_some(),
            "the live connection was dropped, the closed one kept"
        );
        // Full of a live connection: the oldest makes room for the newest.
        let (a, _sa) = pair().await;
        let (b, _sb) = pair().await;
        let b_at: *const Io = &*b.io;
        pool.put(a);
        pool.put(b);
        assert_eq!(pool.idle_count(), 1);
        assert!(std::ptr::eq(&*pool.pop().unwrap(), b_at));
    }

    #[test]
    fn an_h1_error_converts_to_a_boxed_source() {
        let e: BoxError = super::super::h1::Error::Closed.into();
        assert!(e.to_string().contains("closed"));
    }
}
