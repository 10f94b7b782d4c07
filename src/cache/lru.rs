//! Which clean cached files go first when the cache must shrink: least recently used, never
//! one whose inode is open.
//!
//! Only clean hydrated files (`data/`) are tracked here: local copies hold data not yet
//! uploaded and are never evicted. Sizes are blocks actually allocated. The lock is held for
//! bookkeeping only; files are deleted by the caller after it is released, so eviction never
//! holds up the opens and reads of other files.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

struct Entry {
    bytes: u64,
    tick: u64,
    /// The inode the file was last opened for (it is pinned while that inode is open).
    ino: Option<u64>,
}

#[derive(Default)]
struct State {
    tick: u64,
    entries: HashMap<String, Entry>,
    order: BTreeMap<u64, String>,
    bytes: u64,
}

#[derive(Default)]
pub struct Lru {
    state: Mutex<State>,
}

impl Lru {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a use of `key` by inode `ino`; false when `key` is not tracked.
    pub fn touch(&self, key: &str, ino: u64) -> bool {
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        let Some(e) = st.entries.get_mut(key) else {
            return false;
        };
        let old = std::mem::replace(&mut e.tick, tick);
        e.ino = Some(ino);
        st.order.remove(&old);
        st.order.insert(tick, key.to_string());
        true
    }

    /// Tracks `key` as the newest file, of `bytes` (replacing an earlier record of it).
    pub fn insert(&self, key: &str, bytes: u64, ino: Option<u64>) {
        self.remove(key);
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        st.entries
            .insert(key.to_string(), Entry { bytes, tick, ino });
        st.bytes += bytes;
        st.order.insert(tick, key.to_string());
    }

    /// Forgets `key` (taken over as a local copy, or deleted); returns its bytes.
    pub fn remove(&self, key: &str) -> Option<u64> {
        let mut st = self.state();
        let e = st.entries.remove(key)?;
        st.order.remove(&e.tick);
        st.bytes -= e.bytes;
        Some(e.bytes)
    }

    /// Bytes of all tracked files.
    pub fn bytes(&self) -> u64 {
        self.state().bytes
    }

    /// Takes the least recently used files out, oldest first, skipping those `pinned`
    /// says are open, until `need` bytes are taken; returns them (to be deleted).
    pub fn take_victims(&self, need: u64, pinned: impl Fn(u64) -> bool) -> Vec<(String, u64)> {
        let mut st = self.state();
        let mut out = Vec::new();
        let mut got = 0;
        let candidates: Vec<(u64, String)> =
            st.order.iter().map(|(t, k)| (*t, k.clone())).collect();
        for (tick, key) in candidates {
            if got >= need {
                break;
            }
            if st.entries[&key].ino.is_some_and(&pinned) {
                continue;
            }
            let e = st.entries.remove(&key).expect("ordered keys are entries");
            st.order.remove(&tick);
            st.bytes -= e.bytes;
            got += e.bytes;
            out.push((key, e.bytes));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_unpinned_files_go_first() {
        let lru = Lru::default();
        for (k, ino) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
            lru.insert(k, 10, Some(ino));
        }
        assert!(lru.touch("a", 1)); // a is now the newest
        assert!(!lru.touch("x", 9));
        assert_eq!(lru.bytes(), 40);
        // b is open: c goes instead, then d.
        let v = lru.take_victims(15, |ino| ino == 2);
        assert_eq!(v, vec![("c".to_string(), 10), ("d".to_string(), 10)]);
        assert_eq!(lru.bytes(), 20);
        assert_eq!(lru.remove("a"), Some(10));
        assert_eq!(lru.remove("a"), None);
        assert_eq!(lru.take_victims(100, |_| true), vec![]);
        assert_eq!(
            lru.take_victims(100, |_| false),
            vec![("b".to_string(), 10)]
        );
    }
}
