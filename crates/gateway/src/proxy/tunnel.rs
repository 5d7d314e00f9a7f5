//! WebSocket tunnels (HTTP/1.1 `Upgrade`, on routes with `websocket: true`).
//!
//! The client's upgrade request goes through the route like any request (breaker, rate limit,
//! bulkhead, retries and failover until an upstream answers), with its `Connection: upgrade` and
//! `Upgrade` kept. An HTTP/1.1 upstream that answers `101 Switching Protocols` hands its connection
//! over in the response ([`Upgraded`]); the client's connection loop writes the 101 and then
//! [`run`] copies bytes both ways until both directions have ended, or nothing moved either way
//! for `idle_timeout`. Any other answer is an ordinary response.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::Rewind;

/// The client asked to switch protocols (an HTTP/1.1 `GET` with `Connection: upgrade`): its
/// `Upgrade` value. Put in the request's extensions by the HTTP/1.1 server; the proxy keeps it (and
/// the two headers) only on routes with `websocket: true`.
#[derive(Debug, Clone)]
pub(crate) struct UpgradeOffer(pub(crate) HeaderValue);

impl UpgradeOffer {
    /// Whether the offer names the `websocket` protocol (the only one tunnelled).
    pub(crate) fn is_websocket(&self) -> bool {
        self.0
            .as_bytes()
            .split(|&b| b == b',')
            .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"websocket"))
    }
}

/// The upstream side of an accepted upgrade: its connection and what was read past the 101.
pub(crate) struct UpstreamSide {
    pub(crate) io: Box<dyn Io>,
    pub(crate) read: Bytes,
    /// The upstream's `Upgrade` value, for the client's 101.
    pub(crate) protocol: HeaderValue,
}

/// A byte stream both ways.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An upstream's accepted upgrade, carried to the client's connection loop in the 101 response's
/// extensions (which must be `Clone`); taken once.
#[derive(Clone)]
pub(crate) struct Upgraded(Arc<Mutex<Option<UpstreamSide>>>);

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upgraded")
    }
}

impl Upgraded {
    pub(crate) fn new(side: UpstreamSide) -> Self {
        Upgraded(Arc::new(Mutex::new(Some(side))))
    }

    pub(crate) fn take(&self) -> Option<UpstreamSide> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Copies bytes between the client (`client`, with `client_read` already read from it) and the
/// upstream until both directions have ended (each end's close is passed on as a write shutdown),
/// either side fails, or nothing moved for `idle`.
pub(crate) async fn run<C>(client: C, client_read: Bytes, up: UpstreamSide, idle: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` when bytes last moved.
    let last = AtomicU64::new(0);
    let mut a = Watched {
        io: Rewind {
            read: client_read,
            io: client,
        },
        last: &last,
        start,
    };
    let mut b = Watched {
        io: Rewind {
            read: up.read,
            io: up.io,
        },
        last: &last,
        start,
    };
    let quiet_until = || start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
    let idle_watch = async {
        loop {
            tokio::time::sleep_until(quiet_until()).await;
            if Instant::now() >= quiet_until() {
                return;
            }
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => match r {
            Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
            Err(e) => tracing::debug!(error = %e, "tunnel failed"),
        },
        () = idle_watch => tracing::debug!("tunnel idle for idle_timeout"),
    }
}

/// A stream that stamps `last` whenever bytes are read from it.
struct Watched<'a, S> {
    io: S,
    last: &'a AtomicU64,
    start: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An HTTP/2 WebSocket stream (RFC 8441) as the tunnel reads it. hyper reads the client's
/// `RST_STREAM` (`CANCEL`: its TCP reset, in RFC 8441's terms) as the end of its input, just as it
/// reads `END_STREAM` (its FIN); after a reset the stream's sending half has failed, which a
/// flush reports. So at the end of input the flush is checked, once the stream's send task has
/// had a turn to see the reset: a reset ends the tunnel (both sides closed), where `END_STREAM`
/// only half-closes the upstream.
pub(crate) struct ResetAware<S> {
    io: S,
    /// The end of input was seen once (and the task yielded).
    ended: bool,
}

impl<S> ResetAware<S> {
    pub(crate) fn new(io: S) -> Self {
        ResetAware { io, ended: false }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ResetAware<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        if buf.filled().len() > before || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !self.ended {
            // The reset wakes the stream's send task too: let it run first.
            self.ended = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ResetAware<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
