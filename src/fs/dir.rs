//! Open directories, read from the index a page at a time.
//!
//! A handle keeps a window of entries fetched in name order and the name that ends it: the
//! next page starts after that name (a keyset, not a position), so an entry that stays in the
//! directory is listed exactly once even while others are added or removed, and memory holds
//! one page however large the directory. The kernel continues from the cookie of the last
//! entry it took, usually inside the window or at its end; any other offset (a `seekdir` to an
//! old position, a rewind) is served by position. `.` and `..` are positions 0 and 1, with
//! their attributes as of `opendir`.

use super::{FsResult, ListedEntry};
use crate::index::Index;
use std::collections::VecDeque;
use std::sync::Mutex;

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
        if pos < w.first || pos > end_of_window {
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
}

fn listed(e: crate::index::DirEntry) -> ListedEntry {
    ListedEntry {
        name: e.name.as_bytes().to_vec(),
        attr: e.attr,
    }
}
