//! Upstreams: endpoints with their connection pools, a balancer over priority tiers, and the upstream's
//! policies (see [`crate::policy`]).

mod balance;
mod endpoint;
mod pool;

use std::sync::Arc;

pub use balance::Tried;
pub use endpoint::Endpoint;
pub use pool::{Conn, FailKind, Pool, SendError};

use balance::Tier;

use crate::config::{self, Balance};
use crate::policy::UpstreamPolicies;

/// One upstream at runtime.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config (metric label).
    pub name: Arc<str>,
    /// Endpoints sorted by priority tier (stable within a tier).
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Algorithm.
    pub balance: Balance,
    /// Speak HTTP/2 to the endpoints.
    pub http2: bool,
    /// Admission policies.
    pub policies: UpstreamPolicies,
    tiers: Vec<Tier>,
}

impl Upstream {
    /// Builds an upstream from validated config.
    pub fn new(
        name: &str,
        c: &config::Upstream,
        events: &crate::policy::Events,
    ) -> Result<Self, String> {
        let mut eps: Vec<&config::Endpoint> = c.endpoints.iter().collect();
        eps.sort_by_key(|e| e.priority);
        let mut endpoints = Vec::with_capacity(eps.len());
        for e in &eps {
            let authority = config::check_url(&e.url)?;
            let port = authority.port_u16().unwrap_or(80);
            let addr = format!("{}:{port}", authority.host());
            let pool = Pool::new(
                addr,
                c.http2,
                c.pool.max_idle,
                c.pool.idle_timeout.get(),
                c.connect_timeout.get(),
            );
            endpoints.push(Arc::new(Endpoint::new(
                e.url.clone(),
                authority,
                e.priority,
                e.weight,
                pool,
            )));
        }
        let mut tiers = Vec::new();
        let mut start = 0;
        while start < eps.len() {
            let p = eps[start].priority;
            let end = start + eps[start..].iter().take_while(|e| e.priority == p).count();
            let weights: Vec<u32> = eps[start..end].iter().map(|e| e.weight).collect();
            tiers.push(Tier::new(start, end, &weights));
            start = end;
        }
        Ok(Upstream {
            name: name.into(),
            endpoints,
            balance: c.balance,
            http2: c.http2,
            policies: UpstreamPolicies::new(name, c, events)?,
            tiers,
        })
    }

    /// Picks an endpoint: from the first tier that has an available endpoint this request has not tried
    /// yet (so a retry goes elsewhere whenever it can, spilling to the next tier only when every
    /// available endpoint of the better tiers was tried); if all were tried, from the first tier with an
    /// available endpoint. `None`: no endpoint is available.
    pub fn pick(&self, tried: Tried) -> Option<usize> {
        let eps = &self.endpoints;
        let mut fallback_tier = None;
        for tier in &self.tiers {
            if !(tier.start..tier.end).any(|i| eps[i].is_available()) {
                continue;
            }
            fallback_tier.get_or_insert(tier);
            if let Some(i) = balance::pick(self.balance, tier, eps, |i| {
                eps[i].is_available() && !tried.contains(i)
            }) {
                return Some(i);
            }
        }
        balance::pick(self.balance, fallback_tier?, eps, |i| eps[i].is_available())
    }

    /// Drops expired idle connections of every endpoint.
    pub fn reap_idle(&self) {
        for e in &self.endpoints {
            e.pool.reap();
        }
    }
}
