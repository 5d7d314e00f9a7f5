//! Per-endpoint keep-alive connection pool on hyper's `client::conn`.
//!
//! Owning the pool (rather than hyper-util's legacy client) gives exact error classes: a connect failure
//! happened before any byte of the request left, a reset happened after; and a request that hyper hands
//! back unsent (the pooled connection was already closing) is re-sent on a fresh connection, which is
//! safe for every method.
//!
//! An HTTP/1 connection opened by a proxied request is driven inline: its hyper `Connection` future
//! is polled by the request's own future while the head is exchanged, then by the response body
//! ([`Conn::poll_drive`]), instead of by a task of its own. That saves the cross-task wake-ups of
//! hyper's request channel, response oneshot and body channel (three per request, each a trip
//! through the scheduler). An idle pooled connection is polled (with a no-op waker) by
//! [`Pool::reap`], and at checkout if hyper has not marked it ready yet; a close by the upstream
//! that nobody noticed yet is seen when the request is sent, and hyper then hands the request back
//! unsent, so it is re-sent on a new connection (the stale-connection path).
//! Outside [`drive_inline`] (health checks, HTTP/2 server streams that hyper runs as tasks of
//! their own) a connection is given its own task, as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::body::{BoxError, ReqBody};

/// How an exchange with an endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// TCP connect or handshake failed: the request was never sent.
    ConnectFailure,
    /// The connection broke after the request was (possibly) sent.
    Reset,
    /// The attempt took longer than its timeout.
    Timeout,
    /// The client's request body failed (too large, or the client went away): not the upstream's fault.
    ClientBody,
}

/// An exchange failure with its cause.
#[derive(Debug)]
pub struct SendError {
    /// Class.
    pub kind: FailKind,
    /// Cause, for logs.
    pub source: Option<hyper::Error>,
}

/// An HTTP/1 connection future polled by whoever holds it (boxed once per connection).
type H1Conn = Pin<Box<http1::Connection<TcpIoStream, Tracked>>>;

tokio::task_local! {
    static INLINE: ();
}

fn inline() -> bool {
    INLINE.try_with(|_| ()).is_ok()
}

/// Polls `conn` once; drops it once it has ended (closed, or failed: hyper has then answered every
/// request it held, with the request handed back if it was not sent).
fn drive(conn: &mut Option<H1Conn>, cx: &mut Context<'_>) {
    if let Some(c) = conn {
        if c.as_mut().poll(cx).is_ready() {
            *conn = None;
        }
    }
}

/// Lets an idle connection's future run without a task to wake: it moves to idle after the last
/// exchange (so `is_ready` holds) and reads a close by the upstream, if one arrived.
fn drive_idle(conn: &mut Option<H1Conn>) {
    drive(conn, &mut Context::from_waker(Waker::noop()));
}

/// Gives a connection future a task of its own (for a holder that will not poll it).
fn detach(conn: &mut Option<H1Conn>) {
    if let Some(c) = conn.take() {
        // No runtime (being dropped at exit): dropping closes the connection.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = c.await;
            });
        }
    }
}

enum Sender {
    H1 {
        send: http1::SendRequest<Tracked>,
        done: Arc<AtomicBool>,
        /// `Some`: driven inline by the holder; `None`: runs in its own task (or has ended).
        conn: Option<H1Conn>,
    },
    H2(http2::SendRequest<ReqBody>),
    /// Moved into the idle list.
    Gone,
}

pin_project_lite::pin_project! {
    /// A request body sent on an HTTP/1 connection: sets `done` once hyper has taken its last frame.
    /// HTTP/1 is full duplex: an upstream may answer before the request body ends, and the connection
    /// can carry the next exchange only once both have ended, so [`Pool::put`] checks `done` too.
    struct Tracked {
        #[pin]
        inner: ReqBody,
        // One per connection (allocated when it opens, not per request): an HTTP/1 connection carries
        // one exchange at a time, and it is reset when the next one starts.
        done: Arc<AtomicBool>,
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.done.store(true, Ordering::Release);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        // hyper asks this before the first frame and after each one, and stops polling once it holds.
        let end = self.inner.is_end_stream();
        if end {
            self.done.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A checked-out connection. Return it with [`Pool::put`] once its response body has been read to the end.
pub struct Conn {
    sender: Sender,
    reused: bool,
}

impl Conn {
    /// Drives an inline HTTP/1 connection (reads the response body into hyper's body channel,
    /// finishes writing the request body). Call before polling the response body; a no-op for a
    /// connection that has a task of its own.
    pub fn poll_drive(&mut self, cx: &mut Context<'_>) {
        if let Sender::H1 { conn, .. } = &mut self.sender {
            drive(conn, cx);
        }
    }

    /// Whether the connection is driven by its holder (then everything that completes the response
    /// happens inside [`Conn::poll_drive`]).
    pub fn is_inline(&self) -> bool {
        matches!(&self.sender, Sender::H1 { conn: Some(_), .. })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A connection nobody will poll any more still finishes its exchange, as when every
        // connection had its own task: hyper closes it then, since its sender is gone.
        if let Sender::H1 { conn, .. } = &mut self.sender {
            detach(conn);
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("reused", &self.reused)
            .finish()
    }
}

struct Idle {
    conn: http1::SendRequest<Tracked>,
    done: Arc<AtomicBool>,
    drive: Option<H1Conn>,
    since: Instant,
}

/// Idle connections of one endpoint.
pub struct Pool {
    addr: String,
    http2: bool,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    // An uncontended std mutex around a Vec: one push/pop per request, never held across an await.
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

impl Pool {
    /// Runs `fut` (one client connection's task) so that the upstream HTTP/1 connections its
    /// requests use are driven inline by the requests' futures and response bodies, not by tasks of
    /// their own. Whatever `fut` spawns runs outside it (its connections get their own tasks).
    pub async fn drive_inline<F: Future>(fut: F) -> F::Output {
        INLINE.scope((), fut).await
    }

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
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    /// Number of idle HTTP/1 connections (for tests and the admin API).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// The most recently returned idle connection that is ready now. Readiness is never awaited: a
    /// connection hyper has not marked ready yet (its connection task has not run since the exchange
    /// ended, or it is still writing the last request body) is left in the pool for a later checkout.
    fn pop(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &mut idle[i];
            if !c.conn.is_ready() {
                drive_idle(&mut c.drive);
            }
            if c.conn.is_closed() || c.since.elapsed() > self.idle_timeout {
                // The element moved into `i` was already looked at.
                idle.swap_remove(i);
            } else if c.conn.is_ready() {
                let c = idle.swap_remove(i);
                return Some(Sender::H1 {
                    send: c.conn,
                    done: c.done,
                    conn: c.drive,
                });
            }
        }
        None
    }

    /// Returns a connection whose response body was read to the end. An HTTP/1 connection is pooled
    /// only if its request body ended too; otherwise it is dropped (closed once that exchange ends).
    pub fn put(&self, mut conn: Conn) {
        // An inline connection is not polled here: hyper has usually marked it ready already, and
        // a checkout polls it if not.
        if let Sender::H1 { send, done, .. } = &conn.sender {
            if send.is_closed() || !done.load(Ordering::Acquire) {
                // Dropping `conn` gives an inline connection a task of its own to finish the
                // exchange (its request body may still be streaming), then close.
                return;
            }
        } else {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() >= self.max_idle {
            return;
        }
        if let Sender::H1 { send, done, conn } = std::mem::replace(&mut conn.sender, Sender::Gone) {
            idle.push(Idle {
                conn: send,
                done,
                drive: conn,
                since: Instant::now(),
            });
        }
    }

    /// Drops idle connections past their idle timeout (called periodically).
    pub fn reap(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            let t = self.idle_timeout;
            idle.retain_mut(|c| {
                drive_idle(&mut c.drive);
                !c.conn.is_closed() && c.since.elapsed() <= t
            });
        }
    }

    async fn connect_tcp(&self) -> Result<TcpIoStream, SendError> {
        let fail = || SendError {
            kind: FailKind::ConnectFailure,
            source: None,
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| fail())?
            .map_err(|_| fail())?;
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    async fn checkout(&self) -> Result<Conn, SendError> {
        if self.http2 {
            let existing = self.h2.lock().ok().and_then(|g| g.clone());
            if let Some(s) = existing.filter(|s| !s.is_closed()) {
                return Ok(Conn {
                    sender: Sender::H2(s),
                    reused: true,
                });
            }
            return self.connect_new().await;
        }
        if let Some(mut sender) = self.pop() {
            if let Sender::H1 { conn, .. } = &mut sender {
                if !inline() {
                    detach(conn);
                }
            }
            return Ok(Conn {
                sender,
                reused: true,
            });
        }
        self.connect_new().await
    }

    /// Opens a new connection (HTTP/2: and makes it the shared one).
    ///
    /// Boxed on purpose: a TCP connect plus a hyper handshake is a future of a few kilobytes, and
    /// inline it would be part of every request's future (moved with it, and touched in cache), while
    /// it runs only when the pool has no idle connection, next to a TCP handshake that costs far
    /// more than one allocation.
    fn connect_new(&self) -> Pin<Box<dyn Future<Output = Result<Conn, SendError>> + Send + '_>> {
        Box::pin(async move {
            if self.http2 {
                self.connect_h2().await
            } else {
                self.connect_h1().await
            }
        })
    }

    async fn connect_h2(&self) -> Result<Conn, SendError> {
        let io = self.connect_tcp().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| SendError {
                kind: FailKind::ConnectFailure,
                source: Some(e),
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        if let Ok(mut g) = self.h2.lock() {
            *g = Some(sender.clone());
        }
        Ok(Conn {
            sender: Sender::H2(sender),
            reused: false,
        })
    }

    async fn connect_h1(&self) -> Result<Conn, SendError> {
        let io = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            // One buffer, one `write`, instead of hyper's queue of buffers and `writev`: most
            // requests are a head alone, and a body is copied into a buffer hyper bounds
            // (callgrind: -1.1% user-space instructions per proxied GET).
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| SendError {
                kind: FailKind::ConnectFailure,
                source: Some(e),
            })?;
        let mut conn = Some(Box::pin(conn));
        if !inline() {
            detach(&mut conn);
        }
        Ok(Conn {
            sender: Sender::H1 {
                send: sender,
                done: Arc::new(AtomicBool::new(false)),
                conn,
            },
            reused: false,
        })
    }

    /// Sends `req` on a pooled or new connection. On success the connection travels with the response
    /// (put it back when the body is done).
    pub async fn send(
        &self,
        req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let mut conn = self.checkout().await?;
        let mut req = req;
        // A reused connection may have been closed by the server while idle; hyper then returns the
        // request unsent and we try once more on a new connection.
        for _ in 0..2 {
            let result = match &mut conn.sender {
                Sender::H1 {
                    send: s,
                    done,
                    conn: drive_slot,
                } => {
                    done.store(false, Ordering::Release);
                    let done = done.clone();
                    let fut = s.try_send_request(req.map(|inner| Tracked { inner, done }));
                    let r = if drive_slot.is_some() {
                        let mut fut = std::pin::pin!(fut);
                        std::future::poll_fn(|cx| {
                            // The request is already queued (hyper's send is eager): the connection
                            // writes it, and answers it from inside this poll.
                            drive(drive_slot, cx);
                            if drive_slot.is_some() {
                                // Only the connection polled just above can complete `fut`, and
                                // it wakes this task on I/O: no need for the oneshot to wake it too.
                                fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
                            } else {
                                fut.as_mut().poll(cx)
                            }
                        })
                        .await
                    } else {
                        fut.await
                    };
                    r.map_err(|mut e| {
                        (e.take_message().map(|r| r.map(|b| b.inner)), e.into_error())
                    })
                }
                Sender::H2(s) => s
                    .try_send_request(req)
                    .await
                    .map_err(|mut e| (e.take_message(), e.into_error())),
                Sender::Gone => break,
            };
            match result {
                Ok(resp) => return Ok((resp, conn)),
                Err((back, err)) => match back {
                    Some(back) if conn.reused => {
                        req = back;
                        conn = self.connect_h1_or_h2().await?;
                    }
                    _ => {
                        return Err(SendError {
                            kind: classify(&err),
                            source: Some(err),
                        });
                    }
                },
            }
        }
        Err(SendError {
            kind: FailKind::Reset,
            source: None,
        })
    }

    async fn connect_h1_or_h2(&self) -> Result<Conn, SendError> {
        if self.http2 {
            if let Ok(mut g) = self.h2.lock() {
                *g = None;
            }
            self.checkout().await
        } else {
            self.connect_new().await
        }
    }
}

type TcpIoStream = TokioIo<TcpStream>;

/// Classifies a send error: our client's body failing is not the upstream's fault.
fn classify(err: &hyper::Error) -> FailKind {
    if crate::proxy::body::is_client_body_error(err) {
        FailKind::ClientBody
    } else {
        FailKind::Reset
    }
}
