//! `health` (in progress).
