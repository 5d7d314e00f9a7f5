//! Prometheus metrics from events (in progress).
