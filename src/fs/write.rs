//! The write half of the filesystem core: namespace changes, attributes, data, durability.
//!
//! Every change lands in the index (and, for data, the inode's local copy) before the call
//! returns, marked pending for write-back; nothing here waits for the network except
//! `flush` of a written handle (close), `fsync` and `fsyncdir`, which upload and return only
//! once the container has the data, or fail with EIO leaving it pending for a retry.
//!
//! Permission checks are the kernel's (`default_permissions`); what it cannot know lives
//! here: setgid directories hand their group (and, to subdirectories, their setgid bit) to
//! new entries.

use super::{existing_name, FsError, FsResult, Handle, SimFs};
use crate::index::names::Name;
use crate::index::write::{AttrChanges, NewNode, RenameMode};
use crate::index::{Attr, Kind};
use crate::writeback::Writeback;
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Who asks, as the kernel tells us.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time a setattr sets.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<SystemTime>,
}

/// Inodes the background syncs at once.
const SYNC_PARALLEL: usize = 16;

/// Blob names are UTF-8; a name that is not cannot be stored.
fn new_name(name: &OsStr) -> FsResult<Name> {
    let n = Name::from_os(name)?;
    if std::str::from_utf8(n.as_bytes()).is_err() {
        return Err(FsError::Invalid(
            "names must be UTF-8 to be stored as blob names",
        ));
    }
    Ok(n)
}

impl SimFs {
    pub(crate) fn writeback(&self) -> FsResult<&Writeback> {
        self.writeback.as_ref().ok_or(FsError::ReadOnly)
    }

    /// Sets how write-back tells the kernel about entries it renamed (conflicts).
    pub fn set_invalidator(&self, f: crate::writeback::Invalidator) {
        if let Some(wb) = &self.writeback {
            wb.set_invalidator(f);
        }
    }

    /// When a change made now should be uploaded by the background.
    fn due(&self) -> FsResult<(SystemTime, SystemTime)> {
        let now = SystemTime::now();
        Ok((now, now + self.writeback()?.opts.delay))
    }

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
    ) -> FsResult<Attr> {
        let (now, due) = self.due()?;
        let name = new_name(name)?;
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
        let attr = self.index.create(parent, &name, &node, now, due)?;
        if kind == Kind::File {
            self.cache.make_local(attr.ino, None, true)?;
        }
        Ok(attr)
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        who: Caller,
    ) -> FsResult<(Attr, u64)> {
        let attr = self.new_inode(parent, name, Kind::File, mode, 0, who, None)?;
        let file = self.cache.open_local(attr.ino, true)?;
        self.opened(attr.ino, true);
        let fh = self.insert_handle(Handle::File {
            ino: attr.ino,
            file: Arc::new(file),
            write: true,
        });
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
        self.new_inode(parent, name, kind, mode, rdev, who, None)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, who: Caller) -> FsResult<Attr> {
        self.new_inode(parent, name, Kind::Dir, mode, 0, who, None)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &[u8], who: Caller) -> FsResult<Attr> {
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() as u64 > crate::index::build::MAX_TARGET {
            return Err(FsError::Name(crate::index::names::NameError::TooLong));
        }
        self.new_inode(parent, name, Kind::Symlink, 0o777, 0, who, Some(target))
    }

    pub fn link(&self, ino: u64, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let (now, due) = self.due()?;
        let name = new_name(name)?;
        Ok(self.index.link(ino, parent, &name, now, due)?)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (now, due) = self.due()?;
        let a = self.index.unlink(parent, &existing_name(name)?, now, due)?;
        if a.nlink == 0 && !self.is_open(a.ino) {
            // Nothing can reach it any more: free it now rather than after the delay.
            self.sync(a.ino)?;
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let (now, due) = self.due()?;
        self.index.rmdir(parent, &existing_name(name)?, now, due)?;
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
        let newname = new_name(newname)?;
        let replaced = self.index.rename(
            parent,
            &existing_name(name)?,
            newparent,
            &newname,
            mode,
            now,
            due,
        )?;
        if let Some(r) = replaced {
            if !self.is_open(r) && self.attr(r).is_ok_and(|a| a.nlink == 0) {
                self.sync(r)?;
            }
        }
        Ok(())
    }

    pub fn setattr(&self, ino: u64, s: &SetAttr) -> FsResult<Attr> {
        let (now, due) = self.due()?;
        let a = self.attr(ino)?;
        if let Some(size) = s.size {
            if a.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if a.kind != Kind::File {
                return Err(FsError::Invalid("only regular files have a size to set"));
            }
            self.make_local(ino, size == 0)?;
            let f = self.cache.open_local(ino, true)?;
            f.set_len(size)?;
        }
        let mut c = AttrChanges {
            perm: s.mode.map(|m| m & 0o7777),
            uid: s.uid,
            gid: s.gid,
            size: s.size,
            mtime: s.mtime.map(|t| match t {
                SetTime::Now => now,
                SetTime::At(t) => t,
            }),
            ctime: s.ctime,
            atime: s.atime.map(|t| match t {
                SetTime::Now => now,
                SetTime::At(t) => t,
            }),
        };
        // truncate(2) changes the times like a write, when the size changes.
        if s.size.is_some_and(|n| n != a.size) && c.mtime.is_none() {
            c.mtime = Some(now);
        }
        Ok(self.index.setattr(ino, &c, now, due)?)
    }

    /// Writes `data` at `offset` through handle `fh`; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (ino, file, writable) = self.file_handle(fh)?;
        if !writable {
            return Err(FsError::BadHandle);
        }
        let (now, due) = self.due()?;
        self.cache.check_room(data.len() as u64)?;
        file.write_all_at(data, offset)?;
        self.index
            .wrote(ino, offset + data.len() as u64, now, due)?;
        Ok(data.len() as u32)
    }

    /// fallocate without flags: make sure the range is backed (extends the file).
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        if mode != 0 {
            return Err(FsError::Unsupported);
        }
        let (ino, file, writable) = self.file_handle(fh)?;
        if !writable {
            return Err(FsError::BadHandle);
        }
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
        }
        Ok(())
    }

    /// close(2) of a handle: a written file is uploaded before this returns.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let (ino, _, writable) = self.file_handle(fh)?;
        if writable {
            self.sync(ino)?;
        }
        Ok(())
    }

    /// fsync(2): the inode's data and attributes are committed in the container.
    pub fn fsync(&self, ino: u64) -> FsResult<()> {
        if self.writeback.is_none() {
            return Ok(());
        }
        self.sync(ino)
    }

    /// fsyncdir(2): every pending change is committed (entries of a directory depend on
    /// changes elsewhere, such as a rename's source).
    pub fn fsyncdir(&self) -> FsResult<()> {
        if self.writeback.is_none() {
            return Ok(());
        }
        let failed = self.drain(true, |_| {})?;
        if failed > 0 {
            return Err(FsError::Upload(format!(
                "{failed} changes could not be uploaded"
            )));
        }
        Ok(())
    }

    pub(crate) fn sync(&self, ino: u64) -> FsResult<()> {
        let wb = self.writeback()?;
        wb.sync_inode(&self.index, &self.cache, ino, self.is_open(ino))
            .map_err(|e| FsError::Writeback(Arc::new(e)))
    }

    /// One round of background work: syncs what is due and empties the trash. A file that
    /// is open for writing is left to its writer's close or fsync unless `writers_too`:
    /// uploading it midway would only be uploaded again. Returns when the next item will
    /// be due (None: nothing pending).
    pub fn sync_due(&self, writers_too: bool) -> FsResult<Option<SystemTime>> {
        self.sync_due_with(writers_too, &mut || {})
    }

    /// `sync_due`, calling `after_batch` after each batch of (up to 256) inodes.
    fn sync_due_with(
        &self,
        writers_too: bool,
        after_batch: &mut dyn FnMut(),
    ) -> FsResult<Option<SystemTime>> {
        let Some(wb) = &self.writeback else {
            return Ok(None);
        };
        loop {
            let now = SystemTime::now();
            let due = self.index.due(now, 256)?;
            if due.is_empty() {
                break;
            }
            let due = due.into_iter().filter(|&ino| {
                let busy = !writers_too && self.has_writers(ino);
                if busy {
                    let _ = self.index.defer(ino, now + wb.opts.delay);
                }
                !busy
            });
            let queue = Mutex::new(due.collect::<Vec<_>>().into_iter());
            let progress = AtomicBool::new(false);
            // Several syncs at once: each is mostly a round trip. Failures are recorded with
            // a retry time by sync_inode itself.
            std::thread::scope(|scope| {
                for _ in 0..SYNC_PARALLEL {
                    scope.spawn(|| loop {
                        let Some(ino) = queue.lock().unwrap().next() else {
                            break;
                        };
                        if self.sync(ino).is_ok() {
                            progress.store(true, Ordering::Relaxed);
                        }
                    });
                }
            });
            after_batch();
            if !progress.load(Ordering::Relaxed) {
                break;
            }
        }
        wb.empty_trash(&self.index)
            .map_err(|e| FsError::Writeback(Arc::new(e)))?;
        Ok(self.index.pending()?.1)
    }

    /// Uploads everything pending now (files still open for writing too when
    /// `writers_too`), calling `progress` with the number left after each round; returns how
    /// many changes are still failing.
    pub fn drain(&self, writers_too: bool, mut progress: impl FnMut(u64)) -> FsResult<u64> {
        self.writeback()?;
        self.index.all_due_now()?;
        let mut last_left = u64::MAX;
        loop {
            self.sync_due_with(writers_too, &mut || {
                if let Ok((left, _)) = self.index.pending() {
                    progress(left);
                }
            })?;
            let left = self.index.pending()?.0;
            progress(left);
            if left == 0 {
                return Ok(0);
            }
            if left >= last_left {
                // No progress this round: what is left is failing.
                return Ok(left);
            }
            last_left = left;
            self.index.all_due_now()?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Number of pending changes and the ones failing with their last error.
    pub fn pending(&self) -> FsResult<(u64, Vec<crate::index::journal::Failing>)> {
        Ok((self.index.pending()?.0, self.index.failing()?))
    }

    /// Mount-time recovery: local copies may be longer than the index recorded (a crash
    /// between the write and its index update); every pending change is due at once.
    pub fn recover(&self) -> FsResult<u64> {
        for ino in self.index.local_inodes()? {
            let Ok(a) = self.attr(ino) else { continue };
            // A crash between creating the inode and its (empty) local file.
            if !self.cache.local_path(ino).exists() && a.size == 0 {
                self.cache.make_local(ino, None, true)?;
            }
            if let Ok(md) = std::fs::metadata(self.cache.local_path(ino)) {
                if md.len() != a.size && a.nlink > 0 {
                    let now = SystemTime::now();
                    let size = AttrChanges {
                        size: Some(md.len()),
                        ..Default::default()
                    };
                    self.index.setattr(ino, &size, now, now)?;
                }
            }
        }
        self.index.all_due_now()?;
        Ok(self.index.pending()?.0)
    }
}

/// A symlink target from the kernel.
pub fn target_bytes(p: &std::path::Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
