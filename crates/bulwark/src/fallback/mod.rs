//! `fallback` (in progress).
