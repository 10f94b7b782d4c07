//! Keyed locks: one mutex per inode number or blob name, made on demand and dropped once
//! unused.
//!
//! Whoever must do one thing at a time *per inode* (giving a file its local copy, uploading
//! it) or *per blob name* (writing or deleting it) takes that key's lock instead of a global
//! one, so work on other keys never waits. Several keys are always locked in ascending
//! order (`lock_all`), so two callers that need overlapping sets cannot deadlock; a caller
//! that holds inode locks may then take name locks, never the other way round.

use parking_lot::{Mutex, RawMutex};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

pub struct KeyLocks<K> {
    locks: Mutex<HashMap<K, Arc<Mutex<()>>>>,
}

/// Locks per inode number.
pub type InodeLocks = KeyLocks<u64>;
/// Locks per blob name.
pub type NameLocks = KeyLocks<String>;

/// A held lock; released when dropped.
pub type KeyGuard = parking_lot::lock_api::ArcMutexGuard<RawMutex, ()>;

impl<K: Ord + Hash + Clone> Default for KeyLocks<K> {
    fn default() -> Self {
        KeyLocks {
            locks: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Ord + Hash + Clone> KeyLocks<K> {
    fn handle(&self, key: &K) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock();
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key.clone()).or_default().clone()
    }

    /// Waits for and takes the lock of `key`.
    pub fn lock(&self, key: &K) -> KeyGuard {
        self.handle(key).lock_arc()
    }

    /// Takes the lock of `key` if nobody holds it.
    pub fn try_lock(&self, key: &K) -> Option<KeyGuard> {
        self.handle(key).try_lock_arc()
    }

    /// Takes the locks of all `keys` (duplicates allowed), in ascending order.
    pub fn lock_all(&self, keys: &[K]) -> Vec<KeyGuard> {
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.iter().map(|k| self.lock(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn a_held_lock_blocks_only_its_key() {
        let locks = Arc::new(InodeLocks::default());
        let held = locks.lock(&7);
        // Another key is free at once.
        drop(locks.lock(&8));
        assert!(locks.try_lock(&7).is_none());
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, got) = (locks.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(&7);
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!got.load(Ordering::SeqCst), "key 7 is still held");
        drop(held);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert!(locks.try_lock(&7).is_some());
    }

    #[test]
    fn overlapping_sets_locked_from_many_threads_do_not_deadlock() {
        let locks = Arc::new(NameLocks::default());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let locks = locks.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let set =
                            [(t + i) % 5, (t * 3 + i) % 5, 9 - (i % 5)].map(|k| k.to_string());
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
