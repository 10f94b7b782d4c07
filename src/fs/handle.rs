//! Open files: what a handle reads from and writes to, decided as late as possible.
//!
//! A handle's data is the inode's local copy, the clean cached blob (possibly still filling:
//! reads wait only for their own range), or, for a handle opened for writing that has not
//! touched its data yet, nothing (`Deferred`). Deferring is what spares downloads: an
//! `open(O_TRUNC)` arrives as an open and then a truncate to 0, and a first write that covers
//! the whole file needs none of the old content either; only a read or a partial write makes
//! the old content come down. Without FUSE_ATOMIC_O_TRUNC (see `fuse.rs`) this is how a
//! truncating open of an uncached checkpoint costs no GET.

use super::{FsError, FsResult, Handle, SimFs};
use crate::cache::Content;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub(super) enum Data {
    /// The inode's local copy (read-write for a writable handle).
    Local(Arc<File>),
    /// The clean cached blob.
    Cached(Content),
    /// Opened for writing, data untouched so far.
    Deferred,
}

pub(super) struct OpenFile {
    pub ino: u64,
    pub write: bool,
    pub data: Mutex<Data>,
    /// Whether a read returned data: until then the handle may move to a newer version.
    served: AtomicBool,
    /// Whether data changed through this handle (a write, a truncate, `O_TRUNC`): only then
    /// does its close record the file for upload (or, on a `sync` mount, wait for it). A lock
    /// file created and closed unwritten (git's `index.lock`) is a namespace change like
    /// `mkdir`, left to the background.
    pub wrote: AtomicBool,
    /// Whether data changed through this handle since its last flush: it counts as writing
    /// in `pins` meanwhile, and the upload waits for it.
    writing: AtomicBool,
    /// Whether the kernel writes this handle's data straight to the local copy (`in_place`).
    pub in_place: AtomicBool,
    /// The process that opened the handle (0: not known). A child process holds a copy of
    /// the descriptor from a fork until it closes it or execs, and that close reaches simfs
    /// as a flush of this handle like the opener's own close: only the opener's says the
    /// writer is done (see `SimFs::flush_by`).
    opener: AtomicU32,
}

/// The free space above the writers' reserve below which no writer goes in place (its
/// writes could not be refused at the reserve).
pub const IN_PLACE_HEADROOM: u64 = 1 << 30;

impl OpenFile {
    pub fn handle(ino: u64, write: bool, data: Data) -> Handle {
        Handle::File(Arc::new(OpenFile {
            ino,
            write,
            data: Mutex::new(data),
            served: AtomicBool::new(false),
            wrote: AtomicBool::new(false),
            writing: AtomicBool::new(false),
            in_place: AtomicBool::new(false),
            opener: AtomicU32::new(0),
        }))
    }

    /// Whether a flush by process `pid` comes from another process than the opener.
    pub fn flushed_by_another(&self, pid: u32) -> bool {
        let opener = self.opener.load(Ordering::Relaxed);
        opener != 0 && pid != 0 && pid != opener
    }

    /// Whether data may have changed through this handle: it wrote through simfs, or the
    /// kernel writes it in place (unseen until a look).
    pub fn may_have_written(&self) -> bool {
        self.wrote.load(Ordering::Relaxed) || self.in_place.load(Ordering::Relaxed)
    }

    /// Whether data changed through this handle since its writer was last done.
    pub fn is_writing(&self) -> bool {
        self.writing.load(Ordering::Acquire)
    }

    fn data(&self) -> Data {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, d: Data) {
        *self.data.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }
}

impl SimFs {
    /// Data changed through `h`: its close must record the file for upload, and until that
    /// close the upload waits.
    pub(super) fn note_writing(&self, h: &OpenFile) {
        h.wrote.store(true, Ordering::Relaxed);
        self.hold_upload(h);
    }

    /// Until `h` is flushed, its file's upload waits (it may be changing the data).
    pub(super) fn hold_upload(&self, h: &OpenFile) {
        if !h.writing.swap(true, Ordering::AcqRel) {
            self.pins.start_writing(h.ino);
        }
    }

    /// `h` is the creator's handle of a file whose upload `create` held (pinned and
    /// writing) from the moment the inode existed: the hold is now `h`'s, released at its
    /// flush or close like any other.
    pub(super) fn take_hold(&self, h: &OpenFile) {
        h.writing.store(true, Ordering::Release);
    }

    /// `h` was flushed or closed: it no longer holds up its file's upload.
    pub(super) fn done_writing(&self, h: &OpenFile) {
        if h.writing.swap(false, Ordering::AcqRel) {
            self.pins.stop_writing(h.ino);
        }
    }

    /// Handle `fh` was opened by process `pid`.
    pub fn note_opener(&self, fh: u64, pid: u32) {
        if let Ok(h) = self.file_handle(fh) {
            h.opener.store(pid, Ordering::Relaxed);
        }
    }

    pub(super) fn file_handle(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::File(f)) => Ok(f.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    /// The data a read-only open of `ino` reads: its local copy, or the cached blob (whose
    /// fill this starts, without waiting for it).
    pub(super) fn data_for_read(&self, ino: u64, write: bool) -> FsResult<Data> {
        if self.index.is_local(ino)? {
            return Ok(Data::Local(Arc::new(self.local.open(ino, write)?)));
        }
        let blob = self.index.blob_of(ino)?.ok_or(FsError::NotFound)?;
        let content = self.cache.open(ino, &blob)?;
        if let Content::Filling(f) = &content {
            self.prefetch_siblings(ino, f.blob().size);
        }
        Ok(Data::Cached(content))
    }

    /// What handle `h` reads from now.
    pub(super) fn readable(&self, h: &OpenFile) -> FsResult<Data> {
        match h.data() {
            Data::Local(f) => Ok(Data::Local(f)),
            // A writer reads its own writes: once the inode has a local copy, use it.
            Data::Cached(_) | Data::Deferred if h.write && self.index.is_local(h.ino)? => {
                let d = Data::Local(Arc::new(self.local.open(h.ino, true)?));
                h.set(d.clone());
                Ok(d)
            }
            Data::Cached(c) => Ok(Data::Cached(c)),
            Data::Deferred => {
                let d = self.data_for_read(h.ino, h.write)?;
                h.set(d.clone());
                Ok(d)
            }
        }
    }

    /// The local copy handle `h` writes to, made now if needed; `whole` says whether the
    /// write about to be made replaces every byte of the file (then the old content is not
    /// fetched). It is asked only on a handle's first write.
    pub(super) fn writable_file(
        &self,
        h: &OpenFile,
        whole: impl FnOnce(&Self) -> FsResult<bool>,
    ) -> FsResult<Arc<File>> {
        if let Data::Local(f) = h.data() {
            return Ok(f);
        }
        self.make_local(h.ino, whole(self)?)?;
        let f = Arc::new(self.local.open(h.ino, true)?);
        h.set(Data::Local(f.clone()));
        Ok(f)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.file_handle(fh)?;
        match self.read_from(&h, offset, size) {
            Err(e) if e.is_changed() => {
                // The blob changed since it was indexed. A handle that has shown nothing yet
                // may as well have been opened after the change: it moves to the new version.
                if !self.blob_changed(h.ino) || h.served.load(Ordering::Relaxed) {
                    return Err(e);
                }
                match self.data_for_read(h.ino, h.write) {
                    Ok(d) => h.set(d),
                    Err(_) => return Err(e),
                }
                self.read_from(&h, offset, size)
            }
            Ok(buf) => {
                h.served.store(true, Ordering::Relaxed);
                Ok(buf)
            }
            Err(e) => Err(e),
        }
    }

    fn read_from(&self, h: &OpenFile, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        Ok(match self.readable(h)? {
            Data::Local(f) => crate::cache::read_vec(&f, size as usize, offset)?,
            Data::Cached(c) => c.read_vec(size as usize, offset)?,
            Data::Deferred => unreachable!("readable() resolves a deferred handle"),
        })
    }

    /// The whole file of at least `min_size` bytes a read-only handle reads, when it has one,
    /// for the kernel to read directly (FUSE passthrough): the cached copy, or on a writable
    /// mount the local copy. None for writers and for files still downloading. On a writable
    /// mount the file is opened read-write: a writer arriving later must share it (see
    /// `in_place`).
    pub fn passthrough_file(&self, fh: u64, min_size: u64) -> Option<File> {
        let h = self.file_handle(fh).ok()?;
        let f = match (h.write, h.data()) {
            (false, Data::Cached(Content::Whole(f)) | Data::Local(f)) => f,
            _ => return None,
        };
        // Before any of the work below: most opens are of small files.
        if self.attr(h.ino).ok()?.size < min_size {
            return None;
        }
        if self.is_read_only() {
            return f.try_clone().ok();
        }
        // A clean copy opened just before the inode got a new local copy (a racing
        // `O_TRUNC`) is no longer the inode's data: not for the kernel to serve.
        if self.index.is_local(h.ino).ok()? {
            let local = self.local.open(h.ino, false).ok()?;
            if !super::in_place::same_file(&f, &local).ok()? {
                return None;
            }
        }
        reopen_read_write(&f)
    }

    /// The local copy writer `fh` writes, for the kernel to write in place (FUSE
    /// passthrough; `write_in_place` then watches it): for a file being made (empty) or of
    /// at least `min_size` bytes, that has a local copy already (it was written on this
    /// node). A clean cached copy is not taken over for it: a local copy is never evicted,
    /// and a file opened read-write only to be read (`h5py` in `r+`, a memmap in `r+`)
    /// would keep its copy on the cache disk for good. Such writers go through simfs, as do
    /// all writers while the cache disk has less than `IN_PLACE_HEADROOM` free above the
    /// writers' reserve.
    pub fn in_place_file(&self, fh: u64, min_size: u64) -> Option<File> {
        let h = self.file_handle(fh).ok()?;
        let size = self.attr(h.ino).ok()?.size;
        if !h.write || (size > 0 && size < min_size) || !self.index.is_local(h.ino).ok()? {
            return None;
        }
        // Writes in place cannot be held to the writers' reserve: not near a full disk.
        if !self
            .cache
            .free_space()
            .is_ok_and(|(free, _)| free >= IN_PLACE_HEADROOM)
        {
            return None;
        }
        match self.readable(&h).ok()? {
            Data::Local(f) => reopen_read_write(&f),
            _ => None,
        }
    }

    /// Whether a read may wait for the network (the FUSE adapter answers it off its threads).
    pub fn read_may_wait(&self, fh: u64, offset: u64, size: u32) -> bool {
        match self.file_handle(fh).map(|h| h.data()) {
            Ok(Data::Local(_)) | Err(_) => false,
            Ok(Data::Cached(c)) => !c.ready(offset, size as u64),
            Ok(Data::Deferred) => true,
        }
    }

    /// Whether a write may wait for the network: the first one through a handle may have
    /// to fetch the old content.
    pub fn write_may_wait(&self, fh: u64) -> bool {
        self.file_handle(fh)
            .is_ok_and(|h| h.write && !matches!(h.data(), Data::Local(_)))
    }
}

/// `f` opened again, read-write, through its descriptor rather than its path: the copy may
/// be renamed into place meanwhile.
fn reopen_read_write(f: &File) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .ok()
}
