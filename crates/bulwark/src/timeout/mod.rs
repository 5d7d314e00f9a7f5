//! `timeout` (in progress).
