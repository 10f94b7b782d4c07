//! POSIX semantics over the index and the cache, with no FUSE types.
//!
//! `SimFs` is what `fuse.rs` calls: every operation takes plain arguments and returns an
//! `FsResult`, so unit tests drive it directly. Metadata operations (lookup, getattr,
//! readdir, readlink, statfs) read only the index. `open` of a regular file hydrates it
//! into the cache (the only network access) and keeps an open `File` in a handle table;
//! `read` is a `pread` on that file. Directory handles read the index a page at a time
//! (`dir.rs`), so listing a directory of millions of entries holds one page.
//!
//! Inodes live in the index and survive `forget`; the kernel's lookup counts need no
//! bookkeeping because an inode is only freed once unlinked and closed (open handles are
//! counted in `pins`, which write-back, the refresh and eviction read). Changes (`write.rs`)
//! go to the index and the local copy first; `writeback` takes them to the container, asked
//! by fsync (and close on a `sync` mount) and told of every change and close so its
//! background thread wakes when one is due.
//!
//! Errors of every layer below become errnos in one place, `error.rs`.

mod dir;
pub mod error;
mod handle;
mod in_place;
mod levels;
mod prefetch;
pub mod stage;
pub mod write;

use handle::{Data, OpenFile};

use crate::cache::Cache;
use crate::index::names::{Name, NameError};
use crate::index::Index;
use crate::local::LocalCopies;
use crate::locks::InodeLocks;
use crate::pins::Pins;
pub use crate::posix::{Attr, AttrChanges, Kind, RenameMode, SetTime};
use crate::refresh::Refresher;
use crate::writeback::Writeback;
pub use error::{FsError, FsResult};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What `statfs` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsStats {
    pub blocks: u64,
    pub blocks_free: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// One entry of a directory listing, `.` and `..` included, as readdir returns it.
#[derive(Clone, Debug)]
pub struct ListedEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

enum Handle {
    File(Arc<OpenFile>),
    Dir(Arc<dir::DirHandle>),
}

pub struct SimFs {
    index: Arc<Index>,
    /// Clean copies of blobs.
    cache: Arc<Cache>,
    /// The data of inodes being written.
    local: Arc<LocalCopies>,
    /// Open handles per inode.
    pins: Arc<Pins>,
    /// None on a read-only mount.
    writeback: Option<Arc<Writeback>>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Giving an inode its local copy happens once per inode at a time (no other waits).
    localizing: InodeLocks,
    next_fh: AtomicU64,
    /// Brings others' changes in (a read that finds its blob changed refreshes its entry).
    refresher: Arc<Refresher>,
    /// Listings the kernel reads without opening the directory.
    cursors: dir::Cursors,
    /// Writers the kernel serves straight from the local copy.
    in_place: in_place::InPlace,
}

pub const BLOCK_SIZE: u32 = 4096;

/// The name of an entry that should exist: "." and ".." are resolved by the kernel, and
/// anything else invalid cannot exist, except that an overlong name says so.
fn existing_name(name: &OsStr) -> FsResult<Name> {
    Name::from_os(name).map_err(|e| match e {
        NameError::TooLong => FsError::Name(e),
        _ => FsError::NotFound,
    })
}

impl SimFs {
    /// A filesystem over `index`, the clean `cache` and the `local` copies, counting open
    /// handles in `pins`; read-write when `writeback` uploads changes.
    pub fn new(
        index: Arc<Index>,
        cache: Arc<Cache>,
        local: Arc<LocalCopies>,
        pins: Arc<Pins>,
        writeback: Option<Arc<Writeback>>,
        refresher: Arc<Refresher>,
    ) -> SimFs {
        SimFs {
            index,
            cache,
            local,
            pins,
            writeback,
            handles: Mutex::new(HashMap::new()),
            localizing: InodeLocks::default(),
            next_fh: AtomicU64::new(1),
            refresher,
            cursors: dir::Cursors::default(),
            in_place: in_place::InPlace::default(),
        }
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn refresher(&self) -> &Arc<Refresher> {
        &self.refresher
    }

    /// The write-back engine (None on a read-only mount).
    pub fn writeback(&self) -> Option<&Arc<Writeback>> {
        self.writeback.as_ref()
    }

    fn attr(&self, ino: u64) -> FsResult<Attr> {
        self.index.getattr(ino)?.ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = existing_name(name)?;
        match self.index.lookup(parent, &name)? {
            Some(a) => Ok(self.live(a)),
            None => {
                let p = self.attr(parent)?;
                Err(if p.kind == Kind::Dir {
                    FsError::NotFound
                } else {
                    FsError::NotDir
                })
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        Ok(self.live(self.attr(ino)?))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match self.index.readlink(ino)? {
            Some(t) => Ok(t),
            None => {
                self.attr(ino)?;
                Err(FsError::NotSymlink)
            }
        }
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let h = self.dir_handle(ino)?;
        Ok(self.insert_handle(Handle::Dir(Arc::new(h))))
    }

    fn dir_handle(&self, ino: u64) -> FsResult<dir::DirHandle> {
        let me = self.attr(ino)?;
        if me.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let parent = self.attr(self.index.parent_of(ino)?)?;
        let dots = [
            ListedEntry {
                name: b".".to_vec(),
                attr: me,
            },
            ListedEntry {
                name: b"..".to_vec(),
                attr: parent,
            },
        ];
        Ok(dir::DirHandle::new(ino, dots))
    }

    /// Entries of directory `ino` from `offset` on, as `readdir`, for a kernel that lists
    /// without opening (no handle: a window is found by the offset).
    pub fn readdir_unopened(&self, ino: u64, offset: u64) -> FsResult<Vec<(u64, ListedEntry)>> {
        let h = self.cursors.at(ino, offset, || self.dir_handle(ino))?;
        let page = h.read(&self.index, offset)?;
        if page.is_empty() {
            self.cursors.finished(ino, &h);
        }
        Ok(self.live_page(page))
    }

    /// Entries of an open directory from position `offset` on (`.` is 0, `..` is 1), each with
    /// its cookie (its position + 1: the offset that continues after it); a page at a time,
    /// empty at the end.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<(u64, ListedEntry)>> {
        let h = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Dir(d)) => d.clone(),
            _ => return Err(FsError::BadHandle),
        };
        Ok(self.live_page(h.read(&self.index, offset)?))
    }

    /// Every entry of an open directory, `.` and `..` first (tests).
    #[cfg(any(test, feature = "test-util"))]
    pub fn read_dir_all(&self, fh: u64) -> FsResult<Vec<ListedEntry>> {
        let mut out = Vec::new();
        loop {
            let page = self.readdir(fh, out.len() as u64)?;
            if page.is_empty() {
                return Ok(out);
            }
            out.extend(page.into_iter().map(|(_, e)| e));
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    /// Opens a regular file without waiting for the network: an uncached blob starts
    /// filling and reads wait for their ranges; a file opened for writing gets its local
    /// copy when its data is first used (`truncate`: its old content is not needed).
    pub fn open(&self, ino: u64, write: bool, truncate: bool) -> FsResult<u64> {
        let attr = self.attr(ino)?;
        match attr.kind {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::File => {}
            // The kernel follows links and serves special files itself.
            _ => return Err(FsError::NotFound),
        }
        if write {
            self.writable()?;
            if truncate {
                self.make_local(ino, true)?;
                if attr.size > 0 {
                    let empty = crate::posix::AttrChanges {
                        size: Some(0),
                        ..Default::default()
                    };
                    self.setattr(ino, &empty)?;
                }
            }
        }
        let data = if write && !self.index.is_local(ino)? {
            Data::Deferred
        } else {
            self.data_for_read(ino, write)?
        };
        self.pins.pin(ino);
        let fh = self.insert_handle(OpenFile::handle(ino, write, data));
        if truncate && write {
            self.note_written(fh);
        }
        Ok(fh)
    }

    /// Whether a flush of `fh` may wait: for its upload (a `sync` mount) or for room in the
    /// write-back window, if it wrote (an in-place writer may have: its look is a stat and
    /// an index update, as a write's record is). One that cannot is answered on the FUSE
    /// thread, without handing it to another thread first.
    pub fn flush_may_wait(&self, fh: u64) -> bool {
        let Ok(h) = self.file_handle(fh) else {
            return false;
        };
        h.write && h.may_have_written() && self.window_may_hold_close()
    }

    /// Whether a release of `fh` may wait: for room in the write-back window (a writer's
    /// last close, an in-place writer's too), or to delete an unlinked file's blobs (its last
    /// close). Any other release is a few updates in memory and at most a look at an in-place
    /// writer's copy, answered on the FUSE thread. (A file unlinked between this check and
    /// the release has its blobs deleted on the FUSE thread: correct, only slower.)
    pub fn release_may_wait(&self, fh: u64) -> bool {
        let Ok(h) = self.file_handle(fh) else {
            return false;
        };
        let in_place = h.in_place.load(std::sync::atomic::Ordering::Relaxed);
        if (in_place || h.is_writing()) && self.window_may_hold_close() {
            return true;
        }
        self.attr(h.ino).map_or(true, |a| a.nlink == 0)
    }

    /// Whether a writer's close may have to wait for room in the write-back window (or for
    /// its upload, on a `sync` mount).
    fn window_may_hold_close(&self) -> bool {
        self.writeback
            .as_ref()
            .is_some_and(|wb| wb.close_may_wait())
    }

    /// Gives `ino` its local copy if it has none yet. The download happens before the
    /// inode's lock is taken (concurrent callers share it through the cache's
    /// single-flight), so no lock is held across the network and other inodes never wait.
    fn make_local(&self, ino: u64, empty: bool) -> FsResult<()> {
        if self.index.is_local(ino)? {
            return Ok(());
        }
        let mut blob = self.index.blob_of(ino)?;
        // An open file's whole cached copy is moved into place even when its content is
        // about to go: that costs nothing (open files are never evicted), and keeps the file
        // the kernel may be reading directly (passthrough), so its readers see the change.
        let empty = empty
            && !blob
                .as_ref()
                .is_some_and(|b| self.is_open(ino) && self.cache.is_hydrated(b));
        if let (Some(b), false) = (&blob, empty) {
            match self.cache.hydrate(ino, b) {
                Err(e) if e.is_changed() && self.blob_changed(ino) => {
                    // Rewritten elsewhere since it was indexed: start from the new version.
                    blob = self.index.blob_of(ino)?;
                    if let Some(b) = &blob {
                        self.cache.hydrate(ino, b)?;
                    }
                }
                r => r?,
            }
        }
        let _one = self.localizing.lock(&ino);
        if self.index.is_local(ino)? {
            return Ok(());
        }
        self.local.make(ino, blob.as_ref(), empty)?;
        self.index.set_local(ino)?;
        Ok(())
    }

    /// Closes a handle. The last close of an unlinked file frees it (and its blobs).
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let Some(Handle::File(h)) = self.handles.lock().unwrap().remove(&fh) else {
            return Ok(());
        };
        let ino = h.ino;
        // A failure to take in writes made in place is reported after the handle is gone.
        let adopted = match h.in_place.load(Ordering::Relaxed) {
            true => self.release_in_place(ino),
            false => Ok(()),
        };
        // Written since the last close that counted (only other processes' copies of the
        // descriptor were closed since): the writer is done now. (On a `sync` mount every
        // close commits; a release is not a close anyone waits for.)
        let pending_close = self.writeback.as_ref().is_some_and(|wb| !wb.is_sync());
        let finished = match h.is_writing() && pending_close {
            true => self.writer_done(&h),
            false => Ok(()),
        };
        self.done_writing(&h);
        let last = self.pins.unpin(ino);
        if last && self.attr(ino).is_ok_and(|a| a.nlink == 0) {
            if let Some(wb) = &self.writeback {
                self.index.mark_pending(ino, std::time::SystemTime::now())?;
                wb.settle_deleted(ino).map_err(Arc::new)?;
            } else {
                // Deleted or replaced in the container by a refresh while open: nothing
                // to upload, the row just goes.
                self.index.forget_unlinked(ino)?;
            }
        }
        adopted.and(finished)
    }

    /// Refreshes `ino`'s entry after its blob was found changed; whether the index changed.
    fn blob_changed(&self, ino: u64) -> bool {
        self.refresher.refresh_inode(ino).unwrap_or_else(|e| {
            tracing::warn!("inode {ino}: refreshing its changed blob failed: {e}");
            false
        })
    }

    fn is_open(&self, ino: u64) -> bool {
        self.pins.is_open(ino)
    }

    pub fn statfs(&self) -> FsResult<FsStats> {
        let (files, bytes) = self.index.totals()?;
        // A writable mount reports the cache disk's free space: that is what a writer can
        // fill before the next upload frees nothing (uploads do not free local copies).
        let (blocks_free, files_free) = match &self.writeback {
            Some(_) => self.cache.free_space().unwrap_or((0, 0)),
            None => (0, 0),
        };
        let blocks_free = blocks_free / BLOCK_SIZE as u64;
        Ok(FsStats {
            blocks: bytes.div_ceil(BLOCK_SIZE as u64) + blocks_free,
            blocks_free,
            files: files + files_free,
            files_free,
            block_size: BLOCK_SIZE,
            name_max: crate::index::names::NAME_MAX as u32,
        })
    }

    fn insert_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, h);
        fh
    }

    pub fn is_read_only(&self) -> bool {
        self.writeback.is_none()
    }

    /// Number of open file and directory handles (tests check nothing leaks).
    #[cfg(any(test, feature = "test-util"))]
    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap().len()
    }
}
