//! `breaker` (in progress).
