//! Local copies: the files of inodes being written, `local/<ino>` on the cache disk.
//!
//! Once an inode has a local copy (the index says so), that copy *is* its data until it is
//! uploaded and beyond: reads and writes go to it, write-back uploads from it. It is never
//! evicted and is removed only with its inode. A hydrated clean copy is moved into place, not
//! copied, so read handles opened before the first write (and a kernel reading the clean copy
//! in passthrough) see the writes too, as on a local disk.
//!
//! A mark on a copy says writers may be writing it in place, past the journal
//! (`fs::in_place`): a crash leaves it for mount-time recovery to find (`marks`).
//!
//! A deleted inode's copy is emptied and kept for a new inode when no one else has it open
//! (`spares`): allocating inodes after many were freed is slow on ext4 without a journal.
//!
//! This sits above the clean cache (`cache`), which it asks for a whole clean copy to take
//! over; nothing below calls up into it.

use crate::blob::BlobRef;
use crate::cache::{Cache, CacheError};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod marks;
mod spares;

pub struct LocalCopies {
    dir: PathBuf,
    cache: Arc<Cache>,
    spares: spares::Spares,
    marks: marks::Marks,
}

impl LocalCopies {
    /// Local copies in `dir` (created 0700), taking clean copies over from `cache`.
    pub fn new(dir: &Path, cache: Arc<Cache>) -> std::io::Result<LocalCopies> {
        crate::cache::private_dir(dir)?;
        Ok(LocalCopies {
            dir: dir.to_path_buf(),
            cache,
            spares: spares::Spares::new(&dir.join("spare"))?,
            marks: marks::Marks::new(dir),
        })
    }

    /// The local copy of inode `ino`.
    pub fn path(&self, ino: u64) -> PathBuf {
        self.dir.join(ino.to_string())
    }

    /// Marks `ino`'s local copy, open as `copy`, as written in place from now on: a crash
    /// leaves the mark for recovery (`marked_in_place`).
    pub fn mark_in_place(&self, ino: u64, copy: &File) -> std::io::Result<()> {
        self.marks.mark(ino, copy)
    }

    /// Removes `ino`'s mark (its copy open as `copy`): the journal knows its writes.
    pub fn unmark_in_place(&self, ino: u64, copy: &File) {
        self.marks.unmark(ino, copy)
    }

    /// Whether `ino`'s copy was marked as written in place when simfs last stopped.
    pub fn marked_in_place(&self, ino: u64) -> bool {
        self.marks.marked(ino, &self.path(ino))
    }

    /// Removes the mark of `ino`'s copy, found by recovery (`marked_in_place`), once the
    /// journal has taken the copy in.
    pub fn clear_in_place_mark(&self, ino: u64) {
        self.marks.clear(ino, &self.path(ino))
    }

    /// Opens the local copy of `ino`, read-write when `write`.
    pub fn open(&self, ino: u64, write: bool) -> Result<File, CacheError> {
        Ok(OpenOptions::new()
            .read(true)
            .write(write)
            .open(self.path(ino))?)
    }

    /// Gives `ino` a local copy: the hydrated blob moved into place, or an empty file when
    /// there is no blob or its content is about to be discarded (`empty`).
    pub fn make(&self, ino: u64, blob: Option<&BlobRef>, empty: bool) -> Result<(), CacheError> {
        match blob {
            Some(b) if !empty => self.cache.take_whole(ino, b, &self.path(ino)),
            _ => self.make_empty(ino).map(drop),
        }
    }

    /// Gives `ino` an empty local copy and returns it open read-write: a create's handle
    /// needs no second open of the file it just made.
    pub fn make_empty(&self, ino: u64) -> Result<File, CacheError> {
        Ok(self.spares.make_empty(&self.path(ino))?)
    }

    /// Removes the local copy of a deleted inode.
    pub fn remove(&self, ino: u64) {
        self.spares.remove(&self.path(ino));
    }
}
