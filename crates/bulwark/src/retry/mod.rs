//! `retry` (in progress).
