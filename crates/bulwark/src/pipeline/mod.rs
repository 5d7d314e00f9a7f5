//! `pipeline` (in progress).
