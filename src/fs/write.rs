//! The write half of the filesystem core: namespace changes, attributes, data, durability.
//!
//! Every change lands in the index (and, for data, the inode's local copy) before the call
//! returns, marked pending for write-back, which is told when it is due. Nothing here waits
//! for the network except `fsync`, `fsyncdir` and, on a `sync` mount, `flush` of a written
//! handle (close), which ask write-back to upload and return only once the container has
//! the data, or fail with EIO leaving it pending for a retry. On the default mount close
//! only journals the file (and waits past the window of uncommitted data).
//!
//! Permission checks are the kernel's (`default_permissions`); what it cannot know lives
//! here: setgid directories hand their group (and, to subdirectories, their setgid bit) to
//! new entries.

use super::{existing_name, FsError, FsResult, SimFs};
use crate::index::names::Name;
use crate::index::write::NewNode;
use crate::posix::{Attr, AttrChanges, Kind, RenameMode, SetTime};
use crate::writeback::Writeback;
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

/// Who asks, as the kernel tells us.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// The name of a new entry in `parent` (the rules are `Name::for_new_entry`'s).
fn new_name(parent: u64, name: &OsStr) -> FsResult<Name> {
    Ok(Name::for_new_entry(parent == crate::index::ROOT_INO, name)?)
}

impl SimFs {
    pub(crate) fn writable(&self) -> FsResult<&Writeback> {
        self.writeback.as_deref().ok_or(FsError::ReadOnly)
    }

    /// Now, and when a change made now should be uploaded by the background.
    pub(super) fn due(&self) -> FsResult<(SystemTime, SystemTime)> {
        let now = SystemTime::now();
        Ok((now, now + self.writable()?.delay()))
    }

    /// Tells write-back that a change due at `due` was made.
    pub(super) fn changed(&self, due: SystemTime) {
        if let Some(wb) = &self.writeback {
            wb.changed(due);
        }
    }

    /// Creates `parent/name`; a regular file gets its empty local copy, returned open.
    #[allow(clippy::too_many_arguments)]
    fn new_inode(
        &self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        rdev: u32,
        who: Caller,
        target: Option<&[u8]>,
        inserted: impl FnOnce(u64),
    ) -> FsResult<(Attr, Option<std::fs::File>)> {
        let (now, due) = self.due()?;
        let name = new_name(parent, name)?;
        let p = self.attr(parent)?;
        let mut perm = mode & 0o7777;
        let mut gid = who.gid;
        if p.perm & libc::S_ISGID != 0 {
            gid = p.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID;
            }
        }
        let node = NewNode {
            kind,
            perm,
            uid: who.uid,
            gid,
            target,
            rdev,
        };
        let attr = self
            .index
            .create(parent, &name, &node, now, due, inserted)?;
        let local = match kind {
            Kind::File => Some(self.local.make_empty(attr.ino)?),
            _ => None,
        };
        self.changed(due);
        Ok((attr, local))
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        who: Caller,
    ) -> FsResult<(Attr, u64)> {
        // The creator is about to write (a checkpoint, pip's temporary file): until its
        // close the background leaves the file alone rather than upload it empty, or
        // upload whatever part of it is written by the time that upload reads it. The
        // hold is taken before the inode is committed: the background, woken by other
        // changes, may look for due inodes at any moment after that.
        let held = std::cell::Cell::new(None);
        let made = self
            .new_inode(parent, name, Kind::File, mode, 0, who, None, |ino| {
                self.pins.pin(ino);
                self.pins.start_writing(ino);
                held.set(Some(ino));
            })
            .and_then(|(attr, local)| {
                let file = local.ok_or(FsError::Invalid("a new file without its local copy"))?;
                Ok((file, attr))
            });
        let (file, attr) = match made {
            Ok(made) => made,
            Err(e) => {
                if let Some(ino) = held.get() {
                    self.pins.stop_writing(ino);
                    self.pins.unpin(ino);
                }
                return Err(e);
            }
        };
        let h = super::OpenFile::handle(attr.ino, true, super::Data::Local(Arc::new(file)));
        if let super::Handle::File(f) = &h {
            self.take_hold(f);
        }
        let fh = self.insert_handle(h);
        Ok((attr, fh))
    }

    /// mknod: regular files, FIFOs, sockets and device nodes (the kernel serves the last
    /// three itself; simfs only keeps and persists them).
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        who: Caller,
    ) -> FsResult<Attr> {
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => Kind::File,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => return Err(FsError::Invalid("unknown file type")),
        };
        let rdev = match kind {
            Kind::CharDevice | Kind::BlockDevice => rdev,
            _ => 0,
        };
        Ok(self
            .new_inode(parent, name, kind, mode, rdev, who, None, |_| {})?
            .0)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, who: Caller) -> FsResult<Attr> {
        Ok(self
            .new_inode(parent, name, Kind::Dir, mode, 0, who, None, |_| {})?
            .0)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &[u8], who: Caller) -> FsResult<Attr> {
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() as u64 > crate::index::build::MAX_TARGET {
            return Err(FsError::Name(crate::index::names::NameError::TooLong));
        }
        let made = self.new_inode(
            parent,
            name,
            Kind::Symlink,
            0o777,
            0,
            who,
            Some(target),
            |_| {},
        )?;
        Ok(made.0)
    }

    pub fn link(&self, ino: u64, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let (now, due) = self.due()?;
        let name = new_name(parent, name)?;
        let a = self.index.link(ino, parent, &name, now, due)?;
        self.changed(due);
        Ok(a)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (now, due) = self.due()?;
        let a = self.index.unlink(parent, &existing_name(name)?, now, due)?;
        self.changed(due);
        if a.nlink == 0 && !self.is_open(a.ino) {
            // Nothing can reach it any more: free it now rather than after the delay.
            self.writable()?.settle_deleted(a.ino).map_err(Arc::new)?;
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (now, due) = self.due()?;
        self.index.rmdir(parent, &existing_name(name)?, now, due)?;
        self.changed(due);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        mode: RenameMode,
    ) -> FsResult<()> {
        let (now, due) = self.due()?;
        let newname = new_name(newparent, newname)?;
        let replaced = self.index.rename(
            parent,
            &existing_name(name)?,
            newparent,
            &newname,
            mode,
            now,
            due,
        )?;
        self.changed(due);
        if let Some(r) = replaced {
            if !self.is_open(r) && self.attr(r).is_ok_and(|a| a.nlink == 0) {
                self.writable()?.settle_deleted(r).map_err(Arc::new)?;
            }
        }
        Ok(())
    }

    pub fn setattr(&self, ino: u64, c: &AttrChanges) -> FsResult<Attr> {
        let (now, due) = self.due()?;
        let a = self.attr(ino)?;
        let mut c = c.clone();
        if let Some(size) = c.size {
            if a.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if a.kind != Kind::File {
                return Err(FsError::Invalid("only regular files have a size to set"));
            }
            self.make_local(ino, size == 0)?;
            let f = self.local.open(ino, true)?;
            f.set_len(size)?;
            self.writable()?.truncated(ino, size);
            // truncate(2) changes the times like a write, when the size changes.
            if size != a.size && c.mtime.is_none() {
                c.mtime = Some(SetTime::Now);
            }
        }
        if c.mtime.is_some() {
            self.before_times_set(ino)?;
        }
        let a = self.index.setattr(ino, &c, now, due)?;
        self.changed(due);
        Ok(a)
    }

    /// Writes `data` at `offset` through handle `fh`; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.file_handle(fh)?;
        if !h.write {
            return Err(FsError::BadHandle);
        }
        let ino = h.ino;
        let (now, due) = self.due()?;
        self.cache.check_room(data.len() as u64)?;
        // A first write that replaces every byte needs none of the old content.
        let file = self.writable_file(&h, |s| {
            Ok(offset == 0 && data.len() as u64 >= s.attr(ino)?.size)
        })?;
        file.write_all_at(data, offset)?;
        self.index
            .wrote(ino, offset + data.len() as u64, now, due)?;
        self.wrote_through(&h, offset, data.len() as u64);
        self.changed(due);
        Ok(data.len() as u32)
    }

    /// fallocate without flags: make sure the range is backed (extends the file).
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        if mode != 0 {
            return Err(FsError::Unsupported);
        }
        let h = self.file_handle(fh)?;
        if !h.write {
            return Err(FsError::BadHandle);
        }
        let ino = h.ino;
        let file = self.writable_file(&h, |_| Ok(false))?;
        let end = offset.checked_add(len).ok_or(FsError::TooBig)?;
        let (now, due) = self.due()?;
        let size = file.metadata()?.len();
        self.cache.check_room(end.saturating_sub(size))?;
        // Really allocate, so a later write into the range cannot fail for space.
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(FsError::TooBig);
        };
        // SAFETY: a valid descriptor owned by `file`, which outlives the call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), off, n) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc).into());
        }
        if end > size {
            let grow = AttrChanges {
                size: Some(end),
                ..Default::default()
            };
            self.index.setattr(ino, &grow, now, due)?;
            self.wrote_through(&h, size, end - size);
            self.changed(due);
        }
        Ok(())
    }

    /// close(2) of a handle. A file written through it is recorded in the journal (its size
    /// and times, with its data in the local copy) and its upload starts in the background;
    /// on a `sync` mount close waits until the blob is committed. Past the window of
    /// uncommitted data (`--max-pending`), close waits for uploads to make room.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.flush_by(fh, 0)
    }

    /// A flush of `fh` by process `pid` (0: the opener). The kernel flushes a handle at
    /// every close of a descriptor of it, including the copy a child process got from a
    /// fork and closes at its exec or exit: such a close says nothing about the writer, who
    /// may be writing on, so it leaves the file as it is (on a `sync` mount it still
    /// commits what is there, as every close does). The opener's close, or the release of
    /// the last descriptor (`release`), finishes the file.
    pub fn flush_by(&self, fh: u64, pid: u32) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        if h.in_place.load(Ordering::Relaxed) && self.adopt_in_place(h.ino)? {
            h.wrote.store(true, Ordering::Relaxed);
        }
        if h.flushed_by_another(pid) && !self.writeback.as_ref().is_some_and(|wb| wb.is_sync()) {
            return Ok(());
        }
        self.writer_done(&h)
    }

    /// The writer of `h` is done (its close): a file written through it is recorded for
    /// upload, or on a `sync` mount committed.
    pub(super) fn writer_done(&self, h: &super::OpenFile) -> FsResult<()> {
        self.done_writing(h);
        if !(h.write && h.wrote.load(Ordering::Relaxed)) {
            return Ok(());
        }
        let wb = self.writable()?;
        if wb.is_sync() {
            return self.upload(h.ino);
        }
        Ok(wb.closed(h.ino).map_err(Arc::new)?)
    }

    /// Bytes `off..off + len` changed through `h`: its close records the file, and
    /// write-back may stage the blocks the writer has finished.
    fn wrote_through(&self, h: &super::OpenFile, off: u64, len: u64) {
        self.note_writing(h);
        if let Some(wb) = &self.writeback {
            wb.wrote_range(h.ino, off, len);
        }
    }

    /// Data changed through handle `fh` (a truncate through it): its close records the file
    /// for upload.
    pub fn note_written(&self, fh: u64) {
        if let Ok(h) = self.file_handle(fh) {
            self.note_writing(&h);
        }
    }

    /// `setattr` through an open file (`ftruncate`, the truncate of `open(O_TRUNC)`): a new
    /// size counts as data written through `fh`.
    pub fn setattr_via(&self, fh: Option<u64>, ino: u64, c: &AttrChanges) -> FsResult<Attr> {
        let a = self.setattr(ino, c)?;
        if let (Some(fh), Some(_)) = (fh, c.size) {
            self.note_written(fh);
        }
        Ok(a)
    }

    /// fsync(2): the inode's data and attributes are committed in the container.
    pub fn fsync(&self, ino: u64) -> FsResult<()> {
        if self.writeback.is_none() {
            return Ok(());
        }
        self.adopt_in_place(ino)?;
        self.upload(ino)
    }

    /// fsyncdir(2) of `dir`: the entries pending in it (created, renamed in, changed), the
    /// directory itself and the pending deletions (entries removed or renamed away) are
    /// committed; other directories' pending changes are not waited for.
    pub fn fsyncdir(&self, dir: u64) -> FsResult<()> {
        match &self.writeback {
            Some(wb) => Ok(wb.sync_dir(dir).map_err(Arc::new)?),
            None => Ok(()),
        }
    }

    /// Asks write-back to upload `ino` now; returns once it is committed.
    pub(crate) fn upload(&self, ino: u64) -> FsResult<()> {
        Ok(self.writable()?.upload(ino).map_err(Arc::new)?)
    }
}

/// A symlink target from the kernel.
pub fn target_bytes(p: &std::path::Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
