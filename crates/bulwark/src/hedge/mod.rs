//! `hedge` (in progress).
