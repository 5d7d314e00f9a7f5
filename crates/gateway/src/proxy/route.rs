//! Routes at runtime: matching and per-route settings.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};

use super::respond::FallbackResponse;
use crate::config::{self, Mode, RetryOn};
use crate::policy::RoutePolicies;
use crate::upstream::headers::HeaderRules;

/// What a route matches; all conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    prefix: Option<Box<str>>,
    exact: Option<Box<str>>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Matcher {
    fn new(m: &config::Match) -> Result<Self, String> {
        let mut methods = Vec::new();
        for name in &m.methods {
            methods.push(Method::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?);
        }
        let mut headers = Vec::new();
        for (k, v) in &m.headers {
            headers.push((
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?,
                HeaderValue::from_str(v).map_err(|e| e.to_string())?,
            ));
        }
        // Compared with request paths whose unreserved characters are decoded: so are these.
        // (The config's check refuses a path with an invalid escape.)
        let path = |p: &str| -> Box<str> {
            match decode_unreserved(p) {
                Ok(Some(decoded)) => decoded.into(),
                _ => p.into(),
            }
        };
        Ok(Matcher {
            prefix: m.path_prefix.as_deref().map(path),
            exact: m.path.as_deref().map(path),
            methods,
            headers,
        })
    }

    /// Whether `req` matches.
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        if let Some(p) = &self.prefix {
            if !path.starts_with(&**p) {
                return false;
            }
        }
        if let Some(e) = &self.exact {
            if path != &**e {
                return false;
            }
        }
        if !self.methods.is_empty() && !self.methods.contains(req.method()) {
            return false;
        }
        self.headers.iter().all(|(k, v)| {
            let mut got = req.headers().get_all(k).iter();
            if *k == http::header::HOST {
                // A host in any case is the same host (RFC 9110 4.2.3), as nginx's `server_name`
                // and Envoy's `domains` take it.
                let same = |h: &[u8]| h.eq_ignore_ascii_case(v.as_bytes());
                if req.headers().get(k).is_none() {
                    // HTTP/2 carries the host in `:authority` (the URI), not in a `host` field.
                    return req
                        .uri()
                        .authority()
                        .is_some_and(|a| same(a.as_str().as_bytes()));
                }
                return got.any(|x| same(x.as_bytes()));
            }
            got.any(|x| x == v)
        })
    }
}

/// Retry conditions, as a small bit set plus listed statuses.
#[derive(Debug, Clone, Default)]
pub struct RetryConditions {
    connect_failure: bool,
    reset: bool,
    timeout: bool,
    any_5xx: bool,
    statuses: Vec<u16>,
}

impl RetryConditions {
    fn new(on: &[RetryOn]) -> Self {
        let mut c = RetryConditions::default();
        for o in on {
            match o {
                RetryOn::ConnectFailure => c.connect_failure = true,
                RetryOn::Reset => c.reset = true,
                RetryOn::Timeout => c.timeout = true,
                RetryOn::Server5xx => c.any_5xx = true,
                RetryOn::Status(s) => c.statuses.push(*s),
            }
        }
        c
    }
    /// The `reason` labels of the retries these conditions allow (see `bulwark_retry_attempts_total`).
    pub fn reasons(&self) -> impl Iterator<Item = &'static str> {
        let s = &self.statuses;
        let server = |c: &u16| crate::upstream::server_error(*c);
        [
            (self.connect_failure || self.reset, "upstream_error"),
            (self.timeout, "timeout"),
            (self.any_5xx || s.iter().any(server), "5xx"),
            (s.contains(&429), "429"),
            (s.iter().any(|c| *c != 429 && !server(c)), "status"),
        ]
        .into_iter()
        .filter_map(|(on, reason)| on.then_some(reason))
    }
    /// Whether a response with `status` is retryable.
    pub fn status(&self, status: u16) -> bool {
        (self.any_5xx && crate::upstream::server_error(status)) || self.statuses.contains(&status)
    }
    /// Whether a failure without response is retryable.
    pub fn fail(&self, kind: crate::upstream::FailKind) -> bool {
        use crate::upstream::FailKind::*;
        match kind {
            // Not processed either: the condition that resends what was never sent.
            ConnectFailure | Refused => self.connect_failure,
            Reset => self.reset,
            Timeout => self.timeout,
            // The attempt's own timer fired before anything was sent: retried under either.
            ConnectCut => self.timeout || self.connect_failure,
            ClientBody => false,
        }
    }
}

/// One route at runtime.
#[derive(Debug)]
pub struct Route {
    /// Name (metric label).
    pub name: Arc<str>,
    /// Match conditions.
    pub matcher: Matcher,
    /// Upstream indices: primary, then failover in order.
    pub chain: Vec<usize>,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Attempts per upstream (1 = no retry).
    pub attempts: u32,
    /// Per-attempt timeout.
    pub per_try_timeout: Option<Duration>,
    /// Retry conditions.
    pub retry_on: RetryConditions,
    /// Largest body kept for replay.
    pub retry_buffer: usize,
    /// Retry non-idempotent methods too.
    pub retry_non_idempotent: bool,
    /// Extra requests by hedging at most (0 = none); the hedge itself is in `policies`.
    pub max_hedges: u32,
    /// Static fallback.
    pub fallback: Option<FallbackResponse>,
    /// Budget, backoff, hedge, latency record.
    pub policies: RoutePolicies,
    /// Tunnel WebSocket upgrades.
    pub websocket: bool,
    /// `prefix_rewrite`: how many bytes of the path the match covers, and what replaces them.
    pub rewrite: Option<(usize, Box<str>)>,
    /// `request_headers`, when the section changes anything.
    pub request_headers: Option<HeaderRules>,
    /// `response_headers`, when the section changes anything.
    pub response_headers: Option<HeaderRules>,
    /// `exempt_modes`: the modes that do not apply to this route.
    pub exempt_modes: Vec<Mode>,
    /// `optional`: not served in `degraded` mode.
    pub optional: bool,
    /// `fault`, when it injects anything.
    pub fault: Option<crate::chaos::Fault>,
    /// `client_rate_limit`, when on.
    pub client_limit: Option<crate::admission::ClientLimit>,
    /// `priority` in the admission queue.
    pub priority: config::RoutePriority,
}

/// What an operating mode does to one request of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeAction {
    /// Served as usual.
    Serve,
    /// Served with one attempt per upstream: no retries, no hedges (`degraded`).
    NoRetries,
    /// Refused (503, or the route's fallback).
    Refuse,
}

impl Route {
    /// What `mode` does to `req` on this route.
    pub fn mode_action<B>(&self, mode: Mode, req: &Request<B>) -> ModeAction {
        if mode == Mode::Normal || self.exempt_modes.contains(&mode) {
            return ModeAction::Serve;
        }
        match mode {
            Mode::Normal => ModeAction::Serve,
            Mode::Maintenance => ModeAction::Refuse,
            // A WebSocket tunnel carries whatever the client sends, writes included.
            Mode::ReadOnly if is_safe(req.method()) && !self.tunnels(req) => ModeAction::Serve,
            Mode::ReadOnly => ModeAction::Refuse,
            Mode::Degraded if self.optional => ModeAction::Refuse,
            Mode::Degraded => ModeAction::NoRetries,
        }
    }

    /// Whether `req` would open a WebSocket tunnel on this route.
    pub(crate) fn tunnels<B>(&self, req: &Request<B>) -> bool {
        self.websocket
            && req
                .extensions()
                .get::<super::tunnel::UpgradeOffer>()
                .is_some_and(|o| o.is_websocket())
    }
}

/// The safe methods of RFC 9110 9.2.1, the ones `read_only` mode serves.
fn is_safe(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

impl Route {
    /// The request target sent upstream when the route rewrites it: `uri`'s path with the matched
    /// part replaced, and its query kept (origin form). `None` without `prefix_rewrite`, and for a
    /// path with a dot-segment (`.` or `..`, `%2e` spellings included): the upstream would resolve
    /// `/v1/../admin` to `/admin`, out of the prefix the route confines it to.
    pub fn rewritten(&self, uri: &http::Uri) -> Option<http::Uri> {
        let (matched, to) = self.rewrite.as_ref()?;
        let path = uri.path();
        if has_dot_segment(path) {
            return None;
        }
        let rest = path.get(*matched..).unwrap_or("");
        let query = uri.query();
        let mut target =
            String::with_capacity(to.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
        target.push_str(to);
        target.push_str(rest);
        // Nor one the rewrite makes: `/svc../admin` under `path_prefix: /svc` rewritten to `/v1/`.
        if has_dot_segment(&target) {
            return None;
        }
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        target.parse().ok()
    }
}

impl Route {
    /// Builds a route; `upstream_index` resolves names (validated before).
    pub fn new(
        i: usize,
        c: &config::Route,
        upstream_index: impl Fn(&str) -> Option<usize>,
    ) -> Result<Self, String> {
        Self::with_events(i, c, upstream_index, &None, Default::default())
    }

    /// Builds a route whose policies (the hedge) report events to `events`; with `budget`, the
    /// route keeps that retry budget (and its balance) instead of starting a new one.
    pub fn with_events(
        i: usize,
        c: &config::Route,
        upstream_index: impl Fn(&str) -> Option<usize>,
        events: &crate::policy::Events,
        carried: crate::policy::Carried<'_>,
    ) -> Result<Self, String> {
        let mut chain = Vec::with_capacity(1 + c.failover.len());
        for name in std::iter::once(&c.upstream).chain(&c.failover) {
            chain.push(upstream_index(name).ok_or_else(|| format!("unknown upstream `{name}`"))?);
        }
        let retry = c.retry.as_ref().filter(|r| r.enabled);
        let name: Arc<str> = c.name.clone().unwrap_or_else(|| format!("route{i}")).into();
        let policies = RoutePolicies::keeping(&name, retry, c.hedge.as_ref(), events, carried)
            .map_err(|e| format!("routes[{i}].{e}"))?;
        let headers = |section, key| {
            HeaderRules::new(section, crate::upstream::headers::process_env)
                .map_err(|r| format!("routes[{i}].{key}.{}: {}", r.entry, r.reason))
        };
        let fault = c.fault.as_ref().and_then(crate::chaos::Fault::new);
        if fault.is_some() {
            tracing::warn!(route = %name, "the route injects faults (its `fault` section)");
        }
        let client_limit = match c.client_rate_limit.as_ref().filter(|r| r.enabled) {
            Some(r) => Some(
                crate::admission::ClientLimit::new(r).map_err(|e| format!("routes[{i}].{e}"))?,
            ),
            None => None,
        };
        let request_headers = headers(&c.request_headers, "request_headers")?;
        let response_headers = headers(&c.response_headers, "response_headers")?;
        Ok(Route {
            request_headers,
            response_headers,
            name,
            matcher: Matcher::new(&c.matcher)?,
            chain,
            timeout: c.timeout.get(),
            attempts: retry.map_or(1, |r| r.attempts),
            per_try_timeout: retry.and_then(|r| r.per_try_timeout).map(|d| d.get()),
            retry_on: retry
                .map(|r| RetryConditions::new(&r.on))
                .unwrap_or_default(),
            retry_buffer: c.retry_buffer.as_usize(),
            retry_non_idempotent: c.retry_non_idempotent,
            max_hedges: c
                .hedge
                .as_ref()
                .filter(|h| h.enabled)
                .map_or(0, |h| h.max_hedges),
            fallback: c.fallback.as_ref().map(FallbackResponse::new),
            policies,
            websocket: c.websocket,
            exempt_modes: c.exempt_modes.clone(),
            optional: c.optional,
            fault,
            client_limit,
            priority: c.priority,
            rewrite: c.prefix_rewrite.as_ref().map(|to| {
                // The length of what the matcher compares: the path decoded as requests are.
                let matched = c.matcher.path_prefix.as_ref().or(c.matcher.path.as_ref());
                let len = matched.map_or(0, |m| match decode_unreserved(m) {
                    Ok(Some(decoded)) => decoded.len(),
                    _ => m.len(),
                });
                (len, to.as_str().into())
            }),
        })
    }
}

/// `path` with its percent-encoded unreserved characters (RFC 3986 2.3: letters, digits, `-`, `.`,
/// `_`, `~`) decoded, as RFC 3986 6.2.2.2 normalises them: `Ok(None)` when it has none (nearly
/// every path: no `%` at all). A server behind decodes them before it routes, so `/%61dmin` is
/// `/admin` there; the routes must judge that path, not one that dodges a prefix. `Err` for a `%`
/// not followed by two hex digits (an invalid target, which nginx refuses too): a decoding could
/// otherwise make a new escape of it (`/%%36%31dmin` would become `/%61dmin`).
#[inline]
pub(crate) fn decode_unreserved(path: &str) -> Result<Option<String>, InvalidEscape> {
    if !path.as_bytes().contains(&b'%') {
        return Ok(None);
    }
    decode_unreserved_in(path)
}

/// A `%` in a path not followed by two hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidEscape;

#[cold]
fn decode_unreserved_in(path: &str) -> Result<Option<String>, InvalidEscape> {
    fn hex(c: u8) -> Option<u8> {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut changed = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(InvalidEscape);
            };
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c);
                changed = true;
            } else {
                out.extend_from_slice(&b[i..i + 3]);
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes: still UTF-8.
    Ok(changed.then(|| String::from_utf8(out).ok()).flatten())
}

/// `uri` with `path` instead of its path (query, scheme and authority kept); `None` if that is no
/// valid URI.
pub(crate) fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// Whether `path` has a dot-segment (`.` or `..`) in any spelling a server behind might resolve:
/// `%2e` for a dot, a `;parameter` after it (`..;` to Tomcat and Jetty), and `\`, `%2f` or `%5c`
/// as a separator (servers that decode or normalise them first). Such a path would reach, upstream,
/// a resource other than the one the routes matched, past their policies.
#[inline]
pub(crate) fn has_dot_segment(path: &str) -> bool {
    // Nearly every path: no dot and no escape, nothing to look at.
    path.bytes().any(|c| c == b'.' || c == b'%') && dot_segment_in(path)
}

#[cold]
fn dot_segment_in(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/")
        .split('/')
        .any(|seg| {
            let seg = seg.split(';').next().unwrap_or("");
            let seg = seg.replace("%2e", ".");
            seg == "." || seg == ".."
        })
}

#[cfg(test)]
mod dot_tests {
    use super::{decode_unreserved, has_dot_segment, with_path, InvalidEscape};

    #[test]
    fn percent_encoded_unreserved_characters_are_decoded() {
        for (p, want) in [
            ("/%61dmin/x", Some("/admin/x")),
            ("/%61%64%6D%69%6e", Some("/admin")),
            ("/a%2Db%5Fc%7Ed%2e", Some("/a-b_c~d.")),
            ("/%2e%2e/x", Some("/../x")),
            ("/a%2Fb%2f", None),
            ("/a%20b", None),
            ("/a%25%2561", None),
            ("/plain", None),
        ] {
            assert_eq!(decode_unreserved(p).unwrap().as_deref(), want, "{p}");
        }
        // A `%` without two hex digits after it is refused: decoding could make a new escape.
        for p in ["/a%", "/a%6", "/a%zz", "/a%%61", "/%%36%31dmin", "/100%"] {
            assert_eq!(decode_unreserved(p), Err(InvalidEscape), "{p}");
        }
        let uri: http::Uri = "http://a.example/%61dmin?x=%61".parse().unwrap();
        let got = with_path(&uri, &decode_unreserved(uri.path()).unwrap().unwrap()).unwrap();
        assert_eq!(got.to_string(), "http://a.example/admin?x=%61");
        let uri: http::Uri = "/%7Euser".parse().unwrap();
        let got = with_path(&uri, &decode_unreserved(uri.path()).unwrap().unwrap()).unwrap();
        assert_eq!(got.to_string(), "/~user");
    }

    #[test]
    fn dot_segments_in_every_spelling_are_found() {
        for p in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/..",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/..;/b",
            "/a/..;x=1/b",
            "/a/..%2fb",
            "/a/..%2Fb",
            "/a/%2e%2e%2fb",
            "/a/..%5cb",
            "/a/..\\b",
            "/a/.%2e/b",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in [
            "/",
            "/a/b",
            "/a/b.json",
            "/a/...",
            "/a/..b",
            "/a/b..",
            "/a/.well-known/x",
            "/a%2Fb",
            "/a/%2e%2e%2e",
            "/v1.2/x",
        ] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }
}
