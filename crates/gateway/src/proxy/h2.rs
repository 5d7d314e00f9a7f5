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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::body::{BoxError, RespBody};
use super::Streaming;

tokio::task_local! {
    static PROGRESS: Arc<Progress>;
}

/// A stream's response body as its watcher sees it: 0 while no body is streaming (before the
/// response head, and after the body's end), else 1 + the frames it has yielded.
#[derive(Debug, Default)]
pub(crate) struct Progress(AtomicU64);

impl Progress {
    fn started(&self) {
        self.0.store(1, Ordering::Relaxed);
    }
    fn moved(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn ended(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

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
        tokio::spawn(Watched {
            fut,
            progress: Arc::default(),
            idle: self.idle,
            timer: None,
            seen: 0,
            moved_at: None,
        });
    }
}

pin_project! {
    /// A stream's task, dropped when its response body has been still for `idle`.
    struct Watched<F> {
        #[pin]
        fut: F,
        progress: Arc<Progress>,
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
        if now != *this.seen || this.moved_at.is_none() {
            *this.seen = now;
            *this.moved_at = Some(Instant::now());
        }
        let due = this.moved_at.unwrap_or_else(Instant::now) + *this.idle;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= due {
                tracing::debug!("HTTP/2 response body still for idle_timeout: stream reset");
                return Poll::Ready(());
            }
            timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}

/// The progress of the stream whose task is running, if it is a watched one.
pub(crate) fn current() -> Option<Arc<Progress>> {
    PROGRESS.try_with(Arc::clone).ok()
}

/// A response body sent on an HTTP/2 stream, reporting each frame to the stream's watcher.
pub(crate) struct WatchedBody {
    inner: RespBody,
    progress: Option<Arc<Progress>>,
    // The connection is not idle while this body streams.
    _streaming: Option<Streaming>,
}

impl WatchedBody {
    /// `inner`, reporting to `progress` (the stream's, from [`current`]) and keeping `streaming`
    /// until dropped.
    pub(crate) fn new(
        inner: RespBody,
        progress: Option<Arc<Progress>>,
        streaming: Option<Streaming>,
    ) -> Self {
        if let Some(p) = &progress {
            if !inner.is_end_stream() {
                p.started();
            }
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
        if let (Poll::Ready(item), Some(p)) = (&r, this.progress.as_deref()) {
            match item {
                Some(Ok(_)) => p.moved(),
                _ => p.ended(),
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
