//! `bulkhead` (in progress).
