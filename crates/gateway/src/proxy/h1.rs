//! Our own HTTP/1.1 server side of client connections (plain TCP, and TLS without ALPN `h2`).
//!
//! Why not hyper's server: its generic connection state machine (a full dispatcher, buffer
//! strategies, its timers, a body channel between the connection and the handler) cost about 9-10k
//! instructions per proxied request, a third of everything the gateway spends. A proxy needs much
//! less: read a head, hand an `http::Request` to [`super::handle`], write the response, repeat.
//! HTTP/2 stays on hyper: a connection whose first bytes are the HTTP/2 preface is handed back to the
//! caller (with the bytes already read) to be served by hyper's HTTP/2 server.
//!
//! A connection runs in one task ([`serve`]), one exchange at a time:
//! 1. read until a request head is complete (`httparse`; at most [`MAX_HEADERS`] lines), under the
//!    idle timer while nothing has arrived and under `header_read_timeout` from the first byte of a
//!    head on (slow-loris); a malformed head gets 400, an oversized one 431, and the connection closes;
//! 2. build the `http::Request`, whose body ([`RequestBody`]) reads from the connection when it is
//!    polled (sending `100 Continue` first when the client asked for it), and run the handler in this
//!    task (no task per request); a client that goes away meanwhile drops the exchange;
//! 3. write the response: the head and a first body frame that is already there in one write, then
//!    each frame as it comes, flushed (server-sent events stream); `content-length` when the size is
//!    known, else chunked (close-delimited for HTTP/1.0);
//! 4. settle the request body (wait for whoever still reads it, drain a small unread rest, or close),
//!    then read the next head (pipelined bytes already read are kept) or close.
//!
//! The connection's I/O and read buffer sit behind one `std` mutex (one per connection), since the
//! request body can be polled from another task (an upstream connection that goes on sending it after
//! the response came back). The lock is never held across an await, nor while the handler or the
//! response body is polled (both may poll the request body).

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::body::{ClientBody, RespBody};
use super::respond::{self, Local};
use super::ConnCtx;
use crate::chunked;

/// The HTTP/2 connection preface (RFC 9113 3.4): a connection that starts with it is HTTP/2.
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most header lines the parser takes in a request head (the largest `limits.max_headers`; the
/// configured limit is checked on the parsed request, for HTTP/1.1 and HTTP/2 alike); more gets
/// 431.
pub(crate) const MAX_HEADERS: usize = crate::config::MAX_MAX_HEADERS;

/// Read buffer size: a whole typical head (or several pipelined ones) in one read.
const READ_CHUNK: usize = 8 * 1024;

/// How long a connection waits for its next request before it gives its read buffer back.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// Largest read of request body bytes at a time.
const BODY_READ_MAX: usize = 64 * 1024;

/// An unread rest of a request body up to this many bytes is read and discarded after the response,
/// so the connection can carry the next request; a longer one closes the connection (reading it
/// would cost more than a new connection).
const DRAIN_MAX: u64 = 64 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The listener settings this loop enforces.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// From the first byte of a head to its end (`header_read_timeout`).
    pub(super) head_timeout: Duration,
    /// Between requests (`idle_timeout`).
    pub(super) idle_timeout: Duration,
    /// The longest quiet wait of a lingering close (`lingering_timeout`; zero: none).
    pub(super) linger: Duration,
    /// Bytes of a head beyond which it is refused with 431 without parsing on. The exact
    /// `max_header_bytes` check on a complete head is `route_and_forward`'s (it covers HTTP/2 too).
    pub(super) max_head: usize,
}

// ---------------------------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------------------------

/// How a request's body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes (more than zero).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    /// Method, target, version and headers.
    pub(crate) req: Request<()>,
    /// How the body is delimited.
    pub(crate) framing: Framing,
    /// Whether the client lets the connection carry another request (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1).
    pub(crate) expect_continue: bool,
}

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Over the size limit or [`MAX_HEADERS`] lines: 431.
    TooLarge,
    /// Not a valid HTTP/1.x request head: 400.
    Malformed,
}

/// Finds complete request heads at the front of a read buffer, across reads.
#[derive(Debug, Default)]
pub(crate) struct HeadReader {
    /// Where the search for the blank line that ends the head resumes (bytes before it were
    /// searched already), so a head arriving a byte at a time costs linear time, not quadratic.
    from: usize,
}

impl HeadReader {
    /// Takes a complete head off the front of `buf` (empty lines before it are skipped); `Ok(None)`
    /// while it is incomplete. `max` bounds the head's size.
    pub(crate) fn read(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Option<Head>, HeadError> {
        if self.from == 0 {
            // RFC 9112 2.2: empty lines before the request line are ignored.
            let skip = buf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            buf.advance(skip);
        }
        let Some(end) = head_end(buf, self.from) else {
            if buf.len() > max {
                return Err(HeadError::TooLarge);
            }
            // The blank line may straddle this read and the next.
            self.from = buf.len().saturating_sub(2);
            return Ok(None);
        };
        self.from = 0;
        if end > max {
            return Err(HeadError::TooLarge);
        }
        parse_head(buf.split_to(end).freeze()).map(Some)
    }
}

/// The length of the head at the front of `buf` (up to and including the blank line that ends it),
/// searching for line feeds from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let n = i + p;
        match (buf.get(n + 1), buf.get(n + 2)) {
            (Some(b'\n'), _) => return Some(n + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(n + 3),
            _ => {}
        }
        i = n + 1;
    }
    None
}

/// `uri` (absolute form, its path empty) with the path `/` before its query.
#[cold]
fn with_root_path(uri: &Uri) -> Option<Uri> {
    let pq = uri.path_and_query()?.as_str();
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(format!("/{pq}").parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// Parses one complete head (`head` ends with its blank line). Header values and the target share
/// `head`'s memory (no copy per header).
fn parse_head(head: Bytes) -> Result<Head, HeadError> {
    use HeadError::Malformed;
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    match parsed.parse_with_uninit_headers(&head, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        _ => return Err(Malformed),
    }
    let method =
        Method::from_bytes(parsed.method.unwrap_or("").as_bytes()).map_err(|_| Malformed)?;
    let target = parsed.path.unwrap_or("").as_bytes();
    // Origin form (`/path?q`), absolute form (`http://host/path`) and `*`.
    let mut uri = Uri::from_maybe_shared(head.slice_ref(target)).map_err(|_| Malformed)?;
    // An absolute form with an empty path and a query (`http://host?x=1`) names the path `/`
    // (RFC 3986 6.2.3), as nginx reads it; kept as it is, it would go upstream as `GET ?x=1`.
    if uri.scheme().is_some()
        && uri
            .path_and_query()
            .is_some_and(|p| p.as_str().starts_with('?'))
    {
        uri = with_root_path(&uri).ok_or(Malformed)?;
    }
    // No tunnels: CONNECT (and the authority form, which only CONNECT uses) would go upstream as
    // `CONNECT / HTTP/1.1`, and a 2xx would leave the client believing it had a tunnel.
    if method == Method::CONNECT || (uri.scheme().is_none() && uri.authority().is_some()) {
        return Err(Malformed);
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Room for what the proxy adds (`x-forwarded-for`, `-proto`, `x-request-id`, `host`) so the
    // map is not grown and rehashed per request.
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + 4);
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    // Transfer codings listed (on all lines), and whether the last was `chunked`.
    let (mut codings, mut chunked) = (0u32, false);
    let (mut close, mut keep_alive, mut conn_upgrade) = (false, false, false);
    let mut upgrade: Option<HeaderValue> = None;
    let mut expect_continue = false;
    let mut hosts = 0u32;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| Malformed)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice_ref(h.value)).map_err(|_| Malformed)?;
        if name == header::CONTENT_LENGTH {
            let n = content_length(h.value).ok_or(Malformed)?;
            if length.is_some_and(|l| l != n) {
                return Err(Malformed);
            }
            length = Some(n);
            // Put back once, as one number (below): `5, 5` or two equal lines are valid here
            // (RFC 9112 6.3) but not everywhere the request goes on to.
            continue;
        } else if name == header::TRANSFER_ENCODING {
            // Only `chunked` alone is accepted: the body goes upstream decoded, with a
            // `content-length`, so another coding (gzip) would silently reach the upstream as the
            // body's raw bytes (RFC 9112 6.1: a coding not understood is refused).
            transfer_encoding = true;
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if !t.is_empty() {
                    codings += 1;
                    chunked = t.eq_ignore_ascii_case(b"chunked");
                }
            }
        } else if name == header::CONNECTION {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                conn_upgrade |= token.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name == header::UPGRADE {
            upgrade = Some(value.clone());
        } else if name == header::EXPECT {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::HOST {
            hosts += 1;
            if !valid_host(h.value) {
                return Err(Malformed);
            }
        }
        headers.append(name, value);
    }
    if let Some(n) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    // RFC 9112 3.2: a request with more than one `Host` is refused (a route matching on `host`
    // would take either of two, where a front proxy, or an authorization in front, took one), and
    // so is an HTTP/1.1 request without one, unless its target is in absolute form (which names
    // the host), as nginx and Envoy refuse it. HTTP/1.0 had no `Host`.
    if hosts > 1 || (hosts == 0 && version == Version::HTTP_11 && uri.authority().is_none()) {
        return Err(Malformed);
    }
    // RFC 9112 3.2.2: with an absolute-form target (`GET http://a.example/ HTTP/1.1`), the target's
    // authority is the host asked for and `Host` is ignored; a proxy sends `Host` made from the
    // target. Routing on a `Host` line that says something else would take the request where a front
    // component that went by the target did not send it (nginx and Envoy also go by the target).
    // Userinfo in an `http(s)` URI is an error (RFC 9110 4.2.4).
    if let Some(a) = uri.authority() {
        if !valid_host(a.as_str().as_bytes()) {
            return Err(Malformed);
        }
        let host = HeaderValue::from_str(a.as_str()).map_err(|_| Malformed)?;
        headers.insert(header::HOST, host);
        // RFC 9112 3.2.4: `OPTIONS http://host` (no path, no query: the target ends with its
        // authority) asks about the server as a whole, and the last proxy sends it as
        // `OPTIONS *` (`http::Uri` reads the empty path as `/`, which asks about one resource).
        if method == Method::OPTIONS && target.ends_with(a.as_str().as_bytes()) {
            uri = Uri::from_static("*");
        }
    }
    let framing = if transfer_encoding {
        // Both lengths (a smuggling vector), a coding other than `chunked` alone, or chunked in
        // HTTP/1.0.
        if length.is_some() || !chunked || codings != 1 || version == Version::HTTP_10 {
            return Err(Malformed);
        }
        Framing::Chunked
    } else {
        match length {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    let mut req = Request::new(());
    if let Some(protocol) = upgrade.filter(|_| {
        conn_upgrade
            && method == Method::GET
            && version == Version::HTTP_11
            && framing == Framing::None
    }) {
        // A protocol switch offered (RFC 9110 7.8): a websocket route may tunnel it.
        req.extensions_mut()
            .insert(super::tunnel::UpgradeOffer(protocol));
    }
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(Head {
        req,
        framing,
        keep_alive: !close && (version == Version::HTTP_11 || keep_alive),
        expect_continue: expect_continue && version == Version::HTTP_11,
    })
}

/// Whether a `Host` value is `uri-host [":" port]` (RFC 9112 3.2; RFC 3986 3.2.2), or empty (allowed
/// for a target without an authority). Anything else (a list `a, b`, a `/`, `@` or a space) is a
/// 400, as two `Host` lines are: components that read a host out of it differently would disagree
/// on which host was asked for.
fn valid_host(v: &[u8]) -> bool {
    match v.first() {
        None => true,
        Some(b'[') => {
            let Some(end) = v.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = &v[1..end];
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                && valid_port(&v[end + 1..])
        }
        Some(_) => {
            // One pass over the reg-name (or IPv4 address), then the port.
            let name = v.iter().take_while(|&&b| HOST_BYTE[usize::from(b)]).count();
            valid_port(&v[name..])
        }
    }
}

/// Nothing, or `:` and digits.
fn valid_port(rest: &[u8]) -> bool {
    match rest.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// The bytes of a reg-name (RFC 3986 3.2.2): unreserved, pct-encoded (`%`), sub-delims.
const HOST_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    t
};

/// A `Content-Length` value: digits, or a list of equal ones (`5, 5`, as some clients repeat it).
fn content_length(v: &[u8]) -> Option<u64> {
    let mut out = None;
    for part in v.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part
            .iter()
            .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
        if out.is_some_and(|o| o != n) {
            return None;
        }
        out = Some(n);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The connection state shared with request bodies
// ---------------------------------------------------------------------------------------------

/// Why reading an HTTP/1.1 request body failed.
#[derive(Debug)]
pub struct BodyError(BodyErrorKind);

impl BodyError {
    /// Whether the client's connection ended or failed before the body did.
    pub(crate) fn client_went_away(&self) -> bool {
        matches!(self.0, BodyErrorKind::Eof | BodyErrorKind::Io(_))
    }
}

#[derive(Debug)]
enum BodyErrorKind {
    Io(io::ErrorKind),
    Eof,
    Chunked,
    /// The exchange the body belonged to is over.
    Gone,
    /// Nothing of it arrived for `idle_timeout`.
    Stalled,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            BodyErrorKind::Io(k) => {
                write!(f, "client connection error while reading the body: {k}")
            }
            BodyErrorKind::Eof => f.write_str("client closed the connection before the body ended"),
            BodyErrorKind::Chunked => f.write_str("malformed chunked request body"),
            BodyErrorKind::Gone => f.write_str("request body read after its exchange ended"),
            BodyErrorKind::Stalled => {
                f.write_str("the client sent nothing more of its request body for idle_timeout")
            }
        }
    }
}

impl std::error::Error for BodyError {
    /// A stall is [`super::body::BodyStalled`], as for HTTP/2 (the client gets 408).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.0 {
            BodyErrorKind::Stalled => Some(&super::body::BodyStalled),
            _ => None,
        }
    }
}

/// What is left of the current exchange's request body on the connection.
#[derive(Debug)]
enum Rest {
    /// Nothing (no body, or read to its end).
    None,
    /// `Content-Length` bytes left (more than zero).
    Length(u64),
    /// A chunked body (its trailers are dropped).
    Chunked(chunked::Decoder),
    /// Reading it failed: the connection cannot carry another request.
    Failed,
}

/// A client connection's I/O and read side, shared by the connection loop and the request body.
struct Conn<I> {
    io: I,
    rbuf: BytesMut,
    /// The exchange whose body may read (a stale body of an earlier one gets an error).
    seq: u64,
    rest: Rest,
    /// Whether the [`RequestBody`] of exchange `seq` still exists.
    alive: bool,
    /// `100 Continue` to send when the body is first polled (bytes of it written so far).
    cont: Option<usize>,
    /// The response head has started going out: no `100 Continue` any more.
    responded: bool,
    /// Body bytes read so far (a slow body still moving is not idle).
    progress: u64,
    /// The connection loop, waiting for the body to end or be dropped.
    waiter: Option<Waker>,
    /// Whoever last polled the body and is waiting for more of it (woken when the connection is
    /// given up, so that a body held by an upstream connection's task fails and lets go of it).
    reader: Option<Waker>,
    /// The streamed upstream copy of exchange `seq`'s body, told when the connection gives the
    /// body up (its sender may not poll it again: an upstream that stopped reading).
    abandon: Option<(u64, std::sync::Weak<super::body::StreamState>)>,
}

/// What to tell when a connection gives up a request body: the waker of its last reader, and the
/// upstream copy streaming it.
type GivenUp = (
    Option<Waker>,
    Option<std::sync::Weak<super::body::StreamState>>,
);

/// Tells `given_up` (outside the connection's lock).
fn tell(given_up: GivenUp) {
    if let Some(w) = given_up.0 {
        w.wake();
    }
    if let Some(s) = given_up.1.and_then(|s| s.upgrade()) {
        s.abandon();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here is left half-updated by a panic that matters more than serving on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    /// Reads what the socket has into the buffer, making room for at least `want` bytes if there
    /// is less (so an exchange that still holds slices of the buffer does not force a new one).
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < want.max(1) {
            self.rbuf.reserve(want.max(READ_CHUNK));
        }
        let read = self.io.read_buf(&mut self.rbuf);
        pin!(read).poll(cx)
    }

    /// Fails the current request body from its next poll on (the connection will not read it any
    /// more); returns whom to tell, once the lock is released ([`tell`]).
    fn fail_body(&mut self) -> GivenUp {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.rest = Rest::Failed;
        let abandon = self
            .abandon
            .take()
            .filter(|(s, _)| *s == seq)
            .map(|(_, w)| w);
        (self.reader.take(), abandon)
    }

    fn wake_waiter(&mut self) {
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }

    fn fail(&mut self, e: BodyErrorKind) -> Poll<Option<Result<Bytes, BodyError>>> {
        self.rest = Rest::Failed;
        self.wake_waiter();
        Poll::Ready(Some(Err(BodyError(e))))
    }

    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(off) = self.cont {
            if off == 0 && (self.responded || !self.rbuf.is_empty()) {
                // Too late (the response is going out), or the client did not wait. One already
                // begun is finished: half of it would run into what follows on the wire.
                self.cont = None;
                break;
            }
            if off == CONTINUE.len() {
                ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                self.cont = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &CONTINUE[off..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.cont = Some(off + n);
        }
        Poll::Ready(Ok(()))
    }

    /// The response starts going out: no `100 Continue` from now on. `None`: none was due.
    /// Otherwise the part of it the socket has not taken yet (empty when it was never begun, or
    /// was written whole), which must go out before the response head.
    fn start_response(&mut self) -> Option<&'static [u8]> {
        self.responded = true;
        let off = self.cont.take()?;
        Some(if off == 0 { &[] } else { &CONTINUE[off..] })
    }

    /// The next piece of the current request body.
    fn poll_body(
        &mut self,
        seq: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, BodyError>>> {
        if seq != self.seq {
            return Poll::Ready(Some(Err(BodyError(BodyErrorKind::Gone))));
        }
        if let Err(e) = ready!(self.poll_continue(cx)) {
            return self.fail(BodyErrorKind::Io(e.kind()));
        }
        loop {
            let want = match &mut self.rest {
                Rest::None => return Poll::Ready(None),
                Rest::Failed => return Poll::Ready(Some(Err(BodyError(BodyErrorKind::Eof)))),
                Rest::Length(left) => {
                    if !self.rbuf.is_empty() {
                        let n = usize::try_from(*left)
                            .map_or(self.rbuf.len(), |l| l.min(self.rbuf.len()));
                        *left -= n as u64;
                        if *left == 0 {
                            self.rest = Rest::None;
                            self.wake_waiter();
                        }
                        self.progress += n as u64;
                        return Poll::Ready(Some(Ok(self.rbuf.split_to(n).freeze())));
                    }
                    usize::try_from(*left).map_or(BODY_READ_MAX, |l| l.min(BODY_READ_MAX))
                }
                // The end of the connection is seen by the read below (as for a length body).
                Rest::Chunked(d) => match d.decode(&mut self.rbuf, false) {
                    Ok(Some(chunked::Item::Data(b))) => {
                        self.progress += b.len() as u64;
                        return Poll::Ready(Some(Ok(b)));
                    }
                    // Not produced: the decoder drops them.
                    Ok(Some(chunked::Item::Trailers(_))) => continue,
                    Ok(Some(chunked::Item::End)) => {
                        self.rest = Rest::None;
                        self.wake_waiter();
                        return Poll::Ready(None);
                    }
                    Ok(None) => d.data_left().map_or(READ_CHUNK, |l| {
                        usize::try_from(l)
                            .map_or(BODY_READ_MAX, |l| l.clamp(READ_CHUNK, BODY_READ_MAX))
                    }),
                    Err(chunked::Error::Eof) => return self.fail(BodyErrorKind::Eof),
                    Err(chunked::Error::Invalid(_)) => return self.fail(BodyErrorKind::Chunked),
                },
            };
            match ready!(self.poll_fill(cx, want)) {
                Ok(0) => return self.fail(BodyErrorKind::Eof),
                Ok(_) => {}
                Err(e) => return self.fail(BodyErrorKind::Io(e.kind())),
            }
        }
    }
}

/// The request body's view of its connection (the I/O type erased).
trait Source: Send + Sync {
    fn poll_body(&self, seq: u64, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>>;
    /// Exchange `seq`'s body streams upstream as `state`: told if the connection gives it up.
    fn streamed_as(&self, seq: u64, state: std::sync::Weak<super::body::StreamState>);
    fn release(&self, seq: u64);
    /// The body stalled: the connection cannot carry another request.
    fn stalled(&self, seq: u64);
    /// Whether exchange `seq`'s response has started going out.
    fn responding(&self, seq: u64) -> bool;
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send> Source for Mutex<Conn<I>> {
    fn poll_body(&self, seq: u64, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let mut c = lock(self);
        let r = c.poll_body(seq, cx);
        if r.is_pending() && !c.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            c.reader = Some(cx.waker().clone());
        }
        r
    }

    fn streamed_as(&self, seq: u64, state: std::sync::Weak<super::body::StreamState>) {
        let mut c = lock(self);
        if c.seq == seq {
            c.abandon = Some((seq, state));
        }
    }

    fn release(&self, seq: u64) {
        let mut c = lock(self);
        if c.seq == seq {
            c.alive = false;
            c.wake_waiter();
        }
    }

    fn stalled(&self, seq: u64) {
        let mut c = lock(self);
        if c.seq == seq {
            let _ = c.fail(BodyErrorKind::Stalled);
        }
    }

    fn responding(&self, seq: u64) -> bool {
        let c = lock(self);
        c.seq != seq || c.responded
    }
}

/// An HTTP/1.1 request body, read from the client connection as it is polled.
pub struct RequestBody {
    /// Weak: a body held past its connection's end (by an upstream copy that stopped reading)
    /// must not keep the client's socket open; it fails at its next poll then.
    src: std::sync::Weak<dyn Source>,
    seq: u64,
    /// Bytes left of a `Content-Length` body (`None`: chunked).
    left: Option<u64>,
    ended: bool,
    stall: super::body::Stall,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("left", &self.left)
            .field("ended", &self.ended)
            .finish()
    }
}

impl RequestBody {
    /// The connection this body is read from, to tell it later how the body streams upstream.
    pub(crate) fn link(&self) -> Link {
        Link {
            src: self.src.clone(),
            seq: self.seq,
        }
    }
}

/// The body of an exchange whose connection is gone: over.
fn gone<T>() -> Poll<Option<Result<T, BodyError>>> {
    Poll::Ready(Some(Err(BodyError(BodyErrorKind::Gone))))
}

/// A request body's connection ([`RequestBody::link`]).
pub(crate) struct Link {
    src: std::sync::Weak<dyn Source>,
    seq: u64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("seq", &self.seq).finish()
    }
}

impl Link {
    /// The body streams upstream as `state`: the connection tells it if it gives the body up
    /// (see [`super::body::StreamState::abandon`]).
    pub(crate) fn streamed_as(&self, state: std::sync::Weak<super::body::StreamState>) {
        if let Some(src) = self.src.upgrade() {
            src.streamed_as(self.seq, state);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let Some(src) = this.src.upgrade() else {
            this.ended = true;
            return gone();
        };
        let next = match src.poll_body(this.seq, cx) {
            Poll::Ready(next) => next,
            // Once the response is going out, a quiet upload is the exchange's business (a
            // stream both ways); `settle` bounds what is left of it after the response.
            Poll::Pending if !src.responding(this.seq) && this.stall.pending(cx) => {
                src.stalled(this.seq);
                this.ended = true;
                return Poll::Ready(Some(Err(BodyError(BodyErrorKind::Stalled))));
            }
            Poll::Pending => return Poll::Pending,
        };
        match next {
            Some(Ok(data)) => {
                this.stall.moved();
                if let Some(left) = &mut this.left {
                    *left = left.saturating_sub(data.len() as u64);
                    this.ended = *left == 0;
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => {
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::new(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(src) = self.src.upgrade() {
            src.release(self.seq);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the connection closes (HTTP/1.0 client, length unknown).
    Close,
}

/// Writes the response head into `dst` and chooses its framing: `content-length` when the body's
/// size is known (exact size hint, else the upstream's `content-length`), otherwise chunked
/// (close-delimited for HTTP/1.0). Clears `keep_alive` when the connection must close after this
/// response (`Connection: close` from the handler, close-delimited body); says so in the head.
pub(crate) fn encode_head(
    dst: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    hint: &SizeHint,
    head_request: bool,
    version: Version,
    keep_alive: &mut bool,
) -> Out {
    dst.clear();
    if status == StatusCode::OK {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(b"HTTP/1.1 ");
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        // A reason phrase must be there for some parsers.
        dst.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    let mut length: Option<u64> = None;
    let mut has_date = false;
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            length = content_length(value.as_bytes());
            continue;
        }
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        if *name == header::CONNECTION {
            if value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                *keep_alive = false;
            }
            continue;
        }
        has_date |= *name == header::DATE;
        put_field(dst, name, value);
    }
    let code = status.as_u16();
    let put_length = |dst: &mut Vec<u8>, n: u64| {
        dst.extend_from_slice(b"content-length: ");
        dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        dst.extend_from_slice(b"\r\n");
    };
    let out = if code < 200 || code == 204 {
        Out::Empty
    } else if head_request || code == 304 {
        // The length of the body a GET would have had, as the upstream said.
        if let Some(n) = length {
            put_length(dst, n);
        }
        Out::Empty
    } else if let Some(n) = hint.exact().or(length) {
        put_length(dst, n);
        Out::Length(n)
    } else if version == Version::HTTP_11 {
        dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Out::Chunked
    } else {
        *keep_alive = false;
        Out::Close
    };
    if !*keep_alive {
        dst.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        dst.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        dst.extend_from_slice(b"date: ");
        push_date(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    out
}

thread_local! {
    /// The `date` value of the current second (formatted once a second per thread).
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [b' '; 29])) };
}

fn push_date(dst: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            // IMF-fixdate is always 29 bytes.
            let mut out = &mut d.1[..];
            let _ = write!(out, "{}", httpdate::HttpDate::from(now));
            d.0 = secs;
        }
        dst.extend_from_slice(&d.1);
    });
}

/// Frame data up to this size is copied behind the head or chunk header and goes out in one
/// `write`; larger data is written from where it is (`writev`).
const COPY_MAX: usize = 16 * 1024;

/// Appends one data frame to `dst` with its framing (a chunk header, and the chunk's CRLF); `false`
/// when `data` is too large to copy and is to be written after `dst` (then followed by the CRLF).
fn frame_data(dst: &mut Vec<u8>, out: Out, data: &Bytes) -> bool {
    let chunked = out == Out::Chunked;
    if chunked {
        let mut hexbuf = [0u8; 16];
        let mut n = data.len();
        let mut i = hexbuf.len();
        loop {
            i -= 1;
            hexbuf[i] = b"0123456789abcdef"[n & 0xf];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        dst.extend_from_slice(&hexbuf[i..]);
        dst.extend_from_slice(b"\r\n");
    }
    if data.len() <= COPY_MAX {
        dst.extend_from_slice(data);
        if chunked {
            dst.extend_from_slice(b"\r\n");
        }
        true
    } else {
        false
    }
}

/// One header line, `name: value` and its CRLF.
#[inline]
pub(crate) fn put_field(dst: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    dst.extend_from_slice(name.as_str().as_bytes());
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

/// Appends chunked trailers (the last chunk, the fields, the blank line).
fn encode_trailers(dst: &mut Vec<u8>, trailers: &HeaderMap) {
    dst.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        put_field(dst, name, value);
    }
    dst.extend_from_slice(b"\r\n");
}

// ---------------------------------------------------------------------------------------------
// The connection loop
// ---------------------------------------------------------------------------------------------

/// The client went away (or its connection failed): the exchange is dropped.
struct Gone;

/// What waiting for a request head ended with.
// Returned once per request and matched at once; boxing the head would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    /// The connection starts with the HTTP/2 preface.
    H2,
    /// Refused before routing (431, 400); then closed.
    Refuse(Local),
    /// Closed by the client, a timeout, or shutdown.
    Close,
    /// Shutdown began between exchanges: look at the socket once more, after the runtime's I/O
    /// driver has run, before closing.
    Look,
}

/// Serves HTTP/1.1 on `io` until the connection ends. Returns the I/O and the bytes already read
/// when the connection turns out to be HTTP/2 (prior knowledge), for hyper to serve.
pub(super) async fn serve<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) -> Option<(I, Bytes)>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // One allocation each per connection: the shared state, the timer and the stop signal.
    let shared = Arc::new(Mutex::new(Conn {
        io,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        seq: 0,
        rest: Rest::None,
        alive: false,
        cont: None,
        responded: false,
        progress: 0,
        waiter: None,
        reader: None,
        abandon: None,
    }));
    // Declared before the driver, so dropped after it: see [`Release`].
    let release = Release(shared.clone());
    let closing = *stop.borrow_and_update();
    let mut d = Driver {
        timer: Box::pin(tokio::time::sleep_until(ctx.opened + limits.idle_timeout)),
        stop: Stop {
            rx: stop.clone(),
            wake: Box::pin(async move {
                // A dropped sender (the server is gone) stops too.
                let _ = stop.changed().await;
            }),
            registered: false,
        },
        shared,
        ctx,
        limits,
        wbuf: Vec::with_capacity(1024),
        heads: HeadReader::default(),
        head_start: None,
        first: true,
        closing,
        looked: false,
        tunnel: None,
    };
    loop {
        let head = match poll_fn(|cx| d.poll_head(cx)).await {
            Next::Head(h) => h,
            Next::H2 => {
                drop(d.timer);
                // Nothing of a request was read: nothing to give up.
                drop(release);
                let conn = Arc::try_unwrap(d.shared).ok()?;
                let c = conn.into_inner().unwrap_or_else(PoisonError::into_inner);
                return Some((c.io, c.rbuf.freeze()));
            }
            Next::Refuse(l) => {
                let resp = respond::local(l);
                super::access_log_refused(&d.ctx.gateway, None, None, &resp);
                let (parts, body) = resp.into_parts();
                let mut keep = false;
                if d.respond(parts, body, false, Version::HTTP_11, &mut keep)
                    .await
                    .is_ok()
                {
                    d.close(true).await;
                }
                return None;
            }
            Next::Close => {
                d.close(false).await;
                return None;
            }
            Next::Look => {
                // Past the I/O driver's next poll, so that the socket's readiness is known.
                tokio::task::yield_now().await;
                d.looked = true;
                continue;
            }
        };
        match d.exchange(head).await {
            Ok(true) => {}
            Ok(false) => {
                if let Some(up) = d.tunnel.take() {
                    // The 101 went out: what follows on both connections is the new protocol's.
                    drop(d.timer);
                    let idle = d.limits.idle_timeout;
                    let _open = d.ctx.gateway.runtime().telemetry.tunnel_opened();
                    drop(release);
                    let conn = Arc::try_unwrap(d.shared).ok()?;
                    let c = conn.into_inner().unwrap_or_else(PoisonError::into_inner);
                    // Boxed: a tunnel is rare, and its state should not grow every connection's.
                    Box::pin(super::tunnel::run(c.io, c.rbuf.freeze(), up, idle)).await;
                    return None;
                }
                let linger = d.unread();
                d.close(linger).await;
                return None;
            }
            Err(Gone) => return None,
        }
    }
}

/// Ends the connection for a request body that outlives it: when the connection loop is gone (the
/// connection was given up or closed), a body still held elsewhere (a streamed upload an upstream
/// connection's task goes on reading after the response) fails at its next poll, and is polled
/// now, so that task ends and the client socket and the upstream connection are both released.
/// Without this a client that stops mid-upload, with an upstream that waits for the rest, kept
/// both open forever, outside `max_connections`.
/// It holds the connection's last strong reference (a body holds a weak one): once it is
/// dropped, the client's socket is closed, whoever still holds the body.
struct Release<I: AsyncRead + AsyncWrite + Unpin>(Arc<Mutex<Conn<I>>>);

impl<I: AsyncRead + AsyncWrite + Unpin> Drop for Release<I> {
    fn drop(&mut self) {
        let given_up = lock(&self.0).fail_body();
        tell(given_up);
    }
}

/// The server's stop signal. Checking it costs one atomic load: the future that wakes this task
/// when it changes is polled once, to register the task's waker (the same for every poll of this
/// connection's task), not on every wake-up (a `watch` change future re-polled takes the
/// `Notify`'s lock each time: ~4% of a proxied request's instructions).
struct Stop {
    rx: watch::Receiver<bool>,
    wake: Pin<Box<dyn Future<Output = ()> + Send>>,
    registered: bool,
}

impl Stop {
    /// Whether the server is stopping (or gone); otherwise this task is woken when it starts to.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if !matches!(self.rx.has_changed(), Ok(false)) {
            return true;
        }
        if !self.registered {
            self.registered = true;
            return self.wake.as_mut().poll(cx).is_ready();
        }
        false
    }
}

struct Driver<I> {
    shared: Arc<Mutex<Conn<I>>>,
    ctx: Arc<ConnCtx>,
    limits: Limits,
    /// Idle, head, drain and body-wait deadlines, one at a time. Re-armed lazily: it may fire
    /// early, and then it is reset to the deadline that applies, so a request costs no timer update.
    timer: Pin<Box<Sleep>>,
    stop: Stop,
    /// The response head (and small body frames) being written.
    wbuf: Vec<u8>,
    heads: HeadReader,
    /// When the first byte of an incomplete head was seen.
    head_start: Option<Instant>,
    /// No head was read yet (the HTTP/2 preface can still come).
    first: bool,
    /// Shutting down: no new exchange, and the current one says `connection: close`.
    closing: bool,
    /// During a shutdown, the socket was looked at once more (see [`Next::Look`]).
    looked: bool,
    /// An upstream's accepted upgrade, once its 101 went out: the connection becomes a tunnel.
    tunnel: Option<super::tunnel::UpstreamSide>,
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Driver<I> {
    fn poll_stop(&mut self, cx: &mut Context<'_>) {
        if !self.closing && self.stop.poll(cx) {
            self.closing = true;
        }
    }

    /// Whether `deadline` has passed; otherwise the timer wakes the task by then.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        deadline_passed(&mut self.timer, cx, deadline)
    }

    fn idle_deadline(&self) -> Instant {
        self.ctx.idle_deadline(self.limits.idle_timeout)
    }

    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        self.poll_stop(cx);
        // Whether an empty read buffer is kept while waiting for the next request.
        let idle_buffer = {
            let mut c = lock(&self.shared);
            loop {
                let buffered = c.rbuf.len();
                if self.first && c.rbuf.starts_with(H2_PREFACE) {
                    return Poll::Ready(Next::H2);
                }
                if self.first && buffered > 0 && H2_PREFACE.starts_with(&c.rbuf) {
                    // Could still be the HTTP/2 preface: read on.
                } else if buffered > 0 {
                    match self.heads.read(&mut c.rbuf, self.limits.max_head) {
                        Ok(Some(h)) => {
                            self.head_start = None;
                            self.first = false;
                            return Poll::Ready(Next::Head(h));
                        }
                        Ok(None) => {}
                        Err(HeadError::TooLarge) => {
                            return Poll::Ready(Next::Refuse(Local::HeadersTooLarge))
                        }
                        Err(HeadError::Malformed) => {
                            return Poll::Ready(Next::Refuse(Local::BadRequest))
                        }
                    }
                }
                if self.closing && c.rbuf.is_empty() {
                    // Graceful shutdown: a connection between exchanges closes at once. One whose
                    // next head has started to arrive reads it (within header_read_timeout) and
                    // is answered, with `connection: close`. That includes a request the client
                    // sent just before (already in the socket's buffer, where the runtime may not
                    // have seen it yet): closing with it unread would reset the connection, so
                    // the socket is read once more, after the I/O driver's next poll.
                    if !self.looked {
                        return Poll::Ready(Next::Look);
                    }
                    match c.poll_fill(cx, READ_CHUNK / 8) {
                        Poll::Ready(Ok(n)) if n > 0 => continue,
                        _ => return Poll::Ready(Next::Close),
                    }
                }
                if !c.rbuf.is_empty() && self.head_start.is_none() {
                    // A head has started; from now on it has header_read_timeout to complete.
                    let now = Instant::now();
                    self.head_start = Some(now);
                    let deadline = now + self.limits.head_timeout;
                    if self.timer.deadline() > deadline {
                        self.timer.as_mut().reset(deadline);
                    }
                }
                match c.poll_fill(cx, READ_CHUNK / 8) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Next::Close),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Pending => break c.rbuf.is_empty() && c.rbuf.capacity() > 0,
                }
            }
        };
        let deadline = match self.head_start {
            Some(t) => t + self.limits.head_timeout,
            None => self.idle_deadline(),
        };
        if idle_buffer && self.head_start.is_none() {
            // A connection quiet for IDLE_RELEASE between requests gives its buffers back
            // (as nginx and HAProxy do): thousands of idle keep-alive clients then cost little.
            // The next read takes a new one.
            let release_at = self.ctx.idle_deadline(IDLE_RELEASE);
            if release_at < deadline && self.poll_deadline(cx, release_at) {
                let mut c = lock(&self.shared);
                if c.rbuf.is_empty() {
                    c.rbuf = BytesMut::new();
                }
                // The response head buffer too (empty between exchanges).
                if self.wbuf.is_empty() {
                    self.wbuf = Vec::new();
                }
            }
        }
        if self.poll_deadline(cx, deadline) {
            if self.head_start.is_some() {
                tracing::debug!("request head not complete within header_read_timeout");
            }
            return Poll::Ready(Next::Close);
        }
        Poll::Pending
    }

    /// One exchange: the handler, the response, the request body's rest. `Ok(keep_alive)`.
    async fn exchange(&mut self, head: Head) -> Result<bool, Gone> {
        let Head {
            req,
            framing,
            mut keep_alive,
            expect_continue,
        } = head;
        let head_request = req.method() == Method::HEAD;
        let version = req.version();
        let body = match framing {
            Framing::None => ClientBody::Empty,
            Framing::Length(_) | Framing::Chunked => {
                let mut c = lock(&self.shared);
                c.seq += 1;
                c.rest = match framing {
                    Framing::Length(n) => Rest::Length(n),
                    _ => Rest::Chunked(chunked::Decoder::new(chunked::Trailers::Discard)),
                };
                c.alive = true;
                c.cont = (expect_continue && c.rbuf.is_empty()).then_some(0);
                c.responded = false;
                ClientBody::H1 {
                    inner: RequestBody {
                        src: Arc::downgrade(&self.shared) as std::sync::Weak<dyn Source>,
                        seq: c.seq,
                        left: match framing {
                            Framing::Length(n) => Some(n),
                            _ => None,
                        },
                        ended: false,
                        stall: super::body::Stall::new(self.limits.idle_timeout),
                    },
                }
            }
        };
        let resp = {
            let mut handler = pin!(super::handle(&self.ctx, req.map(|()| body)));
            let (shared, stop, closing) = (&self.shared, &mut self.stop, &mut self.closing);
            poll_fn(|cx| {
                if let Poll::Ready(r) = handler.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if !*closing && stop.poll(cx) {
                    *closing = true;
                }
                if client_gone(shared, cx) {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await
        };
        let Some(resp) = resp else {
            tracing::debug!("client closed the connection during the exchange");
            return Err(Gone);
        };
        keep_alive &= !self.closing;
        let (mut parts, mut resp_body) = resp.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // Only an upstream's accepted upgrade gives a 101 (see `tunnel`).
            // The client connection must be free to become the tunnel (no request body of an
            // earlier exchange still held elsewhere: a body holds a weak reference to it),
            // checked before the 101 goes out.
            let free = Arc::weak_count(&self.shared) == 0;
            if let Some(up) = parts
                .extensions
                .remove::<super::tunnel::Upgraded>()
                .and_then(|u| u.take())
                .filter(|_| free)
            {
                encode_switch(&mut self.wbuf, &parts.headers, &up.protocol);
                self.write(&[]).await?;
                self.tunnel = Some(up);
                return Ok(false);
            }
            // A switch with no connection behind it cannot be honoured.
            (parts, resp_body) =
                respond::failure(respond::Failure::UpstreamError, 0, None).into_parts();
            keep_alive = false;
        }
        let complete = self
            .respond(parts, resp_body, head_request, version, &mut keep_alive)
            .await?;
        // A connection that closes anyway skips the drain: its lingering close reads and drops
        // what the client still sends, and it must not wait `header_read_timeout` for a body
        // the client holds back (a withheld `100 Continue`) or keeps sending (a refused upload).
        let reuse = keep_alive && complete && !self.closing;
        let settled = self.settle(reuse).await;
        Ok(reuse && settled && !self.closing)
    }

    /// Writes one response. `Ok(false)` when its body could not be delimited correctly (the
    /// connection must close).
    async fn respond(
        &mut self,
        parts: http::response::Parts,
        body: RespBody,
        head_request: bool,
        version: Version,
        keep_alive: &mut bool,
    ) -> Result<bool, Gone> {
        let cont_rest = {
            let mut c = lock(&self.shared);
            // A request body nobody reads any more, too long to drain after the response (see
            // `settle`): the connection will close, so the answer says so, or the client would
            // send its next request on it and get no answer (as Envoy says `connection: close`
            // when it will not read the rest of a request). A chunked rest too, unless all of it
            // is already buffered (a small upload refused or answered early).
            let undrainable = match &c.rest {
                Rest::None => false,
                Rest::Length(n) => *n > DRAIN_MAX,
                Rest::Chunked(d) => {
                    c.rbuf.len() as u64 > CHUNKED_PROBE_MAX || d.rest_length(&c.rbuf).is_none()
                }
                Rest::Failed => true,
            };
            if undrainable && !c.alive {
                *keep_alive = false;
            }
            c.start_response()
        };
        if cont_rest.is_some() {
            // The client holds its body back for a `100 Continue` that will not come now (or sends
            // it after one): either way the connection cannot carry another request.
            *keep_alive = false;
        }
        let out = encode_head(
            &mut self.wbuf,
            parts.status,
            &parts.headers,
            &body.size_hint(),
            head_request,
            version,
            keep_alive,
        );
        // Where the head starts in `wbuf`, and whether it went out (see the body error below).
        let mut head_at = 0;
        let mut head_sent = false;
        if let Some(rest) = cont_rest.filter(|r| !r.is_empty()) {
            // A `100 Continue` the socket took only part of: its rest goes first.
            self.wbuf.splice(0..0, rest.iter().copied());
            head_at = rest.len();
        }
        drop(parts);
        let mut body = pin!(body);
        if out == Out::Empty || body.is_end_stream() {
            if out == Out::Chunked {
                self.wbuf.extend_from_slice(b"0\r\n\r\n");
            }
            self.write(&[]).await?;
            return Ok(!matches!(out, Out::Length(n) if n > 0) && out != Out::Close);
        }
        let mut left = match out {
            Out::Length(n) => n,
            _ => u64::MAX,
        };
        // The first frame, if the body has it already, goes out with the head.
        let mut first = Some(poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await);
        loop {
            let frame = match first.take() {
                Some(Poll::Ready(f)) => f,
                Some(Poll::Pending) => {
                    // Nothing yet: the head goes out alone (a stream's head must not wait).
                    self.write(&[]).await?;
                    head_sent = true;
                    continue;
                }
                None => {
                    let (shared, stop, closing) = (&self.shared, &mut self.stop, &mut self.closing);
                    let (timer, idle) = (&mut self.timer, self.limits.idle_timeout);
                    // When the wait for this frame began (read only once the body made us wait).
                    let mut since: Option<Instant> = None;
                    let next = poll_fn(|cx| {
                        if let Poll::Ready(f) = body.as_mut().poll_frame(cx) {
                            return Poll::Ready(Some(f));
                        }
                        if !*closing && stop.poll(cx) {
                            *closing = true;
                        }
                        if client_gone(shared, cx) {
                            return Poll::Ready(None);
                        }
                        // An upstream that sends nothing more for idle_timeout: the response is cut
                        // (the client sees a broken framing) and both connections close.
                        let t = *since.get_or_insert_with(Instant::now);
                        if deadline_passed(timer, cx, t + idle) {
                            tracing::debug!("response body idle for idle_timeout");
                            return Poll::Ready(None);
                        }
                        Poll::Pending
                    })
                    .await;
                    match next {
                        Some(f) => f,
                        None => return Err(Gone),
                    }
                }
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        if data.is_empty() {
                            continue;
                        }
                        let mut end = body.is_end_stream();
                        let mut complete = true;
                        if let Out::Length(_) = out {
                            if data.len() as u64 > left {
                                // More than the length said: cut, and close after.
                                tracing::debug!("response body longer than its content-length");
                                data.truncate(usize::try_from(left).unwrap_or(usize::MAX));
                                (end, complete) = (true, false);
                            }
                            left -= data.len() as u64;
                        }
                        let copied = frame_data(&mut self.wbuf, out, &data);
                        let chunked = out == Out::Chunked;
                        head_sent = true;
                        if copied {
                            if end && chunked {
                                self.wbuf.extend_from_slice(b"0\r\n\r\n");
                            }
                            self.write(&[]).await?;
                        } else {
                            let tail: &[u8] = match (chunked, end) {
                                (true, true) => b"\r\n0\r\n\r\n",
                                (true, false) => b"\r\n",
                                (false, _) => b"",
                            };
                            self.write(&[&data, tail]).await?;
                        }
                        if end {
                            return Ok(complete && ended_ok(out, left));
                        }
                    }
                    Err(frame) => {
                        if let (Ok(trailers), Out::Chunked) = (frame.into_trailers(), out) {
                            // `wbuf` holds the head when the body ends before it went out.
                            encode_trailers(&mut self.wbuf, &trailers);
                            self.write(&[]).await?;
                            return Ok(true);
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body failed");
                    if !head_sent {
                        // Before anything of the response went out (its body was broken from the
                        // start): the client gets 502 instead, as nginx does, and the connection
                        // closes (what the request's body left on it is unknown).
                        let bad = respond::failure(respond::Failure::UpstreamError, 0, None);
                        let mut head = Vec::new();
                        encode_head(
                            &mut head,
                            bad.status(),
                            bad.headers(),
                            &SizeHint::with_exact(0),
                            head_request,
                            version,
                            &mut false,
                        );
                        self.wbuf.truncate(head_at);
                        self.wbuf.extend_from_slice(&head);
                        self.write(&[]).await?;
                        return Ok(false);
                    }
                    // The client must not take a cut body for a whole one: no terminating chunk,
                    // and the connection closes.
                    return Err(Gone);
                }
                None => {
                    // `wbuf` holds the head when the body ends before it went out (an empty
                    // chunked body, or a body to the end of the connection, that came with it).
                    if out == Out::Chunked {
                        self.wbuf.extend_from_slice(b"0\r\n\r\n");
                        self.write(&[]).await?;
                    } else if !self.wbuf.is_empty() {
                        self.write(&[]).await?;
                    }
                    return Ok(ended_ok(out, left));
                }
            }
        }
    }

    /// Writes `wbuf` (then clears it) and flushes. A client that takes more than idle_timeout to
    /// accept it (it stopped reading) is given up.
    async fn write(&mut self, extra: &[&[u8]]) -> Result<(), Gone> {
        let r = {
            let (timer, idle) = (&mut self.timer, self.limits.idle_timeout);
            let mut w = pin!(write_all(&self.shared, &self.wbuf, extra));
            // When the socket first made us wait (no clock read while it takes everything at once).
            let mut since: Option<Instant> = None;
            poll_fn(|cx| {
                if let Poll::Ready(r) = w.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                let t = *since.get_or_insert_with(Instant::now);
                if deadline_passed(timer, cx, t + idle) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client read nothing for idle_timeout",
                    )));
                }
                Poll::Pending
            })
            .await
        };
        self.wbuf.clear();
        // The connection is idle from its last write, not from when the response head was ready
        // (a long body must not leave it past its idle deadline); the clock was read anyway.
        self.ctx.stamp_active(crate::sched::after_write());
        r.map_err(|e| {
            tracing::debug!(error = %e, "writing to the client failed");
            Gone
        })
    }

    /// After the response: waits while someone still reads the request body (an upstream connection
    /// finishing an upload), then, with `drain` (the connection is to be reused), drains a small
    /// unread rest. `false`: the connection must close.
    async fn settle(&mut self, drain: bool) -> bool {
        let mut drained: u64 = 0;
        // The body's progress when last seen moving, and when.
        let mut moving: Option<(u64, Instant)> = None;
        let mut drain_start: Option<Instant> = None;
        let settled = poll_fn(|cx| loop {
            let mut c = lock(&self.shared);
            match &c.rest {
                Rest::None => return Poll::Ready(true),
                Rest::Failed => return Poll::Ready(false),
                Rest::Length(n) if !c.alive && *n > DRAIN_MAX.saturating_sub(drained) => {
                    return Poll::Ready(false)
                }
                _ => {}
            }
            if c.alive {
                // Waited on as long as it moves: idle_timeout without progress closes.
                let progress = c.progress;
                c.waiter = Some(cx.waker().clone());
                drop(c);
                let since = match moving {
                    Some((p, t)) if p == progress => t,
                    _ => {
                        let now = Instant::now();
                        moving = Some((progress, now));
                        now
                    }
                };
                if self.poll_deadline(cx, since + self.limits.idle_timeout) {
                    return Poll::Ready(false);
                }
                return Poll::Pending;
            }
            if !drain || drained > DRAIN_MAX {
                return Poll::Ready(false);
            }
            let seq = c.seq;
            match c.poll_body(seq, cx) {
                Poll::Ready(Some(Ok(b))) => drained += b.len() as u64,
                Poll::Ready(None) => return Poll::Ready(true),
                Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
                Poll::Pending => {
                    drop(c);
                    let start = *drain_start.get_or_insert_with(Instant::now);
                    if self.poll_deadline(cx, start + self.limits.head_timeout) {
                        return Poll::Ready(false);
                    }
                    return Poll::Pending;
                }
            }
        })
        .await;
        if moving.is_some() || drain_start.is_some() {
            // It waited (an upload going on after the response): idle from now.
            self.ctx.stamp_active(Instant::now());
        }
        settled
    }

    /// Closes the write side (a TLS `close_notify` first). With `linger` (the client may still be
    /// sending: a refused head, a body left unread), it then reads and drops what comes until the
    /// client closes or sends nothing for `lingering_timeout`: a socket closed with unread input
    /// sends a reset, which can destroy the response before the client reads it (nginx's
    /// `lingering_close`). All of it is bounded by `header_read_timeout`.
    async fn close(&mut self, linger: bool) {
        let (shared, stop) = (&self.shared, &mut self.stop);
        let quiet = self.limits.linger;
        let linger = linger && !quiet.is_zero();
        if linger {
            // A body still held elsewhere must not see bytes go missing: it fails from here on.
            let given_up = lock(shared).fail_body();
            tell(given_up);
        }
        let _ = tokio::time::timeout(self.limits.head_timeout, async {
            poll_fn(|cx| Pin::new(&mut lock(shared).io).poll_shutdown(cx)).await?;
            if !linger {
                return Ok(());
            }
            let mut sink = [0u8; 4096];
            // Until the client closes or goes quiet, or the server stops.
            loop {
                let mut buf = ReadBuf::new(&mut sink);
                let read = poll_fn(|cx| {
                    if stop.poll(cx) {
                        return Poll::Ready(Ok(()));
                    }
                    Pin::new(&mut lock(shared).io).poll_read(cx, &mut buf)
                });
                match tokio::time::timeout(quiet, read).await {
                    Ok(Ok(())) if !buf.filled().is_empty() => {}
                    _ => return io::Result::Ok(()),
                }
            }
        })
        .await;
    }

    /// Whether the client may have sent what this connection has not read: the rest of a request
    /// body, a `100 Continue` body held back, or bytes already buffered.
    fn unread(&self) -> bool {
        let c = lock(&self.shared);
        !matches!(c.rest, Rest::None) || c.cont.is_some() || !c.rbuf.is_empty()
    }
}

/// The head of a `101 Switching Protocols` to `protocol`: the upstream's headers (its
/// `sec-websocket-accept` and the like) and the two that make it a switch.
fn encode_switch(dst: &mut Vec<u8>, headers: &HeaderMap, protocol: &HeaderValue) {
    dst.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    for (name, value) in headers {
        // A 1xx has no body: no framing header (RFC 9110 8.6, RFC 9112 6.1).
        if name == header::CONNECTION
            || name == header::UPGRADE
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
        {
            continue;
        }
        put_field(dst, name, value);
    }
    dst.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
    dst.extend_from_slice(protocol.as_bytes());
    dst.extend_from_slice(b"\r\n\r\n");
}

/// Whether `deadline` has passed; otherwise `timer` (armed lazily, see [`Driver::timer`]) wakes the
/// task by then.
fn deadline_passed(timer: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>, deadline: Instant) -> bool {
    loop {
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if Instant::now() >= deadline {
            return true;
        }
        // Fired for an earlier deadline: wait for this one.
        timer.as_mut().reset(deadline);
    }
}

/// Most buffered bytes of a chunked request body [`client_gone`] follows (copied at each look) to
/// learn whether all of the body is there.
const CHUNKED_PROBE_MAX: u64 = 16 * 1024;

/// Whether a length-delimited body got all its bytes (otherwise the connection must close).
fn ended_ok(out: Out, left: u64) -> bool {
    match out {
        Out::Length(_) => left == 0,
        Out::Close => false,
        Out::Empty | Out::Chunked => true,
    }
}

/// Between a request and its response, whether the client closed the connection. Looked at once
/// nothing more of the request is to come from the socket: its body read, or all of it already
/// buffered, as a small POST's is when it waits in the admission queue or a fault delay (a
/// chunked one up to [`CHUNKED_PROBE_MAX`] buffered bytes, its framing followed on a copy); and
/// nothing past it buffered (bytes of a pipelined request are kept, and read no further). A body
/// still arriving is not read ahead here: its reader polls the socket itself.
fn client_gone<I: AsyncRead + AsyncWrite + Unpin>(
    shared: &Mutex<Conn<I>>,
    cx: &mut Context<'_>,
) -> bool {
    let mut c = lock(shared);
    let buffered = c.rbuf.len() as u64;
    let nothing_more = match c.rest {
        Rest::None => buffered == 0,
        Rest::Length(left) => buffered == left,
        Rest::Chunked(ref d) => buffered <= CHUNKED_PROBE_MAX && d.rest_is_exactly(&c.rbuf),
        Rest::Failed => false,
    };
    if !nothing_more {
        return false;
    }
    matches!(c.poll_fill(cx, 1), Poll::Ready(Ok(0)) | Poll::Ready(Err(_)))
}

/// Writes `head` then each of `rest`, then flushes.
async fn write_all<I: AsyncWrite + Unpin>(
    shared: &Mutex<Conn<I>>,
    head: &[u8],
    rest: &[&[u8]],
) -> io::Result<()> {
    // (part index, offset in it); part 0 is `head`.
    let mut at = (0usize, 0usize);
    let part = |i: usize| -> &[u8] {
        if i == 0 {
            head
        } else {
            rest.get(i - 1).copied().unwrap_or(&[])
        }
    };
    let parts = 1 + rest.len();
    poll_fn(|cx| {
        let mut c = lock(shared);
        loop {
            while at.0 < parts && at.1 >= part(at.0).len() {
                at = (at.0 + 1, 0);
            }
            if at.0 == parts {
                return Pin::new(&mut c.io).poll_flush(cx);
            }
            let n = if at.0 + 1 < parts && c.io.is_write_vectored() {
                let mut slices = [IoSlice::new(&[]); 3];
                slices[0] = IoSlice::new(&part(at.0)[at.1..]);
                let mut k = 1;
                for i in at.0 + 1..parts.min(at.0 + 3) {
                    slices[k] = IoSlice::new(part(i));
                    k += 1;
                }
                ready!(Pin::new(&mut c.io).poll_write_vectored(cx, &slices[..k]))?
            } else {
                ready!(Pin::new(&mut c.io).poll_write(cx, &part(at.0)[at.1..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            // Advance over what was written, across parts.
            let mut n = n;
            while n > 0 && at.0 < parts {
                let avail = part(at.0).len() - at.1;
                if n < avail {
                    at.1 += n;
                    n = 0;
                } else {
                    n -= avail;
                    at = (at.0 + 1, 0);
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn host_values_are_uri_host_and_port() {
        for ok in [
            "",
            "a.example",
            "a.example:8080",
            "a.example:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "[2001:db8::7]",
            "xn--bcher-kva.example",
            "a,b",
            "a%20b",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "a.example, b.example",
            "a b",
            "a/x@b",
            "user@a.example",
            "a.example:80:81",
            "a.example:8o",
            "[::1",
            "[]",
            "[::1]x",
            "[fe80::1%eth0]",
            "a\\b",
            "a\tb",
            "a?b",
            "a#b",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    /// Feeds `input` in pieces cut at `cuts` (positions, any order), reading heads after each piece
    /// as the connection loop does; returns the heads and what is left buffered.
    fn heads_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<Result<Head, HeadError>>, Vec<u8>) {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        cuts.push(input.len());
        cuts.sort_unstable();
        let mut reader = HeadReader::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        for cut in cuts {
            buf.extend_from_slice(&input[at..cut]);
            at = cut;
            loop {
                match reader.read(&mut buf, 4096) {
                    Ok(Some(h)) => out.push(Ok(h)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return (out, buf.to_vec());
                    }
                }
            }
        }
        (out, buf.to_vec())
    }

    fn summary(h: &Result<Head, HeadError>) -> String {
        match h {
            Ok(h) => format!(
                "{} {} {:?} {:?} ka={} ec={} {:?}",
                h.req.method(),
                h.req.uri(),
                h.req.version(),
                h.framing,
                h.keep_alive,
                h.expect_continue,
                h.req.headers()
            ),
            Err(e) => format!("{e:?}"),
        }
    }

    const PIPELINE: &[u8] = b"\r\nGET /a?x=1 HTTP/1.1\r\nHost: a\r\nX-Many: 1\r\nx-many: 2\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n\
        GET http://c.example/c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
        PUT /d HTTP/1.1\nHost: d\nTransfer-Encoding: chunked\nConnection: close\n\nGET /e";

    #[test]
    fn pipelined_heads_parse_with_their_framing_and_connection_rules() {
        let (heads, rest) = heads_in_pieces(PIPELINE, &[]);
        assert_eq!(heads.len(), 4);
        let h: Vec<&Head> = heads.iter().map(|h| h.as_ref().unwrap()).collect();
        assert_eq!(h[0].req.uri(), "/a?x=1");
        assert_eq!(h[0].req.headers().get_all("x-many").iter().count(), 2);
        assert_eq!((h[0].framing, h[0].keep_alive), (Framing::None, true));
        assert_eq!(h[1].framing, Framing::Length(3));
        assert!(h[1].expect_continue);
        assert_eq!(h[2].req.uri().host(), Some("c.example"));
        assert_eq!(h[2].req.version(), Version::HTTP_10);
        assert!(h[2].keep_alive, "HTTP/1.0 with keep-alive");
        assert_eq!((h[3].framing, h[3].keep_alive), (Framing::Chunked, false));
        assert_eq!(rest, b"GET /e");
    }

    #[test]
    fn bad_heads_are_refused() {
        let cases: &[(&[u8], HeadError)] = &[
            (b"GARBAGE\r\n\r\n", HeadError::Malformed),
            (b"GET / HTTP/9.9\r\n\r\n", HeadError::Malformed),
            (
                b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"GET example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n",
                HeadError::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: public\r\nhost: admin\r\n\r\n",
                HeadError::Malformed,
            ),
            // HTTP/1.1 without `Host` (RFC 9112 3.2).
            (b"GET / HTTP/1.1\r\n\r\n", HeadError::Malformed),
        ];
        for (input, want) in cases {
            let (heads, _) = heads_in_pieces(input, &[]);
            assert_eq!(heads.len(), 1, "{input:?}");
            assert_eq!(heads[0].as_ref().err(), Some(want), "{input:?}");
        }
        // Without `Host`: HTTP/1.0, or a target that names the host.
        for ok in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET http://a.example/ HTTP/1.1\r\n\r\n",
        ] {
            let (heads, _) = heads_in_pieces(ok, &[]);
            assert!(heads[0].is_ok(), "{ok:?}");
        }
        // Equal repeated lengths are one length.
        let (heads, _) = heads_in_pieces(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\n",
            &[],
        );
        assert_eq!(heads[0].as_ref().unwrap().framing, Framing::Length(2));
        // Too many lines, and too many bytes (complete or not).
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        let (heads, _) = heads_in_pieces(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), &[]);
        assert_eq!(heads[0].as_ref().err(), Some(&HeadError::TooLarge));
        let big = "a".repeat(5000);
        let (heads, _) = heads_in_pieces(
            format!("GET / HTTP/1.1\r\nx: {big}\r\n\r\n").as_bytes(),
            &[],
        );
        assert_eq!(heads[0].as_ref().err(), Some(&HeadError::TooLarge));
        let (heads, _) = heads_in_pieces(format!("GET / HTTP/1.1\r\nx: {big}").as_bytes(), &[]);
        assert_eq!(heads[0].as_ref().err(), Some(&HeadError::TooLarge));
    }

    proptest! {
        #[test]
        fn any_split_of_the_input_gives_the_same_heads(cuts in prop::collection::vec(0usize..400, 0..24)) {
            let (whole, whole_rest) = heads_in_pieces(PIPELINE, &[]);
            let (split, split_rest) = heads_in_pieces(PIPELINE, &cuts);
            let a: Vec<String> = whole.iter().map(summary).collect();
            let b: Vec<String> = split.iter().map(summary).collect();
            prop_assert_eq!(a, b);
            prop_assert_eq!(whole_rest, split_rest);
        }

        #[test]
        fn garbage_never_panics_the_parsers(input in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = heads_in_pieces(&input, &[7, 100]);
        }
    }

    fn head_of(
        status: u16,
        headers: &[(&str, &str)],
        hint: SizeHint,
        head_request: bool,
        version: Version,
        keep_alive: bool,
    ) -> (String, Out, bool) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut dst = Vec::new();
        let mut keep = keep_alive;
        let out = encode_head(
            &mut dst,
            StatusCode::from_u16(status).unwrap(),
            &map,
            &hint,
            head_request,
            version,
            &mut keep,
        );
        (String::from_utf8(dst).unwrap(), out, keep)
    }

    fn conn_with_continue(io: tokio::io::DuplexStream) -> Conn<tokio::io::DuplexStream> {
        Conn {
            io,
            rbuf: BytesMut::new(),
            seq: 0,
            rest: Rest::None,
            alive: true,
            cont: Some(0),
            responded: false,
            progress: 0,
            waiter: None,
            reader: None,
            abandon: None,
        }
    }

    #[tokio::test]
    async fn a_partly_written_100_continue_is_finished_before_the_response() {
        // The socket takes 8 bytes of the interim response, then the final response starts.
        let (ours, mut peer) = tokio::io::duplex(8);
        let mut c = conn_with_continue(ours);
        let first = poll_fn(|cx| Poll::Ready(c.poll_continue(cx))).await;
        assert!(first.is_pending());
        assert_eq!(c.cont, Some(8));
        let rest = c.start_response();
        assert_eq!(rest, Some(&CONTINUE[8..]));
        // Later polls of the body write no more of it (the response does).
        let again = poll_fn(|cx| Poll::Ready(c.poll_continue(cx))).await;
        assert!(matches!(again, Poll::Ready(Ok(()))));
        let mut got = [0u8; 8];
        tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, &CONTINUE[..8]);

        // Begun but the client sent body bytes anyway: it is still finished, not dropped midway.
        let (ours, mut peer) = tokio::io::duplex(8);
        let mut c = conn_with_continue(ours);
        let _ = poll_fn(|cx| Poll::Ready(c.poll_continue(cx))).await;
        c.rbuf.extend_from_slice(b"body");
        let mut all = Vec::new();
        let reading = async {
            let mut buf = [0u8; 64];
            while all.len() < CONTINUE.len() {
                let n = tokio::io::AsyncReadExt::read(&mut peer, &mut buf)
                    .await
                    .unwrap();
                all.extend_from_slice(&buf[..n]);
            }
        };
        let writing = poll_fn(|cx| c.poll_continue(cx));
        let both = async { tokio::join!(writing, reading) };
        let (w, ()) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the rest of the interim response is written");
        w.unwrap();
        assert_eq!(all, CONTINUE);
        assert_eq!(c.cont, None);

        // Never begun: nothing of it goes out, and the connection must close after the response.
        let (ours, _peer) = tokio::io::duplex(64);
        let mut c = conn_with_continue(ours);
        assert_eq!(c.start_response(), Some(&b""[..]));
        let (ours, _peer) = tokio::io::duplex(64);
        let mut c = conn_with_continue(ours);
        c.cont = None;
        assert_eq!(c.start_response(), None);
    }

    #[test]
    fn response_framing() {
        let v11 = Version::HTTP_11;
        let (h, out, keep) = head_of(
            200,
            &[("x-a", "1")],
            SizeHint::with_exact(5),
            false,
            v11,
            true,
        );
        assert!(
            h.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "),
            "{h}"
        );
        assert!(h.ends_with(" GMT\r\n\r\n"), "{h}");
        assert_eq!((out, keep), (Out::Length(5), true));
        // Unknown length: chunked for HTTP/1.1, close-delimited for HTTP/1.0.
        let (h, out, _) = head_of(200, &[], SizeHint::new(), false, v11, true);
        assert!(h.contains("transfer-encoding: chunked\r\n"));
        assert_eq!(out, Out::Chunked);
        let (h, out, keep) = head_of(200, &[], SizeHint::new(), false, Version::HTTP_10, true);
        assert!(h.contains("connection: close\r\n") && !h.contains("transfer-encoding"));
        assert_eq!((out, keep), (Out::Close, false));
        // HTTP/1.0 keep-alive is said; the upstream's content-length frames an inexact body.
        let (h, out, keep) = head_of(
            200,
            &[("content-length", "7")],
            SizeHint::new(),
            false,
            Version::HTTP_10,
            true,
        );
        assert!(
            h.contains("content-length: 7\r\nconnection: keep-alive\r\n"),
            "{h}"
        );
        assert_eq!((out, keep), (Out::Length(7), true));
        // No body: HEAD keeps the length, 204 drops it, 304 keeps it.
        let (h, out, _) = head_of(
            200,
            &[("content-length", "9")],
            SizeHint::with_exact(0),
            true,
            v11,
            true,
        );
        assert!(h.contains("content-length: 9\r\n"));
        assert_eq!(out, Out::Empty);
        let (h, out, _) = head_of(
            204,
            &[("content-length", "0")],
            SizeHint::with_exact(0),
            false,
            v11,
            true,
        );
        assert!(!h.contains("content-length") && h.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert_eq!(out, Out::Empty);
        // The handler's `connection: close` closes; a date already there is kept.
        let (h, _, keep) = head_of(
            431,
            &[
                ("connection", "close"),
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            SizeHint::with_exact(0),
            false,
            v11,
            true,
        );
        assert!(!keep);
        assert_eq!(h.matches("connection: close").count(), 1);
        assert_eq!(h.matches("date: ").count(), 1);
    }
}
