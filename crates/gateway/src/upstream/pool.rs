//! Per-endpoint keep-alive connection pool on hyper's `client::conn`.
//!
//! Owning the pool (rather than hyper-util's legacy client) gives exact error classes: a connect failure
//! happened before any byte of the request left, a reset happened after; and a request that hyper hands
//! back unsent (the pooled connection was already closing) is re-sent on a fresh connection, which is
//! safe for every method.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
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

enum Sender {
    H1(http1::SendRequest<Tracked>, Arc<AtomicBool>),
    H2(http2::SendRequest<ReqBody>),
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
    fn pop(&self) -> Option<(http1::SendRequest<Tracked>, Arc<AtomicBool>)> {
        let mut idle = self.idle.lock().ok()?;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.conn.is_closed() || c.since.elapsed() > self.idle_timeout {
                // The element moved into `i` was already looked at.
                idle.swap_remove(i);
            } else if c.conn.is_ready() {
                let c = idle.swap_remove(i);
                return Some((c.conn, c.done));
            }
        }
        None
    }

    /// Returns a connection whose response body was read to the end. An HTTP/1 connection is pooled
    /// only if its request body ended too; otherwise it is dropped (closed once that exchange ends).
    pub fn put(&self, conn: Conn) {
        if let Sender::H1(s, done) = conn.sender {
            if s.is_closed() || !done.load(Ordering::Acquire) {
                return;
            }
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < self.max_idle {
                    idle.push(Idle {
                        conn: s,
                        done,
                        since: Instant::now(),
                    });
                }
            }
        }
    }

    /// Drops idle connections past their idle timeout (called periodically).
    pub fn reap(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            let t = self.idle_timeout;
            idle.retain(|c| !c.conn.is_closed() && c.since.elapsed() <= t);
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
        if let Some((s, done)) = self.pop() {
            return Ok(Conn {
                sender: Sender::H1(s, done),
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
            .handshake(io)
            .await
            .map_err(|e| SendError {
                kind: FailKind::ConnectFailure,
                source: Some(e),
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender: Sender::H1(sender, Arc::new(AtomicBool::new(false))),
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
                Sender::H1(s, done) => {
                    done.store(false, Ordering::Release);
                    let done = done.clone();
                    s.try_send_request(req.map(|inner| Tracked { inner, done }))
                        .await
                        .map_err(|mut e| {
                            (e.take_message().map(|r| r.map(|b| b.inner)), e.into_error())
                        })
                }
                Sender::H2(s) => s
                    .try_send_request(req)
                    .await
                    .map_err(|mut e| (e.take_message(), e.into_error())),
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
