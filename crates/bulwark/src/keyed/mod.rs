//! `keyed` (in progress).
