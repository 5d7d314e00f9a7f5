//! Semantic checks that types cannot express. Each failure names the key path it is about; the loader
//! places that path in the file.

use std::collections::HashSet;

use super::locate::Seg;
use super::schema::*;

/// What went wrong, and where (key path).
pub(crate) type Invalid = (Vec<Seg>, String);

fn at(path: &[Seg], msg: impl Into<String>) -> Invalid {
    (path.to_vec(), msg.into())
}

fn k(s: &str) -> Seg {
    Seg::key(s)
}

/// A setting the library's builders refused (what `run` would fail on), placed under `base`.
fn refused(base: &[Seg], r: crate::policy::Refused) -> Invalid {
    let keys: Vec<Seg> = r.path.iter().map(|s| k(s)).collect();
    at(&[base, &keys].concat(), r.reason)
}

/// Checks `config`; the first problem found is returned.
pub(crate) fn validate(config: &Config) -> Result<(), Invalid> {
    if let Some(t) = &config.tls {
        // What `run` will load: a missing or broken file is an error now, not at the next start.
        crate::proxy::server_tls(&t.cert, &t.key).map_err(|(key, e)| at(&[k("tls"), k(key)], e))?;
    }
    if config.limits.max_connections == 0 {
        return Err(at(
            &[k("limits"), k("max_connections")],
            "must be at least 1",
        ));
    }
    for (key, d) in [
        ("header_read_timeout", config.limits.header_read_timeout),
        ("idle_timeout", config.limits.idle_timeout),
    ] {
        if d.get().is_zero() {
            return Err(at(&[k("limits"), k(key)], "must be longer than 0ms"));
        }
    }
    if config.limits.max_concurrent_streams == 0 {
        return Err(at(
            &[k("limits"), k("max_concurrent_streams")],
            "must be at least 1",
        ));
    }
    if !(1..=MAX_MAX_HEADERS).contains(&config.limits.max_headers) {
        return Err(at(
            &[k("limits"), k("max_headers")],
            format!("must be between 1 and {MAX_MAX_HEADERS}"),
        ));
    }
    if config.limits.max_header_bytes.get() < 1024 {
        return Err(at(
            &[k("limits"), k("max_header_bytes")],
            "must be at least 1KiB",
        ));
    }
    if config.mode_retry_after.get() < std::time::Duration::from_secs(1) {
        return Err(at(&[k("mode_retry_after")], "must be at least 1s"));
    }
    if let Some(a) = config.admission.as_ref().filter(|a| a.enabled) {
        // Built as `run` builds it: the library refuses `max_concurrent: 0` and a zero timeout.
        crate::admission::Admission::new(a, &None).map_err(|r| refused(&[], r))?;
    }
    validate_ops(config)?;
    for (name, up) in config.upstreams.iter() {
        let base = [k("upstreams"), k(name)];
        label_safe(&base, name)?;
        validate_upstream(&base, up)?;
        // What the checks above do not cover, the library's builders do (as `run` will).
        crate::policy::UpstreamPolicies::check(name, up).map_err(|r| refused(&base, r))?;
    }
    let mut route_names = HashSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        let base = [k("routes"), Seg::Index(i)];
        if let Some(n) = &route.name {
            label_safe(&[base.as_slice(), &[k("name")]].concat(), n)?;
            if !route_names.insert(n.clone()) {
                return Err(at(
                    &[base.as_slice(), &[k("name")]].concat(),
                    format!("duplicate route name `{n}`"),
                ));
            }
            // An unnamed route is called `route<N>` in metrics and logs: no other may take that.
            let taken = n
                .strip_prefix("route")
                .and_then(|j| j.parse::<usize>().ok())
                .filter(|&j| format!("route{j}") == *n)
                .filter(|&j| j != i && config.routes.get(j).is_some_and(|r| r.name.is_none()));
            if let Some(j) = taken {
                return Err(at(
                    &[base.as_slice(), &[k("name")]].concat(),
                    format!("`{n}` is the name of the unnamed routes[{j}]"),
                ));
            }
        }
        validate_route(&base, route, config)?;
    }
    Ok(())
}

/// A `per_second` rate at `path`: finite and above zero.
fn positive_rate(path: &[Seg], per_second: f64) -> Result<(), Invalid> {
    if !(per_second > 0.0 && per_second.is_finite()) {
        Err(at(path, "must be greater than 0"))
    } else if per_second * 60.0 < 1.0 - 1e-9 {
        // (The tolerance lets `0.016666666666666666` through: 1/60 as written in decimals.)
        Err(at(path, "must be at least 1/60 (one a minute)"))
    } else if per_second > f64::from(u32::MAX) {
        Err(at(path, "is too large"))
    } else {
        Ok(())
    }
}

/// Names become metric label values, which the Prometheus text format quotes: a `"`, a `\` or a
/// control character in one would garble `/metrics` (the encoder writes label values as they are).
fn label_safe(path: &[Seg], name: &str) -> Result<(), Invalid> {
    if name.is_empty() {
        return Err(at(path, "a name cannot be empty"));
    }
    match name
        .chars()
        .find(|c| matches!(c, '"' | '\\') || c.is_control())
    {
        Some(c) => Err(at(
            path,
            format!(
                "`{}` cannot be in a name (names are metric labels)",
                c.escape_default()
            ),
        )),
        None => Ok(()),
    }
}

/// Whether two listeners' addresses cannot both be bound: the same port (not 0, which picks a
/// free one) on the same address (an IPv4-mapped IPv6 address is its IPv4 one), or on a wildcard
/// address that takes the other (`0.0.0.0` every IPv4 address; `::`, dual-stack, every address).
fn overlaps(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let takes = |wild: IpAddr, other: IpAddr| match wild {
        IpAddr::V4(w) => w.is_unspecified() && other.is_ipv4(),
        IpAddr::V6(w) => w.is_unspecified(),
    };
    x == y || takes(x, y) || takes(y, x)
}

/// The operational top-level sections: `admin:`, `store:` and `logging:`.
fn validate_ops(config: &Config) -> Result<(), Invalid> {
    if let Some(admin) = &config.admin {
        if overlaps(admin.listen, config.listen) {
            return Err(at(
                &[k("admin"), k("listen")],
                format!(
                    "the admin listener cannot share the proxy's port: {} and `listen` {} cannot \
                     both be bound",
                    admin.listen, config.listen
                ),
            ));
        }
        if let Some(var) = &admin.token_env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return Err(at(
                    &[k("admin"), k("token_env")],
                    "must name an environment variable",
                ));
            }
        }
    }
    if let Some(store) = &config.store {
        if store.redis.is_some() {
            return Err(at(
                &[k("store"), k("redis")],
                "not available yet: shared state in Redis is not implemented; remove `redis` \
                 (the embedded store at `store.path` keeps this gateway's state)",
            ));
        }
        if store.path.as_os_str().is_empty() {
            return Err(at(&[k("store"), k("path")], "must not be empty"));
        }
        if !(1..=1_000_000_000).contains(&store.audit_max_entries) {
            return Err(at(
                &[k("store"), k("audit_max_entries")],
                "must be 1 to 1000000000",
            ));
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&config.logging.level) {
        return Err(at(
            &[k("logging"), k("level")],
            format!("invalid log filter `{}`: {e}", config.logging.level),
        ));
    }
    Ok(())
}

/// A `request_headers`/`response_headers` section at `path`: built as `run` builds it (reading the
/// environment), its first bad entry placed under `path`.
fn validate_headers(path: &[Seg], section: &HeaderRules) -> Result<(), Invalid> {
    use crate::upstream::headers::{self, Entry};
    headers::HeaderRules::new(section, headers::process_env).map_err(|r| {
        let entry = match &r.entry {
            Entry::Set(name) => [k("set"), k(name)],
            Entry::Remove(i) => [k("remove"), Seg::Index(*i)],
        };
        at(&[path, &entry[..]].concat(), r.reason)
    })?;
    Ok(())
}

fn validate_upstream(base: &[Seg], up: &Upstream) -> Result<(), Invalid> {
    let p = |rest: &[Seg]| [base, rest].concat();
    validate_headers(&p(&[k("request_headers")]), &up.request_headers)?;
    if up.endpoints.is_empty() {
        return Err(at(
            &p(&[k("endpoints")]),
            "an upstream needs at least one endpoint",
        ));
    }
    for (key, d) in [
        ("ping_interval", up.pool.ping_interval),
        ("ping_timeout", up.pool.ping_timeout),
    ] {
        if d.get().is_zero() {
            return Err(at(&p(&[k("pool"), k(key)]), "must be longer than 0ms"));
        }
    }
    // RFC 9113 6.9.1: a window is at most 2^31 - 1 bytes.
    const H2_MAX_WINDOW: u64 = (1 << 31) - 1;
    let (stream, conn) = (up.pool.h2_stream_window.0, up.pool.h2_connection_window.0);
    if !(64 * 1024..=H2_MAX_WINDOW).contains(&stream) {
        return Err(at(
            &p(&[k("pool"), k("h2_stream_window")]),
            "must be between 64KiB and 2GiB - 1 byte (HTTP/2's largest window)",
        ));
    }
    if !(stream..=H2_MAX_WINDOW).contains(&conn) {
        return Err(at(
            &p(&[k("pool"), k("h2_connection_window")]),
            "must be at least h2_stream_window and at most 2GiB - 1 byte (HTTP/2's largest window)",
        ));
    }
    if up.endpoints.len() > crate::upstream::MAX_ENDPOINTS {
        return Err(at(
            &p(&[k("endpoints")]),
            format!(
                "an upstream has at most {} endpoints",
                crate::upstream::MAX_ENDPOINTS
            ),
        ));
    }
    let mut seen = HashSet::new();
    let mut any_https = false;
    let name_override = up.tls.as_ref().and_then(|t| t.server_name.as_ref());
    for (i, ep) in up.endpoints.iter().enumerate() {
        let ep_path = p(&[k("endpoints"), Seg::Index(i), k("url")]);
        let url = check_url(&ep.url).map_err(|m| at(&ep_path, m))?;
        if url.https {
            any_https = true;
            // The default server name is the URL's host: it must be one a certificate can name.
            if name_override.is_none() {
                crate::upstream::tls::server_name(url.authority.host()).map_err(|m| {
                    at(
                        &ep_path,
                        format!("{m} (set `tls.server_name` for this upstream)"),
                    )
                })?;
            }
        }
        // The same server however written: scheme and host ignore case, and a port is a number
        // (`http://H:80` is `http://h`; `:09001` is `:9001`).
        let same = (
            url.https,
            url.authority.host().to_ascii_lowercase(),
            url.port(),
        );
        if !seen.insert(same) {
            return Err(at(
                &ep_path,
                format!(
                    "duplicate endpoint `{}` (the same scheme, host and port as another)",
                    ep.url
                ),
            ));
        }
        if ep.weight == 0 || ep.weight > 1000 {
            return Err(at(
                &p(&[k("endpoints"), Seg::Index(i), k("weight")]),
                "weight must be between 1 and 1000",
            ));
        }
    }
    if let Some(tls) = &up.tls {
        // Chosen as an error rather than a warning: a `tls:` section that encrypts nothing is a
        // mistake worth stopping on (the operator believes the traffic is protected).
        if !any_https {
            return Err(at(
                &p(&[k("tls")]),
                "no endpoint of this upstream is https://: `tls` would not apply to any",
            ));
        }
        crate::upstream::tls::client_config(Some(tls), up.http2)
            .map_err(|e| at(&p(&[k("tls"), k(e.key)]), e.message))?;
    }
    if up.connect_timeout.get().is_zero() {
        return Err(at(&p(&[k("connect_timeout")]), "must be greater than 0"));
    }
    if let Some(hc) = &up.health_check {
        if hc.enabled {
            if !hc.path.starts_with('/') {
                return Err(at(
                    &p(&[k("health_check"), k("path")]),
                    "must start with `/`",
                ));
            }
            if let Err(e) = hc.path.parse::<http::uri::PathAndQuery>() {
                return Err(at(
                    &p(&[k("health_check"), k("path")]),
                    format!(
                        "is not a valid request path ({e}): encode spaces and the like, as `%20`"
                    ),
                ));
            }
            if hc.interval.get().is_zero() {
                return Err(at(
                    &p(&[k("health_check"), k("interval")]),
                    "must be greater than 0",
                ));
            }
            if hc.interval.get() > bulwark::health::MAX_INTERVAL {
                return Err(at(
                    &p(&[k("health_check"), k("interval")]),
                    "must be at most a year",
                ));
            }
            if hc.timeout.get().is_zero() {
                return Err(at(
                    &p(&[k("health_check"), k("timeout")]),
                    "must be greater than 0",
                ));
            }
            for (key, n) in [
                ("unhealthy_threshold", hc.unhealthy_threshold),
                ("healthy_threshold", hc.healthy_threshold),
            ] {
                if n == 0 {
                    return Err(at(&p(&[k("health_check"), k(key)]), "must be at least 1"));
                }
            }
        }
    }
    if let Some(c) = &up.cooldown {
        if c.enabled {
            for (i, s) in c.on.iter().enumerate() {
                if !(100..=599).contains(s) {
                    return Err(at(
                        &p(&[k("cooldown"), k("on"), Seg::Index(i)]),
                        format!("`{s}` is not an HTTP status code"),
                    ));
                }
                if *s < 400 {
                    return Err(at(
                        &p(&[k("cooldown"), k("on"), Seg::Index(i)]),
                        format!(
                            "`{s}` is not a refusal: a cooldown follows a 4xx or 5xx with \
                             `Retry-After` (429, 402, 503)"
                        ),
                    ));
                }
            }
            if c.max.get().is_zero() {
                return Err(at(&p(&[k("cooldown"), k("max")]), "must be greater than 0"));
            }
        }
    }
    if let Some(t) = up.panic_threshold {
        if !(0.0..=100.0).contains(&t) {
            return Err(at(
                &p(&[k("panic_threshold")]),
                "is a percentage (0-100; 0 turns panic mode off)",
            ));
        }
    }
    if let Some(od) = &up.outlier_detection {
        if od.enabled && od.max_ejection_percent > 100 {
            return Err(at(
                &p(&[k("outlier_detection"), k("max_ejection_percent")]),
                "is a percentage (0-100)",
            ));
        }
        if od.enabled && od.consecutive_failures == 0 {
            return Err(at(
                &p(&[k("outlier_detection"), k("consecutive_failures")]),
                "must be at least 1",
            ));
        }
        if od.enabled && od.ejection_time.get().is_zero() {
            return Err(at(
                &p(&[k("outlier_detection"), k("ejection_time")]),
                "must be greater than 0",
            ));
        }
        if od.enabled && od.max_ejection_time < od.ejection_time {
            return Err(at(
                &p(&[k("outlier_detection"), k("max_ejection_time")]),
                "must not be less than `ejection_time`",
            ));
        }
        if let Some(m) = od.latency_multiple.filter(|_| od.enabled) {
            if !(m > 1.0 && m.is_finite()) {
                return Err(at(
                    &p(&[k("outlier_detection"), k("latency_multiple")]),
                    "must be a number greater than 1",
                ));
            }
            if od.latency_min_samples == 0 {
                return Err(at(
                    &p(&[k("outlier_detection"), k("latency_min_samples")]),
                    "must be at least 1",
                ));
            }
        }
    }
    if let Some(cb) = &up.circuit_breaker {
        if cb.enabled {
            let cbp = |key: &str| p(&[k("circuit_breaker"), k(key)]);
            match (cb.window.kind, cb.window.size) {
                (WindowKind::Count, WindowSize::Calls(n)) if n > 0 => {}
                (WindowKind::Count, _) => {
                    return Err(at(
                        &p(&[k("circuit_breaker"), k("window"), k("size")]),
                        "a count window's size is a number of calls (e.g. `100`)",
                    ))
                }
                (WindowKind::Time, WindowSize::Time(d)) if !d.get().is_zero() => {}
                (WindowKind::Time, _) => {
                    return Err(at(
                        &p(&[k("circuit_breaker"), k("window"), k("size")]),
                        "a time window's size is a duration (e.g. `60s`)",
                    ))
                }
            }
            if !(cb.failure_rate_threshold > 0.0 && cb.failure_rate_threshold <= 100.0) {
                return Err(at(
                    &cbp("failure_rate_threshold"),
                    "is a percentage in (0, 100]",
                ));
            }
            if !(cb.slow_call_rate_threshold > 0.0 && cb.slow_call_rate_threshold <= 100.0) {
                return Err(at(
                    &cbp("slow_call_rate_threshold"),
                    "is a percentage in (0, 100]",
                ));
            }
            if cb.half_open_calls == 0 {
                return Err(at(&cbp("half_open_calls"), "must be at least 1"));
            }
        }
    }
    if let Some(bh) = &up.bulkhead {
        if bh.enabled && bh.max_concurrent == 0 {
            return Err(at(
                &p(&[k("bulkhead"), k("max_concurrent")]),
                "must be at least 1",
            ));
        }
    }
    if let Some(rl) = up.rate_limit.as_ref().filter(|r| r.enabled) {
        positive_rate(&p(&[k("rate_limit"), k("per_second")]), rl.per_second)?;
    }
    Ok(())
}

/// An endpoint URL, checked: its scheme and authority.
#[derive(Debug, Clone)]
pub(crate) struct EndpointUrl {
    /// `https://`: TLS to the endpoint.
    pub(crate) https: bool,
    /// `host[:port]` as written.
    pub(crate) authority: http::uri::Authority,
}

impl EndpointUrl {
    /// The port to connect to: the URL's, or the scheme's default (80, 443).
    pub(crate) fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.https { 443 } else { 80 })
    }
}

/// An endpoint URL: `http://host[:port]` or `https://host[:port]` (no path, query or credentials).
pub(crate) fn check_url(url: &str) -> Result<EndpointUrl, String> {
    // The URI parser drops a fragment unchecked; what it holds would still reach the endpoint's
    // metric label (and `"` or `\` there would break the whole exposition).
    if url.contains('#') {
        return Err(format!(
            "invalid URL `{url}`: an endpoint has no fragment (`#...`)"
        ));
    }
    if let Some(c) = url
        .chars()
        .find(|c| matches!(c, '"' | '\\') || c.is_whitespace())
    {
        return Err(format!(
            "invalid URL `{url}`: `{}` is not allowed in a URL",
            c.escape_debug()
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL `{url}`: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => return Err(format!("invalid URL `{url}`: unsupported scheme `{other}`")),
        None => {
            return Err(format!(
                "invalid URL `{url}`: expected `http://host:port` or `https://host[:port]`"
            ))
        }
    };
    let auth = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("invalid URL `{url}`: missing host"))?;
    if auth.as_str().contains('@') {
        return Err(format!(
            "invalid URL `{url}`: credentials in URLs are not supported"
        ));
    }
    if auth.host().is_empty() {
        return Err(format!("invalid URL `{url}`: missing host"));
    }
    // The URI parser takes any digits as a port; out of range, the connect would go to the
    // scheme's default port instead.
    // (`Authority::port` is `None` for digits out of range: read them from the text.)
    let a = auth.as_str();
    let port = if a.starts_with('[') {
        a.rsplit_once("]:").map(|(_, p)| p)
    } else {
        a.rsplit_once(':').map(|(_, p)| p)
    };
    if let Some(port) = port.filter(|p| !p.is_empty()) {
        match port.parse::<u16>() {
            Ok(0) => return Err(format!("invalid URL `{url}`: port 0 is no destination")),
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "invalid URL `{url}`: port `{port}` is out of range (1 to 65535)"
                ))
            }
        }
    }
    if let Some(pq) = uri.path_and_query() {
        if pq.as_str() != "/" && !pq.as_str().is_empty() {
            return Err(format!(
                "invalid URL `{url}`: an endpoint has no path (routes forward the request path as is)"
            ));
        }
    }
    Ok(EndpointUrl {
        https,
        authority: auth,
    })
}

fn validate_route(base: &[Seg], route: &Route, config: &Config) -> Result<(), Invalid> {
    let p = |rest: &[Seg]| [base, rest].concat();
    validate_headers(&p(&[k("request_headers")]), &route.request_headers)?;
    validate_headers(&p(&[k("response_headers")]), &route.response_headers)?;
    let m = &route.matcher;
    if m.path.is_some() && m.path_prefix.is_some() {
        return Err(at(
            &p(&[k("match"), k("path")]),
            "give either `path` or `path_prefix`, not both",
        ));
    }
    for (key, v) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(v) = v {
            if !v.starts_with('/') {
                return Err(at(
                    &p(&[k("match"), k(key)]),
                    format!("`{v}` must start with `/`"),
                ));
            }
            // Matched against request paths: what no request path can hold never matches.
            if v.contains(['?', '#']) || v.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(at(
                    &p(&[k("match"), k(key)]),
                    format!(
                        "`{}` is not a request path (no spaces, `?`, `#` or control characters; \
                         percent-encode them)",
                        v.escape_debug()
                    ),
                ));
            }
            // A request path with such a `%` gets 400, so this could match nothing.
            if !escapes_valid(v) {
                return Err(at(
                    &p(&[k("match"), k(key)]),
                    format!(
                        "`{v}` has a `%` not followed by two hex digits (a request path with one \
                         gets 400; write `%25` for a `%`)"
                    ),
                ));
            }
        }
    }
    for (i, mode) in route.exempt_modes.iter().enumerate() {
        let at_key = p(&[k("exempt_modes"), Seg::Index(i)]);
        if *mode == Mode::Normal {
            return Err(at(
                &at_key,
                "`normal` restricts nothing: list `maintenance`, `read_only` or `degraded`",
            ));
        }
        if route.exempt_modes[..i].contains(mode) {
            return Err(at(&at_key, format!("`{mode}` is listed twice")));
        }
        if *mode == Mode::Degraded && route.optional {
            return Err(at(
                &at_key,
                "an `optional` route is the one `degraded` mode stops serving: drop one of the two",
            ));
        }
    }
    if let Some(to) = &route.prefix_rewrite {
        let at_key = p(&[k("prefix_rewrite")]);
        if m.path.is_none() && m.path_prefix.is_none() {
            return Err(at(
                &at_key,
                "needs `match.path_prefix` (or `match.path`): it replaces what they matched",
            ));
        }
        if !to.starts_with('/')
            || to.contains(['?', '#'])
            || http::uri::PathAndQuery::try_from(to.as_str()).is_err()
        {
            return Err(at(
                &at_key,
                format!("`{to}` must be a path: start with `/`, no query or fragment, no spaces"),
            ));
        }
    }
    for (i, method) in m.methods.iter().enumerate() {
        if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
            return Err(at(
                &p(&[k("match"), k("methods"), Seg::Index(i)]),
                format!("invalid method `{method}`"),
            ));
        }
        // Methods are case-sensitive (RFC 9110 9.1): `get` would never match a GET.
        let upper = method.to_ascii_uppercase();
        if upper != *method
            && [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ]
            .contains(&upper.as_str())
        {
            return Err(at(
                &p(&[k("match"), k("methods"), Seg::Index(i)]),
                format!("methods are case-sensitive: write `{upper}`, not `{method}`"),
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (name, value) in &m.headers {
        // Two values for one header (names ignore case) could never both match.
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(at(
                &p(&[k("match"), k("headers"), k(name)]),
                format!("`{name}` is listed twice (header names ignore case)"),
            ));
        }
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(at(
                &p(&[k("match"), k("headers"), k(name)]),
                format!("invalid header name `{name}`"),
            ));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(at(
                &p(&[k("match"), k("headers"), k(name)]),
                "invalid header value",
            ));
        }
    }
    if config.upstreams.get(&route.upstream).is_none() {
        return Err(at(
            &p(&[k("upstream")]),
            format!("unknown upstream `{}`{}", route.upstream, known(config)),
        ));
    }
    let mut chain = HashSet::from([route.upstream.as_str()]);
    for (i, f) in route.failover.iter().enumerate() {
        let fp = p(&[k("failover"), Seg::Index(i)]);
        if config.upstreams.get(f).is_none() {
            return Err(at(&fp, format!("unknown upstream `{f}`{}", known(config))));
        }
        if !chain.insert(f.as_str()) {
            return Err(at(
                &fp,
                format!("upstream `{f}` appears twice in the chain"),
            ));
        }
    }
    if route.timeout.get().is_zero() {
        return Err(at(&p(&[k("timeout")]), "must be greater than 0"));
    }
    if let Some(r) = &route.retry {
        let rp = |rest: &[Seg]| p(&[&[k("retry")], rest].concat());
        if r.attempts == 0 || r.attempts > 10 {
            return Err(at(&rp(&[k("attempts")]), "must be between 1 and 10"));
        }
        if let Some(t) = r.per_try_timeout {
            if t.get().is_zero() {
                return Err(at(&rp(&[k("per_try_timeout")]), "must be greater than 0"));
            }
        }
        if r.backoff.base > r.backoff.max {
            return Err(at(&rp(&[k("backoff"), k("base")]), "must not exceed `max`"));
        }
        if let Some(b) = &r.budget {
            if !(b.ratio >= 0.0 && b.ratio <= 1000.0) {
                return Err(at(
                    &rp(&[k("budget"), k("ratio")]),
                    "must be between 0 and 1000",
                ));
            }
            let window = b.window.get();
            let secs = std::time::Duration::from_secs;
            if window < secs(1) || window > secs(60) {
                return Err(at(
                    &rp(&[k("budget"), k("window")]),
                    "must be between 1s and 60s",
                ));
            }
        }
    }
    if let Some(h) = &route.hedge {
        // The library's cap (gRPC's: at most 5 attempts in all).
        if h.enabled && (h.max_hedges == 0 || h.max_hedges > bulwark::hedge::MAX_HEDGES) {
            return Err(at(
                &p(&[k("hedge"), k("max_hedges")]),
                format!("must be between 1 and {}", bulwark::hedge::MAX_HEDGES),
            ));
        }
        if let HedgeDelay::Fixed(d) = h.delay {
            if h.enabled && d.get() >= route.timeout.get() {
                return Err(at(
                    &p(&[k("hedge"), k("delay")]),
                    format!(
                        "must be shorter than the route's `timeout` ({}): a hedge after it never starts",
                        route.timeout
                    ),
                ));
            }
        }
    }
    // The library's builders check the rest (as `run` will); the route is named as `run` names it.
    let retry = route.retry.as_ref().filter(|r| r.enabled);
    let name = route.name.as_deref().unwrap_or("route");
    crate::policy::RoutePolicies::check(name, retry, route.hedge.as_ref())
        .map_err(|r| refused(base, r))?;
    if let Some(rl) = route.client_rate_limit.as_ref().filter(|r| r.enabled) {
        positive_rate(
            &p(&[k("client_rate_limit"), k("per_second")]),
            rl.per_second,
        )?;
        if rl.max_keys == 0 {
            return Err(at(
                &p(&[k("client_rate_limit"), k("max_keys")]),
                "must be at least 1",
            ));
        }
        crate::admission::ClientLimit::new(rl).map_err(|r| refused(base, r))?;
    }
    if let Some(f) = &route.fault {
        let percent = |key: &str, v: f64| {
            if (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err(at(
                    &p(&[k("fault"), k(key), k("percent")]),
                    format!("`{v}` is not a percentage from 0 to 100"),
                ))
            }
        };
        if let Some(d) = &f.delay {
            percent("delay", d.percent)?;
            if d.duration.get().is_zero() {
                return Err(at(
                    &p(&[k("fault"), k("delay"), k("duration")]),
                    "must be more than 0",
                ));
            }
        }
        if let Some(a) = &f.abort {
            percent("abort", a.percent)?;
            if !(200..=599).contains(&a.status) {
                return Err(at(
                    &p(&[k("fault"), k("abort"), k("status")]),
                    format!(
                        "`{}` is not a final HTTP status code (200 to 599)",
                        a.status
                    ),
                ));
            }
        }
    }
    if let Some(f) = &route.fallback {
        if !(200..=599).contains(&f.status) {
            return Err(at(
                &p(&[k("fallback"), k("status")]),
                format!(
                    "`{}` is not a final HTTP status code (200 to 599)",
                    f.status
                ),
            ));
        }
        if matches!(f.status, 204 | 304) && !f.body.is_empty() {
            return Err(at(
                &p(&[k("fallback"), k("body")]),
                format!(
                    "a {} answer carries no content: drop `body` or choose another status",
                    f.status
                ),
            ));
        }
        if let Some(ct) = &f.content_type {
            if http::HeaderValue::from_str(ct).is_err() {
                return Err(at(
                    &p(&[k("fallback"), k("content_type")]),
                    "invalid header value",
                ));
            }
        }
    }
    Ok(())
}

fn known(config: &Config) -> String {
    let names: Vec<&str> = config.upstreams.iter().map(|(n, _)| n).collect();
    if names.is_empty() {
        " (no upstreams are defined)".into()
    } else {
        format!(" (defined: {})", names.join(", "))
    }
}

/// Whether every `%` in `v` is followed by two hex digits.
fn escapes_valid(v: &str) -> bool {
    let b = v.as_bytes();
    b.iter().enumerate().all(|(i, &c)| {
        c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    })
}
