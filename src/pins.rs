//! Open files, counted per inode: what the kernel holds open is pinned.
//!
//! The filesystem core counts a handle in at open and out at release; write-back reads the
//! counts (an unlinked inode keeps its row and local copy while open, a file open for writing
//! is left to its writer's close or fsync), and so do the refresh (an open file keeps the
//! version it opened) and eviction (an open file is never evicted). The counts live here,
//! below all of them, so none has to call back up into the core; one `Arc<Pins>` is shared.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    handles: u32,
    writers: u32,
}

#[derive(Default)]
pub struct Pins {
    open: Mutex<HashMap<u64, Count>>,
}

impl Pins {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Count>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle on `ino` was opened (for writing when `write`).
    pub fn pin(&self, ino: u64, write: bool) {
        let mut open = self.map();
        let n = open.entry(ino).or_default();
        n.handles += 1;
        if write {
            n.writers += 1;
        }
    }

    /// A handle on `ino` was closed; true when it was the last one.
    pub fn unpin(&self, ino: u64, write: bool) -> bool {
        let mut open = self.map();
        let n = open.entry(ino).or_default();
        n.handles = n.handles.saturating_sub(1);
        if write {
            n.writers = n.writers.saturating_sub(1);
        }
        let last = n.handles == 0;
        if last {
            open.remove(&ino);
        }
        last
    }

    pub fn is_open(&self, ino: u64) -> bool {
        self.map().contains_key(&ino)
    }

    pub fn has_writers(&self, ino: u64) -> bool {
        self.map().get(&ino).is_some_and(|n| n.writers > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_close_unpins_and_writers_are_counted_apart() {
        let p = Pins::default();
        p.pin(5, false);
        p.pin(5, true);
        assert!(p.is_open(5) && p.has_writers(5));
        assert!(!p.unpin(5, true), "a reader is still open");
        assert!(p.is_open(5) && !p.has_writers(5));
        assert!(p.unpin(5, false));
        assert!(!p.is_open(5));
    }
}
