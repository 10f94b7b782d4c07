//! Open files, counted per inode: what the kernel holds open is pinned.
//!
//! The filesystem core counts a handle in at open and out at release, and a handle as
//! *writing* from its first change of the file's data to its next flush (close). Write-back
//! reads the counts (an unlinked inode keeps its row and local copy while open; a file being
//! written is uploaded once its writers have closed it, not midway), and so do the refresh
//! (an open file keeps the version it opened) and eviction (an open file is never evicted).
//! The counts live here, below all of them, so none has to call back up into the core; one
//! `Arc<Pins>` is shared.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    handles: u32,
    /// Handles that changed the file's data since their last flush (close): while any does,
    /// the file is still being written and its upload waits.
    writing: u32,
}

#[derive(Default)]
pub struct Pins {
    open: Mutex<HashMap<u64, Count>>,
}

impl Pins {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Count>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle on `ino` was opened.
    pub fn pin(&self, ino: u64) {
        self.map().entry(ino).or_default().handles += 1;
    }

    /// A handle on `ino` was closed; true when it was the last one.
    pub fn unpin(&self, ino: u64) -> bool {
        let mut open = self.map();
        let n = open.entry(ino).or_default();
        n.handles = n.handles.saturating_sub(1);
        let last = n.handles == 0;
        if last {
            open.remove(&ino);
        }
        last
    }

    /// A handle of `ino` started changing its data (it is pinned).
    pub fn start_writing(&self, ino: u64) {
        if let Some(n) = self.map().get_mut(&ino) {
            n.writing += 1;
        }
    }

    /// A handle of `ino` that was changing its data was flushed or closed.
    pub fn stop_writing(&self, ino: u64) {
        if let Some(n) = self.map().get_mut(&ino) {
            n.writing = n.writing.saturating_sub(1);
        }
    }

    pub fn is_open(&self, ino: u64) -> bool {
        self.map().contains_key(&ino)
    }

    /// Whether a handle is changing `ino`'s data (written and not flushed since).
    pub fn is_writing(&self, ino: u64) -> bool {
        self.map().get(&ino).is_some_and(|n| n.writing > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_close_unpins_and_a_flushed_writer_no_longer_holds_the_upload() {
        let p = Pins::default();
        p.pin(5);
        p.pin(5);
        p.start_writing(5);
        assert!(p.is_open(5) && p.is_writing(5));
        p.stop_writing(5);
        assert!(!p.is_writing(5), "flushed: the upload may start");
        assert!(!p.unpin(5), "another handle is still open");
        assert!(p.is_open(5));
        assert!(p.unpin(5));
        assert!(!p.is_open(5));
        p.start_writing(5);
        assert!(
            !p.is_writing(5),
            "an inode no one has open is never being written"
        );
    }
}
