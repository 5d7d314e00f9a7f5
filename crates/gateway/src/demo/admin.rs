//! Reading breaker states from the gateway's admin API.
//!
//! `GET /health` has a documented shape (`{"status": ..., "upstreams": {"<name>": {"circuit_breaker":
//! "closed|open|half_open|forced_open|disabled", ...}}}`), so it is asked first; `GET
//! /api/circuit-breakers` is the fallback. The parser is tolerant of the few obvious shapes the latter
//! could take, because the demo only wants a state per upstream and must not break when fields are added.
//! When neither answers, the states are unknown and the display shows `?`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::client::HttpClient;

/// Breaker state per upstream name, as the gateway spells it (`closed`, `open`, `half_open`, ...).
pub type BreakerStates = BTreeMap<String, String>;

/// How long one poll may take before the states count as unknown for this round.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(500);

/// Polls the admin API over one keep-alive connection.
#[derive(Debug)]
pub struct AdminPoller {
    client: HttpClient,
}

impl AdminPoller {
    /// A poller for the admin listener at `admin`.
    pub fn new(admin: SocketAddr) -> AdminPoller {
        AdminPoller {
            client: HttpClient::new(admin),
        }
    }

    /// Current breaker states, or `None` when the admin API did not answer with any (within
    /// [`POLL_TIMEOUT`] per request).
    pub async fn breakers(&mut self) -> Option<BreakerStates> {
        for path in ["/health", "/api/circuit-breakers"] {
            let Ok(Ok(resp)) = tokio::time::timeout(POLL_TIMEOUT, self.client.get(path)).await
            else {
                // A timed-out exchange leaves the connection in an unknown state: start over.
                self.client = HttpClient::new(self.client.addr());
                continue;
            };
            // `/health` may answer 503 when degraded; its body still has the states.
            if let Ok(json) = serde_json::from_slice::<Value>(&resp.body) {
                if let Some(states) = parse_breakers(&json) {
                    return Some(states);
                }
            }
        }
        None
    }

    /// Whether the admin API answers `GET /health` at all (any status).
    pub async fn is_up(&mut self) -> bool {
        matches!(
            tokio::time::timeout(POLL_TIMEOUT, self.client.get("/health")).await,
            Ok(Ok(_))
        )
    }
}

/// Extract breaker states from an admin API answer. Accepts the `/health` shape, an object keyed by
/// upstream (values a state string or an object with `state` / `circuit_breaker`), the same under a
/// `circuit_breakers` or `breakers` key, or an array of objects with `upstream`/`name` and `state`.
/// `None` when nothing recognisable is there.
pub fn parse_breakers(json: &Value) -> Option<BreakerStates> {
    fn state_of(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(map) => ["circuit_breaker", "state"]
                .iter()
                .filter_map(|k| map.get(*k))
                .find_map(state_of),
            _ => None,
        }
    }
    let states: BreakerStates = match json {
        Value::Object(map) => {
            if let Some(inner) = ["upstreams", "circuit_breakers", "breakers"]
                .iter()
                .find_map(|k| map.get(*k))
            {
                return parse_breakers(inner);
            }
            // `status` is the overall health in the `/health` shape, never an upstream.
            map.iter()
                .filter(|(name, _)| name.as_str() != "status")
                .filter_map(|(name, v)| Some((name.clone(), state_of(v)?)))
                .collect()
        }
        Value::Array(items) => items
            .iter()
            .filter_map(|item| {
                let name = ["upstream", "name"]
                    .iter()
                    .find_map(|k| item.get(*k)?.as_str())?;
                Some((name.to_owned(), state_of(item)?))
            })
            .collect(),
        _ => BreakerStates::new(),
    };
    (!states.is_empty()).then_some(states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn health_shape() {
        let v = json!({"status": "degraded", "upstreams": {
            "flaky": {"circuit_breaker": "open", "endpoints": [{"url": "http://x", "healthy": true}]},
            "healthy": {"circuit_breaker": "closed", "endpoints": []}}});
        let s = parse_breakers(&v).unwrap();
        assert_eq!(s["flaky"], "open");
        assert_eq!(s["healthy"], "closed");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn other_shapes() {
        let flat = parse_breakers(&json!({"flaky": "half_open"})).unwrap();
        assert_eq!(flat["flaky"], "half_open");
        let nested =
            parse_breakers(&json!({"flaky": {"state": "open", "failure_rate": 60.0}})).unwrap();
        assert_eq!(nested["flaky"], "open");
        let keyed =
            parse_breakers(&json!({"circuit_breakers": {"slow": {"state": "closed"}}})).unwrap();
        assert_eq!(keyed["slow"], "closed");
        let array =
            parse_breakers(&json!([{"upstream": "flaky", "state": "forced_open"}])).unwrap();
        assert_eq!(array["flaky"], "forced_open");
        assert!(parse_breakers(&json!({"status": 3})).is_none());
        assert!(parse_breakers(&json!({"status": "ok"})).is_none());
        assert!(parse_breakers(&json!(null)).is_none());
    }
}
