//! Open directories, read from the index a page at a time.
//!
//! A handle keeps a window of entries fetched in name order and the name that ends it: the
//! next page starts after that name (a keyset, not a position), so an entry that stays in the
//! directory is listed exactly once even while others are added or removed, and memory holds
//! one page however large the directory. The kernel continues from the cookie of the last
//! entry it took, usually inside the window or at its end; any other offset (a `seekdir` to an
//! old position, a rewind) is served by position. `.` and `..` are positions 0 and 1, with
//! their attributes as of `opendir`. Offset 0 always reads the index afresh: a rewind, or a
//! new listing.
//!
//! When the kernel lists without opening (FUSE_NO_OPENDIR_SUPPORT: no OPENDIR and RELEASEDIR
//! round trips per directory), there is no handle to keep a window in. `Cursors` keeps a few
//! windows per directory instead, found by the offset the kernel continues from, so a listing
//! still reads each page once and concurrent listings of one directory do not share a window;
//! an offset no window covers is served by position, like a seek.

use super::{FsResult, ListedEntry};
use crate::index::Index;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Entries fetched from the index at once.
const PAGE: usize = 512;

struct Window {
    entries: VecDeque<ListedEntry>,
    /// Position of `entries[0]` (entries start at 2, after `.` and `..`).
    first: u64,
    /// The name after which the next page starts (None: from the first entry).
    after: Option<Vec<u8>>,
    /// The index had no entries after the window.
    end: bool,
}

pub(super) struct DirHandle {
    ino: u64,
    dots: [ListedEntry; 2],
    window: Mutex<Window>,
}

impl DirHandle {
    pub fn new(ino: u64, dots: [ListedEntry; 2]) -> DirHandle {
        DirHandle {
            ino,
            dots,
            window: Mutex::new(Window {
                entries: VecDeque::new(),
                first: 2,
                after: None,
                end: false,
            }),
        }
    }

    /// Entries from position `offset` on with their cookies: what is left of the window,
    /// or the next page.
    pub fn read(&self, index: &Index, offset: u64) -> FsResult<Vec<(u64, ListedEntry)>> {
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < 2 {
            out.push((pos + 1, self.dots[pos as usize].clone()));
            pos += 1;
        }
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let end_of_window = w.first + w.entries.len() as u64;
        if offset == 0 || pos < w.first || pos > end_of_window {
            // Somewhere else: a rewind or a seek to an older position.
            let page = index.readdir_page(self.ino, None, pos - 2, PAGE)?;
            *w = Window {
                end: page.len() < PAGE,
                after: page.last().map(|e| e.name.as_bytes().to_vec()),
                entries: page.into_iter().map(listed).collect(),
                first: pos,
            };
        } else {
            let taken = (pos - w.first) as usize;
            w.entries.drain(..taken);
            w.first = pos;
            if w.entries.is_empty() && !w.end {
                let page = index.readdir_page(self.ino, w.after.as_deref(), 0, PAGE)?;
                w.end = page.len() < PAGE;
                if let Some(last) = page.last() {
                    w.after = Some(last.name.as_bytes().to_vec());
                }
                w.entries = page.into_iter().map(listed).collect();
            }
        }
        let first = w.first;
        out.extend(
            w.entries
                .iter()
                .enumerate()
                .map(|(i, e)| (first + i as u64 + 1, e.clone())),
        );
        Ok(out)
    }

    /// Whether a read at `offset` continues this handle's window (no new query by position).
    fn continues(&self, offset: u64) -> bool {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        offset >= w.first && offset <= w.first + w.entries.len() as u64
    }
}

/// Windows per directory most listed at once without a handle.
const CURSORS_PER_DIR: usize = 4;

/// Listing windows of directories the kernel reads without opening them.
pub(super) struct Cursors {
    dirs: moka::sync::Cache<u64, Arc<Mutex<Vec<Arc<DirHandle>>>>>,
}

impl Default for Cursors {
    fn default() -> Self {
        Cursors {
            // A listing is read within moments; an abandoned one must not hold memory.
            dirs: moka::sync::Cache::builder()
                .max_capacity(4096)
                .time_to_idle(std::time::Duration::from_secs(30))
                .build(),
        }
    }
}

impl Cursors {
    /// The window to read directory `ino` at `offset` with: one that continues there, or a new
    /// one (`fresh` makes its dots) replacing the least recently started.
    pub fn at(
        &self,
        ino: u64,
        offset: u64,
        fresh: impl FnOnce() -> FsResult<DirHandle>,
    ) -> FsResult<Arc<DirHandle>> {
        let slot = self.dirs.get_with(ino, Arc::default);
        let mut handles = slot.lock().unwrap_or_else(|p| p.into_inner());
        // Newest first: a listing never continues in a window older than its own start
        // (one it shared a position with may have taken its own further).
        if offset >= 2 {
            if let Some(h) = handles.iter().rev().find(|h| h.continues(offset)) {
                return Ok(h.clone());
            }
        }
        let h = Arc::new(fresh()?);
        if handles.len() >= CURSORS_PER_DIR {
            handles.remove(0);
        }
        handles.push(h.clone());
        Ok(h)
    }

    /// Drops `h`, whose listing reached the end of directory `ino`.
    pub fn finished(&self, ino: u64, h: &Arc<DirHandle>) {
        if let Some(slot) = self.dirs.get(&ino) {
            let mut handles = slot.lock().unwrap_or_else(|p| p.into_inner());
            handles.retain(|x| !Arc::ptr_eq(x, h));
        }
    }
}

fn listed(e: crate::index::DirEntry) -> ListedEntry {
    ListedEntry {
        name: e.name.as_bytes().to_vec(),
        attr: e.attr,
    }
}
