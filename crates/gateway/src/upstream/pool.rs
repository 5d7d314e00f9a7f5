//! Per-endpoint keep-alive connection pool on hyper's `client::conn`.
//!
//! Owning the pool (rather than hyper-util's legacy client) gives exact error classes: a connect failure
//! happened before any byte of the request left, a reset happened after; and a request that hyper hands
//! back unsent (the pooled connection was already closing) is re-sent on a fresh connection, which is
//! safe for every method.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::body::ReqBody;

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
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
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
    conn: http1::SendRequest<ReqBody>,
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

    fn pop(&self) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(c) = idle.pop() {
            if c.conn.is_closed() || c.since.elapsed() > self.idle_timeout {
                continue;
            }
            return Some(c.conn);
        }
        None
    }

    /// Returns a connection whose exchange completed.
    pub fn put(&self, conn: Conn) {
        if let Sender::H1(s) = conn.sender {
            if s.is_closed() {
                return;
            }
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < self.max_idle {
                    idle.push(Idle {
                        conn: s,
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
        while let Some(mut s) = self.pop() {
            // A connection goes back to the pool when its response body ended; hyper's connection task
            // may not have marked it ready yet, which takes at most one turn of that task.
            if s.is_ready() || s.ready().await.is_ok() {
                return Ok(Conn {
                    sender: Sender::H1(s),
                    reused: true,
                });
            }
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
            sender: Sender::H1(sender),
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
                Sender::H1(s) => s.try_send_request(req).await,
                Sender::H2(s) => s.try_send_request(req).await,
            };
            match result {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    Some(back) if conn.reused => {
                        req = back;
                        conn = self.connect_h1_or_h2().await?;
                    }
                    _ => {
                        let err = e.into_error();
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
