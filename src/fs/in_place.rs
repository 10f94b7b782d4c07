//! Writers whose writes never reach simfs: the kernel makes them straight into the local copy.
//!
//! With FUSE passthrough the kernel reads a cached file directly, and it holds an inode in
//! one I/O mode at a time: while a reader has it open that way, a writer's open must be
//! passthrough on the same backing file too. Such a writer's `write(2)`s and shared mappings
//! land in the file with no WRITE request. So its local copy is made *the backing file
//! itself* (the cached copy is renamed into place, never copied; `O_TRUNC` truncates it in
//! place), and its writes are found afterwards:
//!
//! - when the first such writer of an inode opens, the copy's mtime is set to a sentinel no
//!   write can produce (the epoch); any write, through `write(2)` or a mapping, moves it to
//!   the current time;
//! - each flush, fsync and release of the inode looks: a moved mtime marks the inode written
//!   with the file's length, and close and fsync upload as after any write;
//! - the sentinel is never reset while such writers remain, so a write racing a look is
//!   never forgotten (at worst the file is uploaded once more than needed);
//! - meanwhile getattr reports the file's own length and mtime, which the kernel tracks
//!   for the writer too;
//! - a marker file beside the copy (`<ino>.in-place`) lives from the first such writer's
//!   open to the last one's release: after a crash, the next mount uploads the copies it
//!   marks, since their writes may never have reached the journal.
//!
//! Writers that arrive while no one reads in place write through simfs as usual; this path
//! exists because the kernel gives no other choice.

use super::{FsError, FsResult, ListedEntry, SimFs};
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
                // Before any write can happen: a crash from here on leaves the marker, and
                // the next mount uploads the copy (`Scheduler::recover`).
                File::create(self.local.in_place_marker(h.ino))?;
                file.set_modified(UNWRITTEN)?;
                self.in_place.count.fetch_add(1, Ordering::AcqRel);
                e.insert(Writers { handles: 0, file })
            }
        };
        w.handles += 1;
        h.in_place.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Takes in what writers in place wrote to `ino` so far into the index (its size and
    /// times, pending upload); whether they wrote anything.
    pub(super) fn adopt_in_place(&self, ino: u64) -> FsResult<bool> {
        let Some(file) = self.in_place.file(ino) else {
            return Ok(false);
        };
        let md = file.metadata()?;
        if md.modified()? == UNWRITTEN {
            return Ok(false);
        }
        let (now, due) = self.due()?;
        self.index.wrote(ino, md.len(), now, due)?;
        self.changed(due);
        Ok(true)
    }

    /// Writer `fh` in place is closed: a last look at its writes, and the inode leaves the
    /// in-place set with its last writer.
    pub(super) fn release_in_place(&self, ino: u64) -> FsResult<()> {
        let adopted = self.adopt_in_place(ino);
        let mut writers = self.in_place.writers();
        if let Some(w) = writers.get_mut(&ino) {
            w.handles -= 1;
            if w.handles == 0 {
                writers.remove(&ino);
                self.in_place.count.fetch_sub(1, Ordering::AcqRel);
                // The journal knows everything now; unless it could not be told.
                if adopted.is_ok() {
                    let _ = std::fs::remove_file(self.local.in_place_marker(ino));
                }
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

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture, path, read_all, World};
    use super::super::write_tests::rw;
    use super::*;
    use std::os::unix::fs::FileExt;

    const CKPT: &str = "ckpt/step-100.pt";

    /// A reader of the whole cached checkpoint as the kernel reads it in passthrough: its
    /// handle and the backing file registered for it.
    fn read_in_place(w: &World) -> (u64, u64, File) {
        // The first read hydrates; a later open finds the whole cached copy.
        read_all(w, CKPT).unwrap();
        w.fs.cache().settle();
        let ino = path(w, CKPT).unwrap().ino;
        let fh = w.fs.open(ino, false, false).unwrap();
        assert!(
            w.fs.passthrough_file(fh, 10_001).is_none(),
            "under the minimum"
        );
        let backing =
            w.fs.passthrough_file(fh, 10_000)
                .expect("a whole cached copy");
        (ino, fh, backing)
    }

    /// A writer of `ino` that joins the reader in place, as `fuse.rs` opens one.
    fn writer_in_place(w: &World, ino: u64, backing: &File, truncate: bool) -> u64 {
        let fh = w.fs.open(ino, true, truncate).unwrap();
        w.fs.write_in_place(fh, backing).unwrap();
        fh
    }

    #[test]
    fn a_writer_joining_a_file_read_in_place_writes_that_file_and_its_close_uploads() {
        let w = rw(fixture());
        let (ino, reader, backing) = read_in_place(&w);
        let writer = writer_in_place(&w, ino, &backing, false);
        // The kernel writes the backing file directly, past simfs.
        backing.write_all_at(b"NEW", 0).unwrap();
        backing.write_all_at(b"TAIL", 10_000).unwrap();
        assert_eq!(
            w.fs.getattr(ino).unwrap().size,
            10_004,
            "stat follows the writer before its close"
        );
        w.fs.flush(writer).unwrap();
        let mut want = vec![7u8; 10_000];
        want[..3].copy_from_slice(b"NEW");
        want.extend_from_slice(b"TAIL");
        assert_eq!(w.store.inner().data(CKPT).unwrap(), want, "close uploaded");
        assert_eq!(w.fs.read(reader, 0, 20_000).unwrap(), want);
        w.fs.release(writer).unwrap();
        w.fs.release(reader).unwrap();
        assert_eq!(read_all(&w, CKPT).unwrap(), want);
        assert_eq!(path(&w, CKPT).unwrap().size, 10_004);
    }

    #[test]
    fn a_writer_in_place_that_writes_nothing_uploads_nothing() {
        let w = rw(fixture());
        let (ino, reader, backing) = read_in_place(&w);
        let puts = || w.store.counters.put.load(Ordering::SeqCst);
        let before = puts();
        let writer = writer_in_place(&w, ino, &backing, false);
        w.fs.flush(writer).unwrap();
        w.fs.release(writer).unwrap();
        w.fs.fsync(ino).unwrap();
        assert_eq!(puts(), before);
        w.fs.release(reader).unwrap();
    }

    #[test]
    fn a_second_writer_in_place_never_hides_what_the_first_wrote() {
        let w = rw(fixture());
        let (ino, reader, backing) = read_in_place(&w);
        let first = writer_in_place(&w, ino, &backing, false);
        backing.write_all_at(b"ONE", 0).unwrap();
        // A second writer arrives before anyone looked: the evidence must survive it.
        let second = writer_in_place(&w, ino, &backing, false);
        w.fs.flush(second).unwrap();
        w.fs.release(second).unwrap();
        assert_eq!(&w.store.inner().data(CKPT).unwrap()[..3], b"ONE");
        // A write after the first look is found by the next one (fsync here).
        backing.write_all_at(b"TWO", 3).unwrap();
        w.fs.fsync(ino).unwrap();
        assert_eq!(&w.store.inner().data(CKPT).unwrap()[..6], b"ONETWO");
        w.fs.release(first).unwrap();
        w.fs.release(reader).unwrap();
    }

    #[test]
    fn o_trunc_in_place_empties_the_very_file_the_kernel_reads() {
        let w = rw(fixture());
        let (ino, reader, backing) = read_in_place(&w);
        let writer = writer_in_place(&w, ino, &backing, true);
        assert_eq!(backing.metadata().unwrap().len(), 0);
        backing.write_all_at(b"fresh", 0).unwrap();
        w.fs.flush(writer).unwrap();
        assert_eq!(w.store.inner().data(CKPT).unwrap(), "fresh");
        w.fs.release(writer).unwrap();
        w.fs.release(reader).unwrap();
    }

    #[test]
    fn a_writer_whose_copy_is_not_the_kernels_file_is_refused() {
        let w = rw(fixture());
        let (ino, reader, _) = read_in_place(&w);
        let elsewhere = tempfile::tempfile().unwrap();
        let writer = w.fs.open(ino, true, false).unwrap();
        let e = w.fs.write_in_place(writer, &elsewhere).unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY);
        w.fs.release(writer).unwrap();
        w.fs.release(reader).unwrap();
        assert_eq!(read_all(&w, CKPT).unwrap(), vec![7u8; 10_000]);
    }

    #[test]
    fn truncating_a_file_read_in_place_by_path_truncates_the_file_the_kernel_reads() {
        let w = rw(fixture());
        let (ino, reader, backing) = read_in_place(&w);
        let empty = crate::posix::AttrChanges {
            size: Some(0),
            ..Default::default()
        };
        w.fs.setattr(ino, &empty).unwrap();
        assert_eq!(backing.metadata().unwrap().len(), 0, "the readers see it");
        // A writer joining later shares that same file.
        let writer = writer_in_place(&w, ino, &backing, false);
        w.fs.release(writer).unwrap();
        w.fs.release(reader).unwrap();
    }

    #[test]
    fn writes_in_place_cut_short_by_a_crash_are_uploaded_by_the_next_mount() {
        use super::super::tests::world_on;
        use super::super::write_tests::{copy_dir, drain, fresh};
        let store = Arc::new(crate::blob::faulty::FaultyStore::new(fixture()));
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().to_path_buf();
        let hour = Some(std::time::Duration::from_secs(3600));
        let w = world_on(store.clone(), dir, "", 1 << 20, hour);
        let (ino, _reader, backing) = read_in_place(&w);
        writer_in_place(&w, ino, &backing, false);
        backing.write_all_at(b"CUT", 0).unwrap();
        // "kill -9" before any close, fsync or release.
        std::mem::forget(w);
        let dir = tempfile::TempDir::new().unwrap();
        copy_dir(&keep, dir.path());
        let again = world_on(store.clone(), dir, "", 1 << 20, hour);
        drain(&again);
        let n = fresh(&again);
        let mut want = vec![7u8; 10_000];
        want[..3].copy_from_slice(b"CUT");
        assert_eq!(read_all(&n, CKPT).unwrap(), want);
    }
}
