//! Per-inode locks: one mutex per inode number, made on demand and dropped once unused.
//!
//! Whoever must do one thing at a time *per inode* (giving a file its local copy, uploading
//! it) takes that inode's lock instead of a global one, so work on other inodes never
//! waits. Several inodes are always locked in ascending order (`lock_all`), so two callers
//! that need overlapping sets cannot deadlock.

use parking_lot::{Mutex, RawMutex};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default)]
pub struct InodeLocks {
    locks: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
}

/// A held inode lock; released when dropped.
pub type InodeGuard = parking_lot::lock_api::ArcMutexGuard<RawMutex, ()>;

impl InodeLocks {
    fn handle(&self, ino: u64) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock();
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(ino).or_default().clone()
    }

    /// Waits for and takes the lock of `ino`.
    pub fn lock(&self, ino: u64) -> InodeGuard {
        self.handle(ino).lock_arc()
    }

    /// Takes the locks of all `inos` (duplicates allowed), in ascending order.
    pub fn lock_all(&self, inos: &[u64]) -> Vec<InodeGuard> {
        let mut sorted = inos.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.into_iter().map(|i| self.lock(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_held_inode_lock_blocks_only_that_inode() {
        let locks = Arc::new(InodeLocks::default());
        let held = locks.lock(7);
        // Another inode is free at once.
        drop(locks.lock(8));
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, got) = (locks.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(7);
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!got.load(Ordering::SeqCst), "inode 7 is still held");
        drop(held);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }

    #[test]
    fn overlapping_sets_locked_from_many_threads_do_not_deadlock() {
        let locks = Arc::new(InodeLocks::default());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let locks = locks.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let set = [(t + i) % 5, (t * 3 + i) % 5, 9 - (i % 5)];
                        let _g = locks.lock_all(&set);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
