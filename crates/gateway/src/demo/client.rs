//! A minimal HTTP/1.1 keep-alive client over one connection, for the load loop and the admin poller.
//!
//! The demo measures the gateway, so the client is deliberately plain: one connection per worker,
//! reused while the server keeps it open, re-dialled when it closes. A request is re-sent once only when
//! hyper reports it was never written (the connection closed under it); any other failure is reported
//! to the caller, who counts it as an error the client saw.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, HOST};
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A response with its body read in full.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// Why a request got no response.
#[derive(Debug)]
pub enum ClientError {
    /// Could not connect (refused, unreachable).
    Connect(std::io::Error),
    /// The HTTP exchange failed (reset, malformed response, connection closed mid-response).
    Http(hyper::Error),
    /// The request could not be built (an invalid path).
    Request(hyper::http::Error),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(err) => write!(f, "connect failed: {err}"),
            ClientError::Http(err) => write!(f, "http error: {err}"),
            ClientError::Request(err) => write!(f, "invalid request: {err}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect(err) => Some(err),
            ClientError::Http(err) => Some(err),
            ClientError::Request(err) => Some(err),
        }
    }
}

/// One keep-alive HTTP/1.1 connection to `addr`, dialled lazily and re-dialled when closed.
#[derive(Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    host: HeaderValue,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl HttpClient {
    /// A client for `addr`; nothing is dialled until the first request.
    pub fn new(addr: SocketAddr) -> HttpClient {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1"));
        HttpClient {
            addr,
            host,
            sender: None,
        }
    }

    /// The address requests go to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(&mut self) -> Result<SendRequest<Empty<Bytes>>, ClientError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(ClientError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        // The connection task ends when the server closes the connection or the sender is dropped;
        // its error, if any, surfaces on the next request through `SendRequest`.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// `GET path` on the kept-alive connection (dialling first if needed) and read the whole body.
    pub async fn get(&mut self, path: &str) -> Result<ClientResponse, ClientError> {
        let mut fresh = false;
        loop {
            let mut sender = match self.sender.take() {
                Some(sender) if !sender.is_closed() => sender,
                _ => {
                    fresh = true;
                    self.connect().await?
                }
            };
            let req = Request::get(path)
                .header(HOST, self.host.clone())
                .body(Empty::new())
                .map_err(ClientError::Request)?;
            if let Err(err) = sender.ready().await {
                if fresh {
                    return Err(ClientError::Http(err));
                }
                // A reused connection the server had closed: dial again.
                continue;
            }
            match sender.send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = body.collect().await.map_err(ClientError::Http)?.to_bytes();
                    self.sender = Some(sender);
                    return Ok(ClientResponse {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                    });
                }
                // Never written to the wire (the connection closed first): safe to send once more.
                Err(err) if err.is_canceled() && !fresh => continue,
                Err(err) => return Err(ClientError::Http(err)),
            }
        }
    }
}
