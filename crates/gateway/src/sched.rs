//! A scheduling point for the threads that serve connections.
//!
//! Under load a proxy thread never blocks: it always has a socket to read or write. When it shares
//! a CPU with a thread it serves (a client such as a load generator, a sidecar, an upstream), each
//! response it writes wakes that thread. Linux's scheduler (EEVDF) lets the woken thread run once
//! the proxy's time slice is over, but it looks at the slice only on its periodic tick or at
//! another scheduling event. With `HZ=250` that tick comes every 4 ms. So the woken thread, with
//! its response already in its socket, could wait milliseconds for a CPU the proxy should have
//! handed over already.
//!
//! Reading the thread's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`) is such an event: the kernel
//! brings the running thread's accounting up to date, and reschedules if its slice is over. HAProxy
//! reads that clock in every turn of its polling loop (for its own statistics), and that is why a
//! client next to it did not wait. [`after_write`] does it at most every [`INTERVAL`] of a thread's
//! writes.
//!
//! Measured with a client pinned to the proxy's CPU (`bench/results/gateway.md`, sixth pass). The
//! client's p90 went from 2.6-3.3 ms to 2.2 ms, as HAProxy's. Unpinned, bulwark's p99 went from
//! 3.5-3.7 ms to 2.6-3.0 ms (HAProxy 2.6-2.8 ms). Cost: at most one system call per
//! [`INTERVAL`] per thread, and one monotonic clock read (vDSO, no system call) per write.

use std::cell::Cell;
use std::time::Duration;

use tokio::time::Instant;

/// The least time between two scheduling points of one thread.
pub(crate) const INTERVAL: Duration = Duration::from_micros(50);

thread_local! {
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Called after a response (or part of one) is handed to an HTTP/1.1 client's socket (HTTP/2
/// connections are hyper's, and do not call it): a scheduling point when this thread has not had
/// one for [`INTERVAL`]. Returns the time it read (the monotonic clock).
pub(crate) fn after_write() -> Instant {
    let now = Instant::now();
    if LAST.with(|last| due(last, now)) {
        // The value is not needed: reading the clock is the point (see the module docs).
        let _ = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    }
    now
}

/// Whether a scheduling point is due at `now`, given the `last` one (updated when it is).
fn due(last: &Cell<Option<Instant>>, now: Instant) -> bool {
    match last.get() {
        Some(t) if now.saturating_duration_since(t) < INTERVAL => false,
        _ => {
            last.set(Some(now));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_scheduling_point_per_interval() {
        let last = Cell::new(None);
        let t0 = Instant::now();
        assert!(due(&last, t0), "the first write is a point");
        assert!(!due(&last, t0));
        assert!(!due(&last, t0 + INTERVAL / 2));
        assert!(due(&last, t0 + INTERVAL));
        assert!(!due(&last, t0 + INTERVAL + INTERVAL / 2));
        assert!(due(&last, t0 + INTERVAL * 3));
        // An earlier `now` (not expected of a monotonic clock) is not a point, and changes nothing.
        assert!(!due(&last, t0));
        assert_eq!(last.get(), Some(t0 + INTERVAL * 3));
        let _ = after_write();
    }
}
