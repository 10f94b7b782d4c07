//! Writers whose writes never reach simfs: the kernel makes them straight into the local copy.
//!
//! With FUSE passthrough the kernel reads and writes a file on the cache disk directly. A
//! create for writing, or an open for writing of a file written on this node, starts it
//! (`fuse.rs`: dd, torch.save, fio, databases, git's packs then write at the disk's speed).
//! The kernel holds an inode in one I/O mode at a time: while a reader has it open that
//! way, a writer's open must be passthrough on the same backing file too. Such a writer's
//! `write(2)`s and shared mappings land in the file with no WRITE request. So its local copy
//! is made *the backing file itself* (the cached copy is renamed into place, never copied;
//! `O_TRUNC` truncates it in place), and its writes are found afterwards:
//!
//! - when the first such writer of an inode opens, the copy's mtime is set to a sentinel no
//!   write can produce (the epoch); any write, through `write(2)` or a mapping, moves it to
//!   the current time;
//! - each flush, fsync and release of the inode looks: a moved mtime marks the inode written
//!   with the file's length and that mtime, and close and fsync upload as after any write;
//! - a look never resets the sentinel while such writers remain, so a write racing a look is
//!   never forgotten (at worst the file is taken in again with nothing new; its upload
//!   then finds the copy as its last upload committed it and sends no data, see
//!   `writeback::settled`);
//! - meanwhile getattr reports the file's own length and mtime, which the kernel tracks
//!   for the writer too;
//! - a time set meanwhile (`utimes`, as rsync and `cp -p` set it after writing; a truncate)
//!   takes in the writes made so far first and puts the sentinel back, so the next look
//!   does not take the time set for a new write. Looks and time sets hold the inode's lock
//!   from reading the copy's mtime to writing the index: the kernel's release of a handle
//!   arrives after close has returned, so its look can race the `utimes` that follows. A
//!   write racing a time set is still uploaded (the upload reads the file), but its time
//!   and length wait for the next write's look;
//! - a mark on the copy (`LocalCopies::mark_in_place`) lives from the first such writer's
//!   open to the last one's release: after a crash, the next mount uploads the copies it
//!   marks, since their writes may never have reached the journal.
//!
//! The writes are not seen as they happen, so the file's blocks are staged ahead by
//! looking at its length instead (`writeback::unseen`), and checked before the commit.
//! Writers of files not written on this node (only cached clean) write through simfs.

use super::{FsError, FsResult, ListedEntry, SimFs};
use crate::locks::InodeLocks;
use crate::posix::Attr;
use std::collections::hash_map::{Entry, HashMap};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// The mtime of a local copy that no in-place writer has written yet.
const UNWRITTEN: SystemTime = UNIX_EPOCH;

/// Inodes with writers in place, and the file they write.
#[derive(Default)]
pub(super) struct InPlace {
    writers: Mutex<HashMap<u64, Writers>>,
    /// How many inodes have writers in place: getattr looks at the map only when some do.
    count: std::sync::atomic::AtomicUsize,
    /// Held by a look and by a time set, each from reading the copy's mtime to writing the
    /// index: the release of a handle comes after its close has returned, so it can race
    /// the `utimes` that follows (see `before_times_set`).
    looks: InodeLocks,
}

struct Writers {
    handles: usize,
    file: Arc<File>,
}

impl InPlace {
    fn writers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Writers>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn file(&self, ino: u64) -> Option<Arc<File>> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.writers().get(&ino).map(|w| w.file.clone())
    }
}

/// Whether two open files are one file on disk.
pub(super) fn same_file(a: &File, b: &File) -> std::io::Result<bool> {
    let (a, b) = (a.metadata()?, b.metadata()?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

impl SimFs {
    /// Writer `fh` writes `backing` directly, as the kernel does once its open is answered in
    /// passthrough. Its local copy is made now by moving the whole cached copy into place (an
    /// `O_TRUNC` open already did so: see `make_local`), so it is that very file; refused
    /// (EBUSY) otherwise, since the kernel's writes would land where simfs never looks.
    pub fn write_in_place(&self, fh: u64, backing: &File) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        if !h.write {
            return Err(FsError::BadHandle);
        }
        self.make_local(h.ino, false)?;
        let super::Data::Local(file) = self.readable(&h)? else {
            return Err(FsError::BadHandle);
        };
        if !same_file(&file, backing)? {
            return Err(FsError::Busy);
        }
        let mut writers = self.in_place.writers();
        let w = match writers.entry(h.ino) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                // Before any write can happen: a crash from here on leaves the mark, and
                // the next mount uploads the copy (`Scheduler::recover`).
                self.local.mark_in_place(h.ino, &file)?;
                file.set_modified(UNWRITTEN)?;
                self.in_place.count.fetch_add(1, Ordering::AcqRel);
                e.insert(Writers { handles: 0, file })
            }
        };
        w.handles += 1;
        h.in_place.store(true, Ordering::Relaxed);
        // Its writes reach the file unseen: until its close it counts as writing, and its
        // blocks are staged ahead by looking (`writeback::unseen`).
        self.hold_upload(&h);
        if let Some(wb) = &self.writeback {
            // The kernel's writes never ask for room: the cache makes it as the file grows,
            // evicting clean copies (a full disk fails the writer's own write, ENOSPC).
            let (cache, ino) = (self.cache.clone(), h.ino);
            let warned = std::sync::atomic::AtomicBool::new(false);
            let grew = Arc::new(move |bytes| {
                if cache.check_room(bytes).is_err() && !warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "inode {ino}, written in place, is filling the cache disk past the writers' reserve (see cache.md, \"Not yet\")"
                    );
                }
            });
            wb.write_unseen(h.ino, backing.metadata()?.len(), grew);
        }
        Ok(())
    }

    /// Takes in what writers in place wrote to `ino` so far into the index (its size and
    /// times, pending upload); whether they wrote anything.
    pub(super) fn adopt_in_place(&self, ino: u64) -> FsResult<bool> {
        let Some(file) = self.in_place.file(ino) else {
            return Ok(false);
        };
        let _look = self.in_place.looks.lock(&ino);
        self.adopt_file(ino, &file)
    }

    /// `adopt_in_place` with the look's lock held.
    fn adopt_file(&self, ino: u64, file: &File) -> FsResult<bool> {
        let md = file.metadata()?;
        let mtime = md.modified()?;
        if mtime == UNWRITTEN {
            return Ok(false);
        }
        // The copy's own mtime, the time of the last write the kernel made, not the look's:
        // a look that finds nothing new since the last one then changes nothing either, and
        // a file fsynced and then closed keeps the metadata its fsync committed.
        let (_, due) = self.due()?;
        self.index.wrote(ino, md.len(), mtime, due)?;
        self.changed(due);
        Ok(true)
    }

    /// The times of `ino` are about to be set: writes made in place so far are taken in
    /// first, and the copy's mtime goes back to the sentinel (see the module's notes).
    pub(super) fn before_times_set(&self, ino: u64) -> FsResult<()> {
        let Some(file) = self.in_place.file(ino) else {
            return Ok(());
        };
        // A look between this one and the sentinel would read the write's time and could
        // record it after the time being set: rsync, and a Python copy setting times after
        // its close, lost the times they set (on a `sync` mount, where the release is
        // answered off the FUSE thread).
        let _look = self.in_place.looks.lock(&ino);
        self.adopt_file(ino, &file)?;
        file.set_modified(UNWRITTEN)?;
        Ok(())
    }

    /// Writer `fh` in place is closed: a last look at its writes, and the inode leaves the
    /// in-place set with its last writer.
    pub(super) fn release_in_place(&self, ino: u64) -> FsResult<()> {
        let adopted = self.adopt_in_place(ino);
        let mut writers = self.in_place.writers();
        let last = writers.get_mut(&ino).is_some_and(|w| {
            w.handles -= 1;
            w.handles == 0
        });
        if let Some(w) = last.then(|| writers.remove(&ino)).flatten() {
            self.in_place.count.fetch_sub(1, Ordering::AcqRel);
            if let Ok(wb) = self.writable() {
                wb.unseen_done(ino);
            }
            // The journal knows everything now; unless it could not be told.
            if adopted.is_ok() {
                self.local.unmark_in_place(ino, &w.file);
            }
        }
        adopted.map(|_| ())
    }

    /// `a` as the kernel must see it: while writers write in place, the file's own length and
    /// mtime (the index learns them at the next flush).
    pub(super) fn live(&self, mut a: Attr) -> Attr {
        if let Some(md) = self.in_place.file(a.ino).and_then(|f| f.metadata().ok()) {
            a.size = md.len();
            if let Ok(t) = md.modified() {
                if t != UNWRITTEN {
                    a.mtime = t;
                    a.ctime = t;
                }
            }
        }
        a
    }

    /// A listing's attributes as the kernel must see them (see `live`).
    pub(super) fn live_page(&self, mut page: Vec<(u64, ListedEntry)>) -> Vec<(u64, ListedEntry)> {
        if self.in_place.count.load(Ordering::Acquire) > 0 {
            for (_, e) in &mut page {
                e.attr = self.live(e.attr.clone());
            }
        }
        page
    }
}
