//! POSIX semantics over the index and the cache, with no FUSE types.
//!
//! `SimFs` is what `fuse.rs` calls: every operation takes plain arguments and returns an
//! `FsResult`, so unit tests drive it directly. Metadata operations (lookup, getattr,
//! readdir, readlink, statfs) read only the index. `open` of a regular file hydrates it
//! into the cache (the only network access) and keeps an open `File` in a handle table;
//! `read` is a `pread` on that file. Directory handles hold a snapshot of the entries taken
//! at `opendir`, so a long `readdir` sees one consistent listing and offsets stay valid.
//!
//! Inodes live in the index and survive `forget`; the kernel's lookup counts need no
//! bookkeeping because nothing is freed while mounted.

pub mod error;

use crate::cache::Cache;
use crate::index::names::Name;
use crate::index::{Attr, DirEntry, Index, Kind};
pub use error::{FsError, FsResult};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
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
    File(Arc<File>),
    Dir(Arc<Vec<ListedEntry>>),
}

pub struct SimFs {
    index: Index,
    cache: Cache,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
}

pub const BLOCK_SIZE: u32 = 4096;

impl SimFs {
    pub fn new(index: Index, cache: Cache) -> SimFs {
        SimFs {
            index,
            cache,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    fn attr(&self, ino: u64) -> FsResult<Attr> {
        self.index.getattr(ino)?.ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = Name::from_os(name).map_err(|e| match e.errno() {
            // "." and ".." are resolved by the kernel; anything else invalid cannot exist.
            libc::ENAMETOOLONG => FsError::Name(e),
            _ => FsError::NotFound,
        })?;
        match self.index.lookup(parent, &name)? {
            Some(a) => Ok(a),
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
        self.attr(ino)
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
        let me = self.attr(ino)?;
        if me.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let parent = self.attr(self.index.parent_of(ino)?)?;
        let mut entries = vec![
            ListedEntry {
                name: b".".to_vec(),
                attr: me,
            },
            ListedEntry {
                name: b"..".to_vec(),
                attr: parent,
            },
        ];
        entries.extend(
            self.index
                .readdir(ino)?
                .into_iter()
                .map(|DirEntry { name, attr }| ListedEntry {
                    name: name.as_bytes().to_vec(),
                    attr,
                }),
        );
        Ok(self.insert_handle(Handle::Dir(Arc::new(entries))))
    }

    /// The snapshot of an open directory; entry `i` sits at readdir offset `i + 1`.
    pub fn readdir(&self, fh: u64) -> FsResult<Arc<Vec<ListedEntry>>> {
        match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::Dir(e)) => Ok(e.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    /// Opens a regular file for reading, hydrating it into the cache if needed.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        let attr = self.attr(ino)?;
        match attr.kind {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::NotFound), // the kernel follows links itself
            Kind::File => {}
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        let blob = self.index.blob_of(ino)?.ok_or(FsError::NotFound)?;
        let file = self.cache.open(&blob)?;
        Ok(self.insert_handle(Handle::File(Arc::new(file))))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = match self.handles.lock().unwrap().get(&fh) {
            Some(Handle::File(f)) => f.clone(),
            _ => return Err(FsError::BadHandle),
        };
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    pub fn statfs(&self) -> FsResult<FsStats> {
        let (files, bytes) = self.index.totals()?;
        Ok(FsStats {
            blocks: bytes.div_ceil(BLOCK_SIZE as u64),
            blocks_free: 0,
            files,
            files_free: 0,
            block_size: BLOCK_SIZE,
            name_max: crate::index::names::NAME_MAX as u32,
        })
    }

    fn insert_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, h);
        fh
    }

    /// Number of open file and directory handles (tests check nothing leaks).
    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests;
