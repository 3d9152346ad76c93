//! Large per-batch vectors, kept for the next batch.
//!
//! A batch's rows take several hundred KB. The allocator hands an allocation
//! that size back to the system when it is freed, so a fresh one is faulted
//! in page by page on every batch: about 5% of the node's CPU before these
//! pools. A few vectors per kind are kept instead; their elements are
//! dropped first, so only the capacity lives on.

use std::sync::Mutex;

/// Vectors kept per kind of batch buffer: the batches a node has in flight
/// at once by default (`max_inflight_batches`).
pub const KEEP_PER_BATCH: usize = 8;
/// Batches of more rows than this do not give their vectors back.
pub const MAX_KEPT_ROWS: usize = 16_384;

pub struct VecPool<T> {
    kept: Mutex<Vec<Vec<T>>>,
    /// Vectors kept at most: about the batches a node has in flight.
    max_kept: usize,
    /// Larger vectors are not kept, so a one-off huge batch does not pin
    /// its memory for the life of the process.
    max_capacity: usize,
}

impl<T> VecPool<T> {
    pub const fn new(max_kept: usize, max_capacity: usize) -> Self {
        Self {
            kept: Mutex::new(Vec::new()),
            max_kept,
            max_capacity,
        }
    }

    /// An empty vector with room for at least `capacity` elements.
    pub fn take(&self, capacity: usize) -> Vec<T> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut vec = kept.unwrap_or_default();
        vec.reserve(capacity);
        vec
    }

    /// Gives `vec` back: its elements are dropped here, its capacity kept.
    pub fn give(&self, mut vec: Vec<T>) {
        if vec.capacity() == 0 || vec.capacity() > self.max_capacity {
            return;
        }
        vec.clear();
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < self.max_kept {
            kept.push(vec);
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.kept.lock().map(|k| k.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn keeps_capacity_drops_elements_and_bounds_what_it_keeps() {
        let pool: VecPool<Arc<()>> = VecPool::new(2, 100);
        let witness = Arc::new(());
        let mut vec = pool.take(10);
        vec.push(witness.clone());
        let capacity = vec.capacity();
        pool.give(vec);
        assert_eq!(Arc::strong_count(&witness), 1, "elements are dropped");
        let again = pool.take(5);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), capacity, "the same allocation comes back");

        pool.give(Vec::with_capacity(1000));
        assert_eq!(pool.kept(), 0, "a vector over max_capacity is not kept");
        for _ in 0..3 {
            pool.give(Vec::with_capacity(10));
        }
        assert_eq!(pool.kept(), 2, "at most max_kept vectors");
    }
}
