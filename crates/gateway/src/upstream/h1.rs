//! A lean HTTP/1.1 client connection for the upstream side, on `httparse`.
//!
//! Why not hyper's client: hyper's `client::conn::http1` is a connection task fed by a request
//! channel, answering through a oneshot and streaming the body through another channel, with a
//! generic encoder and a parser that serves every use. For a proxy that sends one request at a time
//! on a keep-alive connection and forwards the response as it comes, most of that is overhead: it
//! was about a third of the gateway's user-space instructions per proxied request.
//!
//! Here a connection is a `TcpStream`, a read buffer and a write buffer, and all I/O is done by
//! whoever polls: the request's future writes the request and reads the response head
//! ([`Io::poll_exchange`]), then the response body ([`RecvBody`]) reads the rest. No task, no
//! channel. The request head (and a small body) goes out in one `write`; the response head is parsed
//! with `httparse` and its header values are slices of the read buffer; body data is handed on as
//! slices of it too (no copy), as soon as it arrives (server-sent events are never held back to
//! fill a buffer).
//!
//! Streamed request bodies (not buffered by the proxy) are not sent here: they need a full-duplex
//! exchange and client-body error classes, which hyper's client provides (see `pool`).
//!
//! The socket is a [`Stream`]: plain TCP, driven through tokio's readiness API as described above
//! (the path the benchmarks measure), or TLS (`https://` endpoints), driven through the
//! `AsyncRead`/`AsyncWrite` poll methods of `tokio-rustls` (a request is flushed once written,
//! so no part of it waits in the TLS layer's buffer). Each I/O function picks its branch once, on
//! entry.

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use http_body::SizeHint;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::chunked;

/// Most header lines accepted in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Largest response head accepted (status line and headers). Generous for real upstreams; a head
/// over it is a broken or hostile upstream (a 502 for the client).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Read buffer size for a response head: one allocation per connection, reused for every response
/// whose data the listener has already let go of.
const HEAD_BUF: usize = 8 * 1024;
/// Read size for body data.
const BODY_BUF: usize = 16 * 1024;
/// Less spare room than this in the read buffer and it grows before a read.
const MIN_SPARE: usize = 1024;

/// How much of a chunked body [`RecvBody::prefetch`] looks at: a first chunk-size line, with room
/// for a short extension.
const PEEK: usize = 64;
/// A request body up to this size is copied behind the head (one `write`); a larger one is
/// written from its own buffer (`writev`).
const COPY_BODY_MAX: usize = 16 * 1024;

/// A failure of an upstream HTTP/1 exchange.
#[derive(Debug)]
pub(crate) enum Error {
    /// A socket error.
    Io(io::Error),
    /// The upstream closed the connection before the message ended.
    Closed,
    /// A malformed or oversized response.
    Invalid(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "upstream connection error: {e}"),
            Error::Closed => f.write_str("upstream closed the connection before the message ended"),
            Error::Invalid(what) => write!(f, "invalid upstream response: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// How sending a request failed.
#[derive(Debug)]
pub(crate) struct SendFail {
    /// Not a byte of the request was written: safe to send again on another connection.
    pub(crate) unsent: bool,
    /// Not a byte of a response came before the connection failed.
    pub(crate) unanswered: bool,
    pub(crate) error: Error,
}

/// A connection to an endpoint: plain TCP or TLS over TCP.
#[derive(Debug)]
pub(crate) enum Stream {
    /// `http://`.
    Tcp(TcpStream),
    /// `https://`; boxed because the TLS state is large (kilobytes of buffers and keys), and a
    /// plain connection should not carry its size.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// One HTTP/1.1 connection to an upstream.
#[derive(Debug)]
pub(crate) struct Io {
    stream: Stream,
    rbuf: BytesMut,
    /// The request head (and a small body) being written; kept for the next request.
    wbuf: Vec<u8>,
}

/// One request being written and its response head being read.
#[derive(Debug)]
pub(crate) struct Exchange {
    /// A body too large to copy behind the head (empty otherwise).
    body: Bytes,
    written: usize,
    write_done: bool,
    head_request: bool,
    /// The request asks to switch protocols (it carries `Upgrade`): a 101 is its answer.
    upgrade: bool,
}

impl Exchange {
    /// Whether the whole request was written.
    pub(crate) fn write_done(&self) -> bool {
        self.write_done
    }
}

/// A parsed response head and how its body is framed.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) response: Response<()>,
    pub(crate) decoder: Decoder,
    /// The upstream keeps the connection open after this response.
    pub(crate) keep_alive: bool,
}

impl Io {
    /// A connection on `stream` (already connected, `TCP_NODELAY` set and any TLS handshake done by
    /// the caller).
    pub(crate) fn new(stream: Stream) -> Self {
        Io {
            stream,
            rbuf: BytesMut::with_capacity(HEAD_BUF),
            wbuf: Vec::new(),
        }
    }

    /// The socket, for a protocol implementation that takes it over.
    pub(crate) fn into_stream(self) -> Stream {
        self.stream
    }

    /// The socket and what was read from it past the last response head (after a 101).
    pub(crate) fn into_parts(self) -> (Stream, Bytes) {
        (self.stream, self.rbuf.freeze())
    }

    /// Whether this idle connection can no longer carry a request: the upstream closed it (or sent
    /// something unasked). Costs no system call unless the reactor saw the socket readable: then
    /// one non-blocking read tells a close (or data) from a stale readiness. Over TLS the read goes
    /// through the TLS layer (which reads the socket only when the reactor saw it readable): a
    /// `close_notify`, an end of stream, an error or application data all mean stale; TLS records
    /// without data (a TLS 1.3 session ticket) are consumed and leave it good.
    pub(crate) fn is_stale(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let stream = match &mut self.stream {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => {
                let mut b = [0u8; 1];
                let mut buf = ReadBuf::new(&mut b);
                return Pin::new(&mut **s).poll_read(&mut cx, &mut buf).is_ready();
            }
        };
        match stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut b = [0u8; 1];
                !matches!(stream.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Encodes the request head of `parts` (its headers as given, plus the framing) and `body` for
    /// [`Io::poll_exchange`].
    ///
    /// Framing: a non-empty body gets `content-length` (replacing the client's, which matched it);
    /// an empty one keeps `content-length: 0` only if the request carried a `content-length`, as
    /// hyper's client did. `transfer-encoding` is never passed on (the body is sent whole).
    pub(crate) fn start(&mut self, parts: &Parts, body: Option<&Bytes>) -> Exchange {
        let len = body.map_or(0, Bytes::len);
        let w = &mut self.wbuf;
        w.clear();
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        w.extend_from_slice(parts.method.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(target.as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        let (mut had_length, mut upgrade) = (false, false);
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH {
                had_length = true;
                continue;
            }
            if name == header::TRANSFER_ENCODING {
                continue;
            }
            upgrade |= name == header::UPGRADE;
            crate::proxy::h1::put_field(w, name, value);
        }
        if len > 0 || had_length {
            w.extend_from_slice(b"content-length: ");
            w.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        w.extend_from_slice(b"\r\n");
        let body = match body {
            Some(b) if b.len() > COPY_BODY_MAX => b.clone(),
            Some(b) => {
                w.extend_from_slice(b);
                Bytes::new()
            }
            None => Bytes::new(),
        };
        Exchange {
            body,
            written: 0,
            write_done: false,
            head_request: parts.method == Method::HEAD,
            upgrade,
        }
    }

    /// Writes the request of `ex` and reads its response head. While the socket cannot take more of
    /// the request, the response is read meanwhile: an upstream may answer before the request ended
    /// (then the connection is not reused).
    pub(crate) fn poll_exchange(
        &mut self,
        ex: &mut Exchange,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Head, SendFail>> {
        if !ex.write_done {
            match self.poll_write_request(ex, cx) {
                Poll::Ready(Ok(())) => ex.write_done = true,
                Poll::Ready(Err(e)) => {
                    // An upstream that answers before it read the whole request (an early 413 or
                    // 401) and closes with input unread resets the connection, and the write
                    // fails; its answer may be in already. Then it is the exchange's response
                    // (the connection is not reused: the request was not all written).
                    if ex.written > 0 {
                        if let Some(head) = self.answer_in_already(ex, cx) {
                            return Poll::Ready(Ok(head));
                        }
                    }
                    return Poll::Ready(Err(SendFail {
                        unsent: ex.written == 0,
                        unanswered: self.rbuf.is_empty(),
                        error: Error::Io(e),
                    }));
                }
                Poll::Pending => {}
            }
        }
        let fail = |error, unanswered| {
            Poll::Ready(Err(SendFail {
                unsent: false,
                unanswered,
                error,
            }))
        };
        loop {
            match parse_head(&mut self.rbuf, ex.head_request, ex.upgrade) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(e) => return fail(e, false),
            }
            match ready!(self.poll_fill(cx, HEAD_BUF)) {
                Ok(0) => return fail(Error::Closed, self.rbuf.is_empty()),
                Ok(_) => {}
                Err(e) => return fail(Error::Io(e), self.rbuf.is_empty()),
            }
        }
    }

    /// A whole response head among what the connection has received, if there is one now (read
    /// without waiting).
    fn answer_in_already(&mut self, ex: &Exchange, cx: &mut Context<'_>) -> Option<Head> {
        loop {
            if let Ok(Some(head)) = parse_head(&mut self.rbuf, ex.head_request, ex.upgrade) {
                return Some(head);
            }
            match self.poll_fill(cx, HEAD_BUF) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    fn poll_write_request(
        &mut self,
        ex: &mut Exchange,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let Io { stream, wbuf, .. } = self;
        let stream = match stream {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => return poll_write_tls(s, wbuf, ex, cx),
        };
        let head = wbuf.len();
        loop {
            if ex.written >= head + ex.body.len() {
                return Poll::Ready(Ok(()));
            }
            // Written straight away: the socket is almost always writable, and tokio tells when it
            // is not (`WouldBlock`), so readiness is only awaited when the send buffer is full.
            let r = if ex.written < head {
                if ex.body.is_empty() {
                    stream.try_write(&wbuf[ex.written..])
                } else {
                    let bufs = [IoSlice::new(&wbuf[ex.written..]), IoSlice::new(&ex.body)];
                    stream.try_write_vectored(&bufs)
                }
            } else {
                stream.try_write(&ex.body[ex.written - head..])
            };
            match r {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => ex.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(stream.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads what the socket has into the read buffer (growing it by `want` when little room is
    /// left); `Ok(0)` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < MIN_SPARE {
            self.rbuf.reserve(want);
        }
        let Io { stream, rbuf, .. } = self;
        let stream = match stream {
            Stream::Tcp(s) => s,
            // The TLS layer reads the socket into its own buffer and decrypts into `rbuf`; its
            // socket reads clear the readiness as tokio's `AsyncRead` does (see below).
            Stream::Tls(s) => {
                // A fresh `read_buf` per poll: it holds no state between polls (cancel-safe).
                let read = std::pin::pin!(s.read_buf(rbuf));
                return read.poll(cx);
            }
        };
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let spare = rbuf.capacity() - rbuf.len();
            let mut got = None;
            // A read that did not fill the buffer drained the socket: report "would block" to the
            // reactor (as tokio's own `AsyncRead` does) so its readiness is cleared. Then an idle
            // pooled connection is seen readable again only when the upstream closes it (or
            // sends), and the checkout needs no system call to know it is still good.
            let r = stream.try_io(Interest::READABLE, || {
                let n = stream.try_read_buf(rbuf)?;
                got = Some(n);
                if n > 0 && n < spare {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match (got, r) {
                (Some(n), _) => return Poll::Ready(Ok(n)),
                (None, Err(e)) if e.kind() != io::ErrorKind::WouldBlock => {
                    return Poll::Ready(Err(e))
                }
                (None, _) => {}
            }
        }
    }
}

/// [`Io::poll_write_request`] over TLS: the same request, through `AsyncWrite`, then flushed (the
/// TLS layer may hold records it could not yet hand to the socket).
fn poll_write_tls(
    s: &mut TlsStream<TcpStream>,
    wbuf: &[u8],
    ex: &mut Exchange,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let head = wbuf.len();
    let mut s = Pin::new(s);
    while ex.written < head + ex.body.len() {
        let r = if ex.written < head {
            if ex.body.is_empty() {
                s.as_mut().poll_write(cx, &wbuf[ex.written..])
            } else {
                let bufs = [IoSlice::new(&wbuf[ex.written..]), IoSlice::new(&ex.body)];
                s.as_mut().poll_write_vectored(cx, &bufs)
            }
        } else {
            s.as_mut().poll_write(cx, &ex.body[ex.written - head..])
        };
        match ready!(r)? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            n => ex.written += n,
        }
    }
    s.poll_flush(cx)
}

/// Where one parsed header line lies in the head: name and value ranges.
type Span = (u32, u32, u32, u32);

/// Parses a response head at the start of `buf`, skipping interim (1xx) responses; `Ok(None)`: more
/// bytes are needed. A 101 is final when the request asked for an `upgrade`, an error otherwise.
/// The head is split off `buf` (whatever follows is the body) and its header
/// values are slices of it. Hop-by-hop headers are dropped (the proxy would strip them anyway) and
/// read for framing and keep-alive; `Connection` stays only when it names other headers, for the
/// proxy's strip to remove them.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Option<Head>, Error> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        let mut spans: [Span; MAX_HEADERS] = [(0, 0, 0, 0); MAX_HEADERS];
        let (len, version, code, count) =
            {
                let mut headers =
                    [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
                let mut res = httparse::Response::new(&mut []);
                let len = match httparse::ParserConfig::default()
                    .parse_response_with_uninit_headers(&mut res, buf, &mut headers)
                {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) => {
                        if buf.len() > MAX_HEAD {
                            return Err(Error::Invalid("response head too large"));
                        }
                        return Ok(None);
                    }
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(Error::Invalid("too many response headers"))
                    }
                    Err(_) => return Err(Error::Invalid("malformed response head")),
                };
                if len > MAX_HEAD {
                    return Err(Error::Invalid("response head too large"));
                }
                let base = buf.as_ptr() as usize;
                let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
                for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
                    let (n, v) = (at(h.name.as_bytes()), at(h.value));
                    *span = (n, n + h.name.len() as u32, v, v + h.value.len() as u32);
                }
                (len, res.version, res.code, res.headers.len())
            };
        let code = code.unwrap_or(0);
        if (100..200).contains(&code) && !(code == 101 && upgrade) {
            if code == 101 {
                return Err(Error::Invalid("unexpected protocol switch"));
            }
            // An interim response (100 Continue, 103 Early Hints): the final one follows.
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("bad status code"))?;
        let head = buf.split_to(len).freeze();
        return build_head(&head, &spans[..count], version, status, head_request).map(Some);
    }
}

fn build_head(
    head: &Bytes,
    spans: &[Span],
    version: Option<u8>,
    status: StatusCode,
    head_request: bool,
) -> Result<Head, Error> {
    let http10 = version == Some(0);
    let mut map = HeaderMap::with_capacity(spans.len());
    let mut length: Option<u64> = None;
    let (mut te, mut chunked, mut close, mut keep_alive_token) = (false, false, false, false);
    // Transfer codings listed, on all lines (`identity`, obsolete, aside).
    let mut codings = 0u32;
    // A 101 keeps its `Upgrade` (the protocol the connection switches to) in the map.
    let switch = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut upgrade = false;
    for &(ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| Error::Invalid("bad header name"))?;
        let raw = &head[vs as usize..ve as usize];
        match name.as_str() {
            "content-length" => {
                let n = parse_content_length(raw)?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Invalid("conflicting content-length"));
                }
                if length.is_some() {
                    continue;
                }
                length = Some(n);
                if !raw.iter().all(u8::is_ascii_digit) {
                    // One number, whatever the upstream wrote (`5, 5` is valid in HTTP/1.1, RFC
                    // 9112 6.3; an HTTP/2 client takes it as malformed). A plain number is kept
                    // as it came (no allocation).
                    map.append(name, HeaderValue::from(n));
                    continue;
                }
            }
            "transfer-encoding" => {
                te = true;
                scan_codings(raw, &mut codings, &mut chunked);
                continue;
            }
            "connection" => {
                let mut other = false;
                for token in raw.split(|&b| b == b',') {
                    let t = token.trim_ascii();
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_token = true;
                    } else if !t.is_empty() {
                        other = true;
                    }
                }
                if !other {
                    continue;
                }
            }
            "upgrade" => {
                if !switch || upgrade {
                    continue;
                }
                upgrade = true;
            }
            "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "proxy-authenticate"
            | "proxy-authorization" => continue,
            _ => {}
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| Error::Invalid("bad header value"))?;
        map.append(name, value);
    }
    // An HTTP/1.0 message with `transfer-encoding` has faulty framing (RFC 9112 6.1): an HTTP/1.0
    // peer may not end it where we do, so the connection is closed after it.
    let mut keep_alive = !close && (!http10 || (keep_alive_token && !te));
    let code = status.as_u16();
    let decoder = if switch {
        // What follows is the new protocol's, not a body.
        if !upgrade {
            return Err(Error::Invalid("101 without Upgrade"));
        }
        keep_alive = false;
        Decoder::length(0)
    } else if head_request || code == 204 || code == 304 {
        Decoder::length(0)
    } else if te {
        if codings > 1 || (codings == 1 && !chunked) {
            // Only `chunked` is decoded, and `transfer-encoding` is not passed on (hop-by-hop):
            // another coding (gzip) would reach the client as the body's raw bytes, labelled as
            // nothing.
            return Err(Error::Invalid("unsupported transfer-coding"));
        }
        if length.is_some() {
            // Both: transfer-encoding wins (RFC 9112 6.3), and the message may be a smuggling
            // attempt, so the connection is not reused; the length is not passed on.
            keep_alive = false;
            map.remove(header::CONTENT_LENGTH);
        }
        if chunked {
            Decoder::chunked()
        } else {
            keep_alive = false;
            Decoder::close()
        }
    } else if let Some(n) = length {
        Decoder::length(n)
    } else {
        keep_alive = false;
        Decoder::close()
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = if http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *response.headers_mut() = map;
    Ok(Head {
        response,
        decoder,
        keep_alive,
    })
}

/// A `content-length` value: digits, or a list of identical ones.
/// The framing rules [`build_head`] applies, for a response head another client parsed (hyper's,
/// for streamed uploads): only `chunked` as a transfer coding (another one, gzip, would reach the
/// client as raw bytes labelled as nothing); with `transfer-encoding`, no `content-length` (the
/// coding framed the body, RFC 9112 6.3); a `content-length` list (`5, 5`, or two equal lines)
/// made one number, since an HTTP/2 client takes a list as malformed. Conflicting lengths are an
/// error too (hyper refuses them already). And a 101: the request offered no upgrade (a streamed
/// upload never does), so it is an error, as in `read_head`.
pub(crate) fn vet_framing(status: StatusCode, h: &mut HeaderMap) -> Result<(), Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Error::Invalid("unexpected protocol switch"));
    }
    if status == 204 || status == 304 {
        // No body whatever the head says (as `build_head`), and a 304's length is the
        // representation's.
        return Ok(());
    }
    let mut codings = 0u32;
    let mut chunked = false;
    for v in h.get_all(header::TRANSFER_ENCODING) {
        scan_codings(v.as_bytes(), &mut codings, &mut chunked);
    }
    if codings > 1 || (codings == 1 && !chunked) {
        return Err(Error::Invalid("unsupported transfer-coding"));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
        return Ok(());
    }
    let mut all = h.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = all.next() else {
        return Ok(());
    };
    let n = parse_content_length(first.as_bytes())?;
    let mut single = first.as_bytes().iter().all(u8::is_ascii_digit);
    for v in all {
        single = false;
        if parse_content_length(v.as_bytes())? != n {
            return Err(Error::Invalid("conflicting content-length"));
        }
    }
    if !single {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(())
}

/// Counts the transfer codings a `transfer-encoding` line lists into `codings` (`identity`,
/// obsolete, aside) and sets `chunked` to whether the last one is `chunked`: over all lines, the
/// final coding is the last one listed (of the last line).
#[inline]
fn scan_codings(raw: &[u8], codings: &mut u32, chunked: &mut bool) {
    for t in raw.split(|&b| b == b',') {
        let t = t.trim_ascii();
        if !t.is_empty() && !t.eq_ignore_ascii_case(b"identity") {
            *codings += 1;
            *chunked = t.eq_ignore_ascii_case(b"chunked");
        }
    }
}

fn parse_content_length(raw: &[u8]) -> Result<u64, Error> {
    let bad = Error::Invalid("bad content-length");
    let mut value: Option<u64> = None;
    for part in raw.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(bad);
        }
        let n = part
            .iter()
            .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
        if value.is_some_and(|v| v != n) {
            return Err(bad);
        }
        value = Some(n);
    }
    value.ok_or(bad)
}

/// What decoding produced (the chunked decoder's items; `Trailers` only from a chunked body).
pub(crate) use crate::chunked::Item;

#[derive(Debug)]
enum Kind {
    Length(u64),
    /// Chunked, its trailers kept.
    Chunked(chunked::Decoder),
    /// Delimited by the end of the connection.
    Close,
    Done,
}

/// A response body decoder over the connection's read buffer.
#[derive(Debug)]
pub(crate) struct Decoder {
    kind: Kind,
}

impl Decoder {
    /// A body of exactly `n` bytes.
    pub(crate) fn length(n: u64) -> Self {
        Decoder {
            kind: if n == 0 { Kind::Done } else { Kind::Length(n) },
        }
    }
    /// A chunked body.
    pub(crate) fn chunked() -> Self {
        Decoder {
            kind: Kind::Chunked(chunked::Decoder::new(chunked::Trailers::Keep)),
        }
    }
    /// A body that ends with the connection.
    pub(crate) fn close() -> Self {
        Decoder { kind: Kind::Close }
    }

    /// Whether the body has ended.
    pub(crate) fn is_end(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            Kind::Length(n) => SizeHint::with_exact(n),
            Kind::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// Decodes the next item from `buf` (`eof`: the connection has ended and `buf` holds all that
    /// is left); `Ok(None)`: more bytes are needed. Data is split off `buf` as soon as any is there.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Option<Item>, Error> {
        match &mut self.kind {
            Kind::Done => Ok(Some(Item::End)),
            Kind::Length(rem) => {
                if buf.is_empty() {
                    return if eof { Err(Error::Closed) } else { Ok(None) };
                }
                let n = (*rem).min(buf.len() as u64);
                *rem -= n;
                if *rem == 0 {
                    self.kind = Kind::Done;
                }
                Ok(Some(Item::Data(buf.split_to(n as usize).freeze())))
            }
            Kind::Close => {
                if !buf.is_empty() {
                    Ok(Some(Item::Data(buf.split().freeze())))
                } else if eof {
                    self.kind = Kind::Done;
                    Ok(Some(Item::End))
                } else {
                    Ok(None)
                }
            }
            Kind::Chunked(d) => {
                let item = d.decode(buf, eof).map_err(|e| match e {
                    chunked::Error::Eof => Error::Closed,
                    chunked::Error::Invalid(what) => Error::Invalid(what),
                })?;
                // The end is known with the last data or trailers (see `chunked`).
                if d.is_end() {
                    self.kind = Kind::Done;
                }
                Ok(item)
            }
        }
    }
}

/// A response body read from an upstream HTTP/1 connection by whoever polls it. The connection is
/// closed when the body is dropped, unless [`RecvBody::take_conn`] took it back for the pool.
#[derive(Debug)]
pub(crate) struct RecvBody {
    /// `None` once failed (or taken back).
    io: Option<Box<Io>>,
    dec: Decoder,
    keep_alive: bool,
    eof: bool,
    /// The rest of the request, when the upstream answered before it was all written: written
    /// while the response is read (see [`RecvBody::finish_write`]). Boxed: it is rare, and a
    /// response body is moved several times on its way to the client (each byte of it costs).
    write: Option<Box<Exchange>>,
}

impl RecvBody {
    /// A body that has already ended (a 101's, whose connection went to a tunnel).
    pub(crate) fn ended() -> Self {
        RecvBody {
            io: None,
            dec: Decoder::length(0),
            keep_alive: false,
            eof: false,
            write: None,
        }
    }

    /// The body of `head`'s response on `io`; `keep_alive` says whether the connection may carry
    /// another request once it is read (the upstream keeps it open and the request was fully sent).
    pub(crate) fn new(io: Box<Io>, dec: Decoder, keep_alive: bool) -> Self {
        RecvBody {
            io: Some(io),
            dec,
            keep_alive,
            eof: false,
            write: None,
        }
    }

    /// The upstream answered before the request `ex` was all written (the socket could not take
    /// it at once): the rest is written while the response is read, as hyper's client, Envoy and
    /// nginx keep sending a body while its response streams (RFC 9112 9.3). An upstream that reads
    /// the body only after it began to answer (a streaming upload processor, an echo) gets all of
    /// it. A write that fails (an early 413 or 401, then a close) ends it: the rest goes nowhere,
    /// and the answer is still read. What is unwritten when the response ends is dropped with the
    /// connection (never reused after such an exchange).
    pub(crate) fn finish_write(&mut self, ex: Exchange) {
        if !ex.write_done {
            self.write = Some(Box::new(ex));
        }
    }

    /// Writes more of the request's rest, if any, without waiting (a full socket wakes the task
    /// when it can take more).
    fn poll_write_rest(&mut self, cx: &mut Context<'_>) {
        let (Some(io), Some(ex)) = (self.io.as_mut(), self.write.as_mut()) else {
            return;
        };
        match io.poll_write_request(ex, cx) {
            Poll::Ready(Ok(())) => self.write = None,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "the rest of the request could not be written after its answer began");
                self.write = None;
            }
            Poll::Pending => {}
        }
    }

    /// Checks, without waiting and without consuming anything, that the body is not broken from
    /// its first byte: a malformed first chunk-size line that came with the head, or a connection
    /// that ended (before the body did) or failed right after the head. Such a body is then the
    /// exchange's failure, which the attempt can retry and count, instead of a response whose head
    /// the client would get with nothing after it. Call it once, before the body is handed out.
    pub(crate) fn prefetch(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        let Some(io) = self.io.as_mut() else {
            return Ok(());
        };
        if matches!(self.dec.kind, Kind::Done) {
            return Ok(());
        }
        if io.rbuf.is_empty() {
            // Nothing of the body yet: a connection that already ended or failed shows now (a
            // read the body's first poll would make anyway; none when the readiness is clear).
            match io.poll_fill(cx, MIN_SPARE) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) | Poll::Pending => {}
                Poll::Ready(Err(e)) => return Err(self.fail(Error::Io(e))),
            }
        }
        let buffered = &io.rbuf;
        let broken = match &self.dec.kind {
            Kind::Length(_) if self.eof && buffered.is_empty() => Some(Error::Closed),
            // The first chunk-size line, checked on a copy by a decoder of its own.
            Kind::Chunked(_) => {
                let n = buffered.len().min(PEEK);
                let mut peek = BytesMut::from(&buffered[..n]);
                let eof = self.eof && n == buffered.len();
                match chunked::Decoder::new(chunked::Trailers::Discard).decode(&mut peek, eof) {
                    Err(chunked::Error::Eof) => Some(Error::Closed),
                    Err(chunked::Error::Invalid(what)) => Some(Error::Invalid(what)),
                    Ok(_) => None,
                }
            }
            _ => None,
        };
        match broken {
            Some(e) => Err(self.fail(e)),
            None => Ok(()),
        }
    }

    /// The connection, once the body was read to its end and the connection can be reused.
    pub(crate) fn take_conn(&mut self) -> Option<Box<Io>> {
        let reusable = self.keep_alive
            && !self.eof
            && self.dec.is_end()
            && self.io.as_ref().is_some_and(|io| io.rbuf.is_empty());
        if reusable {
            self.io.take()
        } else {
            None
        }
    }

    /// Polls the next piece of the body.
    pub(crate) fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Result<Item, Error>> {
        if self.write.is_some() {
            self.poll_write_rest(cx);
        }
        loop {
            let Some(io) = self.io.as_mut() else {
                return Poll::Ready(Ok(Item::End));
            };
            match self.dec.decode(&mut io.rbuf, self.eof) {
                Ok(Some(item)) => return Poll::Ready(Ok(item)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(self.fail(e))),
            }
            let want = match self.dec.kind {
                Kind::Length(n) => (n.min(BODY_BUF as u64 * 4) as usize).max(MIN_SPARE),
                _ => BODY_BUF,
            };
            match ready!(io.poll_fill(cx, want)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(self.fail(Error::Io(e)))),
            }
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        self.io = None;
        self.write = None;
        self.dec.kind = Kind::Done;
        self.keep_alive = false;
        e
    }

    /// Whether the body has ended.
    pub(crate) fn is_end_stream(&self) -> bool {
        self.dec.is_end()
    }

    /// Exact for a `content-length` body.
    pub(crate) fn size_hint(&self) -> SizeHint {
        self.dec.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in pieces cut at `cuts` and parses a head after each piece.
    fn head_in_pieces(input: &[u8], cuts: &[usize], head_request: bool) -> (Head, BytesMut) {
        let mut buf = BytesMut::new();
        let mut at = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        for p in points {
            buf.extend_from_slice(&input[at..p.max(at)]);
            at = p.max(at);
            if let Some(h) = parse_head(&mut buf, head_request, false).unwrap() {
                buf.extend_from_slice(&input[at..]);
                return (h, buf);
            }
        }
        panic!("head never complete");
    }

    /// Decodes `input` fed in pieces; the data joined, the trailers, and whether the body ended.
    fn decode_in_pieces(
        mut dec: Decoder,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, Option<HeaderMap>, BytesMut) {
        let mut buf = BytesMut::new();
        let mut at = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        let (mut data, mut trailers) = (Vec::new(), None);
        for p in points {
            buf.extend_from_slice(&input[at..p.max(at)]);
            at = p.max(at);
            loop {
                match dec.decode(&mut buf, false).unwrap() {
                    Some(Item::Data(d)) => {
                        assert!(!d.is_empty());
                        data.extend_from_slice(&d)
                    }
                    Some(Item::Trailers(t)) => trailers = Some(t),
                    Some(Item::End) => {
                        buf.extend_from_slice(&input[at..]);
                        return (data, trailers, buf);
                    }
                    None => break,
                }
            }
        }
        panic!("body never ended: {data:?}");
    }

    proptest! {
        #[test]
        fn a_head_parses_the_same_however_it_is_split(cuts in proptest::collection::vec(0usize..400, 0..8)) {
            let input = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nConnection: keep-alive, x-b\r\nX-B: 2\r\nKeep-Alive: timeout=5\r\n\r\nhello";
            let (h, rest) = head_in_pieces(input, &cuts, false);
            prop_assert_eq!(h.response.status(), 200);
            prop_assert_eq!(h.response.headers().get("x-a").unwrap(), "1");
            prop_assert_eq!(h.response.headers().get("content-length").unwrap(), "5");
            prop_assert!(h.response.headers().contains_key("connection"));
            prop_assert!(!h.response.headers().contains_key("keep-alive"));
            prop_assert!(h.keep_alive);
            prop_assert_eq!(&rest[..], b"hello");
        }

        #[test]
        fn a_length_body_decodes_the_same_however_it_is_split(
            body in proptest::collection::vec(any::<u8>(), 1..300),
            cuts in proptest::collection::vec(0usize..400, 0..10),
        ) {
            let mut input = body.clone();
            input.extend_from_slice(b"NEXT");
            let (data, _, rest) = decode_in_pieces(Decoder::length(body.len() as u64), &input, &cuts);
            prop_assert_eq!(data, body);
            prop_assert_eq!(&rest[..], b"NEXT");
        }
    }

    fn head(input: &[u8], head_request: bool) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(input), head_request, false)
    }

    #[test]
    fn the_end_of_a_chunked_body_is_known_with_its_last_data() {
        let mut dec = Decoder::chunked();
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n0\r\n\r\n"[..]);
        assert_eq!(
            dec.decode(&mut buf, false).unwrap(),
            Some(Item::Data(Bytes::from_static(b"hello")))
        );
        assert!(dec.is_end());
        assert!(buf.is_empty());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(h.decoder.is_end() && h.keep_alive, "HEAD: no body");
        for code in [204, 304] {
            let raw = format!("HTTP/1.1 {code} X\r\nContent-Length: 3\r\n\r\n");
            let h = head(raw.as_bytes(), false).unwrap().unwrap();
            assert!(h.decoder.is_end() && h.keep_alive, "{code}: no body");
        }
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert!(
            !h.keep_alive && matches!(h.decoder.kind, Kind::Close),
            "read to close"
        );
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(h.decoder.kind, Kind::Chunked(_)), "TE wins");
        assert!(!h.keep_alive);
        assert!(!h.response.headers().contains_key("content-length"));
        assert!(!h.response.headers().contains_key("transfer-encoding"));
        // Codings other than chunked are not decoded: an error, not a body passed on unlabelled.
        for raw in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert!(
                head(raw, false).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // (Not for a response without a body.)
        assert!(head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            true
        )
        .is_ok());
        // Obsolete `identity` is no coding: read to close.
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(h.decoder.kind, Kind::Close) && !h.keep_alive);
        let h = head(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive && !h.response.headers().contains_key("connection"));
        let h = head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        assert_eq!(h.response.version(), Version::HTTP_10);
        let h = head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive);
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(matches!(h.decoder.kind, Kind::Length(4)));
    }

    #[test]
    fn a_101_ends_the_exchange_only_for_an_upgrade_request() {
        let wire = &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n\x81\x00"[..];
        let mut buf = BytesMut::from(wire);
        let h = parse_head(&mut buf, false, true).unwrap().unwrap();
        assert_eq!(h.response.status(), 101);
        assert_eq!(h.response.headers().get("upgrade").unwrap(), "websocket");
        assert_eq!(
            h.response.headers().get("sec-websocket-accept").unwrap(),
            "x"
        );
        assert!(h.decoder.is_end() && !h.keep_alive);
        // What follows the head is the new protocol's, left for the tunnel.
        assert_eq!(&buf[..], b"\x81\x00");
        assert!(parse_head(&mut BytesMut::from(wire), false, false).is_err());
        // A 101 that names no protocol is not a switch.
        let bare = &b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n"[..];
        assert!(parse_head(&mut BytesMut::from(bare), false, true).is_err());
        // Other interim answers are still skipped.
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n"[..]);
        let h = parse_head(&mut buf, false, true).unwrap().unwrap();
        assert_eq!(h.response.status(), 426);
        assert!(h.response.headers().get("upgrade").is_none());
    }

    #[test]
    fn broken_heads_are_errors() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"FOO 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(
                head(raw, false).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(head(&many, false).is_err());
        let mut big = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert!(head(&big, false).is_err(), "an unfinished oversized head");
    }

    #[test]
    fn a_truncated_body_is_an_error_at_eof() {
        let mut dec = Decoder::length(10);
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert!(matches!(
            dec.decode(&mut buf, false),
            Ok(Some(Item::Data(_)))
        ));
        assert!(matches!(dec.decode(&mut buf, true), Err(Error::Closed)));
        let mut dec = Decoder::chunked();
        let mut buf = BytesMut::from(&b"5\r\nab"[..]);
        assert!(matches!(
            dec.decode(&mut buf, true),
            Ok(Some(Item::Data(_)))
        ));
        assert!(matches!(dec.decode(&mut buf, true), Err(Error::Closed)));
        let mut dec = Decoder::chunked();
        let mut buf = BytesMut::from(&b"zz\r\n"[..]);
        assert!(dec.decode(&mut buf, false).is_err());
    }

    /// What decoding the chunked body `wire` gives after its data.
    fn past_data(wire: &[u8]) -> Result<Option<Item>, Error> {
        let mut dec = Decoder::chunked();
        let mut buf = BytesMut::from(wire);
        loop {
            match dec.decode(&mut buf, false) {
                Ok(Some(Item::Data(_))) => continue,
                other => break other,
            }
        }
    }

    #[test]
    fn chunk_size_lines_httparse_takes_but_a_strict_peer_would_not_are_errors() {
        for wire in [
            &b"\r\n\r\n"[..],
            b";ext\r\n\r\n",
            b" 0\r\n\r\n",
            b"0;\n\r\n\r\n",
            b"3;a\x00b\r\nabc\r\n0\r\n\r\n",
        ] {
            let r = past_data(wire);
            assert!(r.is_err(), "{:?}: {r:?}", String::from_utf8_lossy(wire));
        }
        // Extensions and whitespace a strict peer reads the same way still pass.
        let (data, _, rest) = decode_in_pieces(
            Decoder::chunked(),
            b"3 ;a=\"b c\"\t\r\nabc\r\n0\r\n\r\n",
            &[],
        );
        assert_eq!((&data[..], &rest[..]), (&b"abc"[..], &b""[..]));
    }

    #[test]
    fn a_bare_lf_in_the_trailer_section_is_an_error() {
        for wire in [
            &b"3\r\nabc\r\n0\r\nx-t: 1\n\r\n"[..],
            b"3\r\nabc\r\n0\r\nx-t: 1\r\n\n",
            b"3\r\nabc\r\n0\r\n\n",
        ] {
            let r = past_data(wire);
            assert!(
                matches!(r, Err(Error::Invalid(_))),
                "{:?}: {r:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn a_request_is_framed_by_its_body() {
        let enc = |method: Method, cl: Option<&str>, body: Option<&[u8]>| {
            let mut req = http::Request::builder().method(method).uri("/p?q=1");
            req = req
                .header("host", "up")
                .header("transfer-encoding", "chunked");
            if let Some(cl) = cl {
                req = req.header("content-length", cl);
            }
            let (parts, ()) = req.body(()).unwrap().into_parts();
            let mut w = Vec::new();
            let body = body.map(Bytes::copy_from_slice);
            // No socket needed for encoding: reuse `start`'s logic through a scratch `Io`-less path.
            encode_for_test(&parts, body.as_ref(), &mut w);
            String::from_utf8(w).unwrap()
        };
        assert_eq!(
            enc(Method::GET, None, None),
            "GET /p?q=1 HTTP/1.1\r\nhost: up\r\n\r\n"
        );
        assert_eq!(
            enc(Method::POST, Some("3"), Some(b"abc")),
            "POST /p?q=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 3\r\n\r\nabc"
        );
        assert_eq!(
            enc(Method::POST, Some("0"), None),
            "POST /p?q=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(
            enc(Method::POST, None, None),
            "POST /p?q=1 HTTP/1.1\r\nhost: up\r\n\r\n"
        );
    }

    fn encode_for_test(parts: &Parts, body: Option<&Bytes>, out: &mut Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let mut io = Io::new(Stream::Tcp(s));
            let ex = io.start(parts, body);
            out.extend_from_slice(&io.wbuf);
            out.extend_from_slice(&ex.body);
        });
    }
}
