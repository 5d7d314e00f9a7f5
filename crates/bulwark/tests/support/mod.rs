//! Shared test support for the policy tests.

/// Yields until `cond` holds; fails after a bounded number of scheduler turns (no real
/// time passes, and paused time does not move while this task is runnable).
pub async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition not reached");
}
