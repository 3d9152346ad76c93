//! CPU-bound sections of the write path (encryption, hashing) run with
//! `block_in_place` on a multi-threaded runtime, so that the tasks that
//! drive PostgreSQL (a committer between two statements of its transaction)
//! are not queued for milliseconds behind them on the same worker.

/// Runs `work` on this thread, telling a multi-threaded tokio runtime that
/// the worker is busy so its other tasks move to another thread. On a
/// current-thread runtime (tests, simulations) or outside tokio, just runs it.
pub(crate) fn bound<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}
