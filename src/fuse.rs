//! The FUSE adapter: a thin shell between `fuser` and the FUSE-free core in `fs`.
//!
//! Each callback converts its arguments, calls `SimFs`, and replies or maps the error to its
//! errno. Nothing here decides semantics. What may wait for the network (a read of a range
//! still being fetched, a first write or a truncate that needs the old data, the close and
//! fsync that upload) is handed with its reply to the runtime's blocking pool, so the few
//! FUSE worker threads keep answering stat, readdir and readlink from the index while the
//! service is slow or gone. Opens never wait: an uncached file starts filling and returns.
//!
//! Entry and attribute timeouts are long because the index is authoritative for the mount's
//! lifetime; the refresh (`refresh.rs`) invalidates the kernel's caches explicitly when the
//! container changes, rather than relying on timeouts. Round trips the kernel can be told to
//! skip are: extended attributes (ENOSYS once), OPENDIR and RELEASEDIR (ENOSYS once where
//! the kernel offers FUSE_NO_OPENDIR_SUPPORT; listings then come with no handle) and
//! missing names (negative entries).

use crate::fs::write::{target_bytes, Caller};
use crate::fs::{
    Attr, AttrChanges, FsError, FsResult, Kind, ListedEntry, RenameMode, SetTime, SimFs,
};
use crate::iomode::{IoModes, Open};
use crate::kernel::Kernel;
use crate::metrics;
use fuser::BackingId;
use fuser::{
    BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Files smaller than this are not opened in passthrough. A small file is read in one or two
/// requests, so passthrough saves little, while registering its backing file costs two ioctls
/// and, once it is closed, the kernel asks for the attributes again (a `stat` after reading a
/// venv's modules would cost a round trip each: 16-38 us instead of 1.6 us, measured).
const PASSTHROUGH_MIN: u64 = 1 << 20;

/// A file the kernel reads (and writes) directly, registered under `id`.
struct Backing {
    id: BackingId,
    file: std::fs::File,
}

/// The kernel features a mount may use where the kernel offers them; each one off falls back
/// to what older kernels do (for comparisons, debugging and the tests of those fallbacks).
#[derive(Clone, Copy, Debug)]
pub struct KernelFeatures {
    /// FUSE passthrough for cached files (Linux 6.9+).
    pub passthrough: bool,
    /// Directories listed without OPENDIR and RELEASEDIR (Linux 5.1+).
    pub list_unopened: bool,
    /// Write-only handles of new files write past the page cache (Linux 6.6+).
    pub direct_writes: bool,
    /// Files created or opened for writing are written by the kernel straight into their
    /// local copy (FUSE passthrough, Linux 6.9+; needs `passthrough`).
    pub in_place_writes: bool,
}

/// Whether a kernel offering `offered` at INIT drops cached pages over a direct write's
/// range (Linux 6.6+). The release that made it do so added FUSE_DIRECT_IO_ALLOW_MMAP too,
/// and the flag is what INIT shows.
fn drops_pages_over_direct_writes(offered: InitFlags) -> bool {
    offered.contains(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
}

pub struct SimFuse {
    fs: Arc<SimFs>,
    ttl: Duration,
    /// Where network-bound requests run (its blocking pool).
    rt: tokio::runtime::Handle,
    /// Whether cached files are opened in passthrough: asked for, then granted by the kernel
    /// at init, and turned off for good if registering a backing file fails.
    passthrough: AtomicBool,
    modes: IoModes<Backing>,
    /// How each open file handle was answered, for its release.
    opens: Mutex<HashMap<u64, (u64, Open<Backing>)>>,
    /// The kernel lists directories without OPENDIR and RELEASEDIR (Linux 5.1+): the first
    /// OPENDIR is answered ENOSYS, and from then on readdir comes with no handle. Asked for
    /// at init when allowed, granted when the kernel offers it.
    no_opendir: AtomicBool,
    /// Write-only handles of new files write past the kernel's page cache (`iomode`): asked
    /// for, then kept only where the kernel drops its cached pages over a direct write's
    /// range (Linux 6.6+, the release that also offers FUSE_DIRECT_IO_ALLOW_MMAP). Older
    /// kernels leave those pages stale, so a reader following a log as it grows (`tail -f`)
    /// would read its old pages: there every write goes through the page cache.
    direct_writes: AtomicBool,
    /// Files created for writing (`dd`, `torch.save`, pip, fio, git's packs and lock files,
    /// SQLite, HDF5, linkers' outputs), and opens for writing of files written on this node,
    /// are opened in passthrough on their local copy, so their writes, reads and shared
    /// mappings cost no request at all; `fs::in_place` finds what they wrote. simfs does
    /// not see the writes as they happen, so such a file's blocks are staged ahead by
    /// looking at its length and checked at the commit (`writeback::unseen`). Write-only
    /// handles went through simfs until the in-place set-up of a small file cost about what
    /// its WRITE requests do (a mark in an extended attribute instead of a marker file, its
    /// close answered on the FUSE thread): a 1 GiB `dd` then writes at the disk's speed.
    in_place_writes: bool,
    /// Tells the kernel to drop cached pages.
    kernel: Kernel,
}

impl SimFuse {
    pub fn new(
        fs: Arc<SimFs>,
        ttl: Duration,
        rt: tokio::runtime::Handle,
        kernel_features: KernelFeatures,
        kernel: Kernel,
    ) -> SimFuse {
        SimFuse {
            fs,
            ttl,
            rt,
            passthrough: AtomicBool::new(kernel_features.passthrough),
            modes: IoModes::default(),
            opens: Mutex::default(),
            no_opendir: AtomicBool::new(kernel_features.list_unopened),
            direct_writes: AtomicBool::new(kernel_features.direct_writes),
            in_place_writes: kernel_features.in_place_writes,
            kernel,
        }
    }

    /// A directory's entries from `offset`: through its handle, or without one (handles
    /// start at 1; 0 is what a kernel that does not open directories sends).
    fn list(&self, ino: INodeNo, fh: FileHandle, offset: u64) -> FsResult<Vec<(u64, ListedEntry)>> {
        if fh.0 == 0 {
            self.fs.readdir_unopened(ino.0, offset)
        } else {
            self.fs.readdir(fh.0, offset)
        }
    }

    /// How to answer the open `fh` of `ino`: passthrough for a reader of a whole file of
    /// 1 MiB or more when the kernel allows it, for a writer's open of such a file or an
    /// empty one that has a local copy (see `in_place_writes`), and for any open of an
    /// inode already in passthrough (see `iomode`). A writer in passthrough writes in place:
    /// `fs::in_place` looks for its writes.
    fn io_mode(
        &self,
        ino: u64,
        fh: u64,
        flags: OpenFlags,
        reply: &ReplyOpen,
    ) -> FsResult<Open<Backing>> {
        let started = std::cell::Cell::new(false);
        let how = self.modes.open(ino, || {
            if !self.passthrough.load(Ordering::Relaxed) {
                return None;
            }
            let file = match flags.acc_mode() {
                OpenAccMode::O_RDONLY => self.fs.passthrough_file(fh, PASSTHROUGH_MIN)?,
                OpenAccMode::O_RDWR | OpenAccMode::O_WRONLY if self.in_place_writes => {
                    self.fs.in_place_file(fh, PASSTHROUGH_MIN)?
                }
                _ => return None,
            };
            started.set(true);
            self.register(file, |f| reply.open_backing(f))
        });
        if flags.acc_mode() == OpenAccMode::O_RDONLY {
            return Ok(how);
        }
        // A writer that joined readers in passthrough has no other way (the kernel allows
        // no other mode beside them): if it cannot write in place, its open fails.
        self.write_in_place(ino, fh, how)
            .or_else(|e| match started.get() {
                true => Ok(self.through_simfs(ino, e)),
                false => Err(e),
            })
    }

    /// Writer `fh` of `ino`, answered `how`, writes its backing file in place if `how` is
    /// passthrough. If it cannot, its passthrough open is undone.
    fn write_in_place(&self, ino: u64, fh: u64, how: Open<Backing>) -> FsResult<Open<Backing>> {
        let Open::Passthrough(b) = &how else {
            return Ok(how);
        };
        match self.fs.write_in_place(fh, &b.file) {
            Ok(()) => Ok(how),
            Err(e) => {
                self.modes.release(ino, &how);
                Err(e)
            }
        }
    }

    /// A writer of `ino` that started passthrough could not write in place (`e`): it goes
    /// through the page cache instead.
    fn through_simfs(&self, ino: u64, e: FsError) -> Open<Backing> {
        tracing::debug!("the writer of inode {ino} goes through simfs: {e}");
        self.modes.open(ino, || None)
    }

    /// `file` registered with the kernel as a backing file by `open_backing`; None, and
    /// passthrough off for good, when the kernel refuses.
    fn register(
        &self,
        file: std::fs::File,
        open_backing: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<Backing> {
        match open_backing(&file) {
            Ok(id) => Some(Backing { id, file }),
            Err(e) => {
                if self.passthrough.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "FUSE passthrough is not available ({e}; it needs CAP_SYS_ADMIN and a cache disk that is not itself stacked): files go through simfs"
                    );
                }
                None
            }
        }
    }

    /// How to answer the create of `ino` for writing, handle `fh`: in passthrough on its
    /// local copy where allowed (see `in_place_writes`); else a write-only handle writes
    /// past the page cache where the kernel keeps readers coherent (see `direct_writes`),
    /// and a read-write one through it.
    fn create_mode(
        &self,
        ino: u64,
        fh: u64,
        write_only: bool,
        reply: &ReplyCreate,
    ) -> Open<Backing> {
        let in_place = self.in_place_writes && self.passthrough.load(Ordering::Relaxed);
        let backing = in_place
            .then(|| self.fs.in_place_file(fh, 0))
            .flatten()
            .and_then(|file| self.register(file, |f| reply.open_backing(f)));
        let how = match backing {
            // (An open racing the create may have set the inode's mode first: then `b` goes.)
            Some(b) => self.modes.open(ino, || Some(b)),
            None if write_only && self.direct_writes.load(Ordering::Relaxed) => {
                return self.modes.open_direct(ino)
            }
            None => return self.modes.open(ino, || None),
        };
        self.write_in_place(ino, fh, how)
            .unwrap_or_else(|e| self.through_simfs(ino, e))
    }

    /// The inode `fh` writes direct while other handles of it are open: the kernel drops
    /// their cached pages over a direct write's range before the write, but a read between
    /// then and the write's reply caches the old bytes again (a reader following a growing
    /// file would keep zeros where the new bytes are). So simfs drops them once more after.
    fn direct_beside_others(&self, fh: u64) -> Option<u64> {
        if !self.direct_writes.load(Ordering::Relaxed) {
            return None;
        }
        let ino = match self
            .opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
        {
            Some((ino, Open::Direct)) => *ino,
            _ => return None,
        };
        self.modes.beside_direct_writer(ino).then_some(ino)
    }

    /// Records how open file `fh` of `ino` was answered, for its release. Called before the
    /// reply: the release may arrive the moment the kernel has it.
    fn record_open(&self, fh: u64, ino: u64, how: Open<Backing>) {
        self.opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, (ino, how));
    }

    /// The last handle of `ino`, read or written through the kernel's page cache of the FUSE
    /// file (a cold read, a writer), is closed. A file that passthrough will serve from now on
    /// is cached twice, in those pages and in the cache file's: the FUSE file's pages are
    /// dropped in the background, which halves the memory it holds and spares its next open
    /// that work (a passthrough open cannot keep them: about 45 ms per GiB, measured).
    fn drop_pages_of_closed(&self, ino: u64) {
        if !self.passthrough.load(Ordering::Relaxed)
            || self
                .fs
                .getattr(ino)
                .map_or(true, |a| a.size < PASSTHROUGH_MIN)
        {
            return;
        }
        // Off the FUSE threads: dropping pages may have to wait for reads they serve.
        let kernel = self.kernel.clone();
        self.rt.spawn_blocking(move || kernel.inval_inode(ino));
    }

    /// Runs `f` (which replies) off the FUSE worker thread.
    /// (`t` times the request until `f` has replied.)
    fn off_thread(&self, t: metrics::FuseTimer, f: impl FnOnce(&SimFs) + Send + 'static) {
        let fs = self.fs.clone();
        self.rt.spawn_blocking(move || {
            f(&fs);
            drop(t);
        });
    }
}

fn reply_empty(r: Result<(), FsError>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    }
}

fn errno(e: &FsError) -> Errno {
    metrics::fuse_error(e.errno());
    if e.errno() == libc::EIO {
        tracing::warn!("I/O error returned to the kernel: {e}");
    }
    Errno::from_i32(e.errno())
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

/// A lookup answer with node id 0: "no such name", cached by the kernel like an entry.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: std::time::UNIX_EPOCH,
        mtime: std::time::UNIX_EPOCH,
        ctime: std::time::UNIX_EPOCH,
        crtime: std::time::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: crate::fs::BLOCK_SIZE,
        flags: 0,
    }
}

pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: kind(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: crate::fs::BLOCK_SIZE,
        flags: 0,
    }
}

impl Filesystem for SimFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // FUSE_ATOMIC_O_TRUNC is not asked for: with it the kernel lets the filesystem
        // truncate in OPEN before it checks ETXTBSY for O_RDONLY|O_TRUNC, so opening a running
        // program that way would empty it and then fail (pjdfstest's open::etxtbsy caught
        // it). `SimFs::open` still honours O_TRUNC when a kernel passes it.
        // Attributes cost nothing here, so every readdir returns them (a following stat is
        // then answered by the kernel); symlink targets never change under a mount; lookups in
        // one directory may run in parallel. Each is optional: an old kernel just lacks it.
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!("kernel lacks {cap:?}");
            }
        }
        // Two round trips fewer per directory listed (find, du, ls -R, git status). The
        // kernel then opens directories with FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE, what
        // `opendir` answers anyway.
        if self.no_opendir.load(Ordering::Relaxed)
            && config
                .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
                .is_err()
        {
            self.no_opendir.store(false, Ordering::Relaxed);
            tracing::info!(
                "this kernel opens every directory it lists (no FUSE_NO_OPENDIR_SUPPORT)"
            );
        }
        if self.direct_writes.load(Ordering::Relaxed)
            && !drops_pages_over_direct_writes(config.capabilities())
        {
            self.direct_writes.store(false, Ordering::Relaxed);
            tracing::info!("this kernel (before 6.6) keeps stale pages over direct writes: every write goes through the page cache");
        }
        if self.passthrough.load(Ordering::Relaxed) {
            // Depth 1: backing files on a plain filesystem (the cache disk), not on a stacked
            // one such as overlayfs.
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if granted {
                tracing::info!("FUSE passthrough: cached files are read by the kernel directly");
            } else {
                self.passthrough.store(false, Ordering::Relaxed);
                tracing::info!(
                    "this kernel has no FUSE passthrough (Linux 6.9+): cached reads go through simfs"
                );
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _t = metrics::get().fuse("lookup");
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            // The index is authoritative: a missing name is a negative entry the kernel keeps
            // for the entry timeout (a name created through the mount replaces it; one that
            // appears otherwise is invalidated by whoever adds it), so `import` probing a
            // sys.path of directories costs one round trip per name, not one per probe.
            Err(FsError::NotFound) => reply.entry(&self.ttl, &negative_entry(), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = metrics::get().fuse("getattr");
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = metrics::get().fuse("readlink");
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _t = metrics::get().fuse("open");
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        // Never waits: an uncached blob starts filling and its reads wait for their ranges.
        let fh = match self.fs.open(ino.0, write, truncate) {
            Ok(fh) => fh,
            Err(e) => return reply.error(errno(&e)),
        };
        self.fs.note_opener(fh, req.pid());
        let how = match self.io_mode(ino.0, fh, flags, &reply) {
            Ok(how) => how,
            Err(e) => {
                let _ = self.fs.release(fh);
                return reply.error(errno(&e));
            }
        };
        let (mut flags, backing) = match &how {
            Open::Passthrough(b) => (FopenFlags::empty(), Some(b.clone())),
            // Data changes only through this mount, which keeps the page cache coherent: the
            // kernel keeps its pages across opens, unless written past them (see `iomode`).
            Open::Cached { keep_cache: true } => (FopenFlags::FOPEN_KEEP_CACHE, None),
            Open::Cached { keep_cache: false } => (FopenFlags::empty(), None),
            Open::Direct => (FopenFlags::FOPEN_DIRECT_IO, None),
        };
        if !write {
            // A reader's close has nothing to record (locks are the kernel's own), so the
            // kernel skips its FLUSH round trip (Linux 5.16+; older kernels ignore the flag
            // and send a FLUSH that `flush_by` answers at once).
            flags |= FopenFlags::FOPEN_NOFLUSH;
        }
        self.record_open(fh, ino.0, how);
        match backing {
            Some(b) => reply.opened_passthrough(FileHandle(fh), flags, &b.id),
            None => reply.opened(FileHandle(fh), flags),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = metrics::get().fuse("read");
        let read = move |fs: &SimFs| match fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        };
        // A range still being fetched is waited for off the FUSE threads.
        if self.fs.read_may_wait(fh.0, offset, size) {
            self.off_thread(t, read);
        } else {
            read(&self.fs);
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let t = metrics::get().fuse("release");
        let opened = self
            .opens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        if let Some((ino, how)) = opened {
            if self.modes.release(ino, &how) && matches!(how, Open::Cached { .. }) {
                self.drop_pages_of_closed(ino);
            }
        }
        // The last close of an unlinked file deletes its blobs.
        if self.fs.release_may_wait(fh.0) {
            self.off_thread(t, move |fs| reply_empty(fs.release(fh.0), reply));
        } else {
            reply_empty(self.fs.release(fh.0), reply);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = metrics::get().fuse("setattr");
        let s = AttrChanges {
            perm: mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime,
        };
        let ttl = self.ttl;
        let resize = s.size.is_some();
        let set = move |fs: &SimFs| match fs.setattr_via(fh.map(|f| f.0), ino.0, &s) {
            Ok(a) => reply.attr(&ttl, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        };
        // A new size needs the old data first (a download).
        if resize {
            self.off_thread(t, set);
        } else {
            set(&self.fs);
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _t = metrics::get().fuse("mknod");
        match self
            .fs
            .mknod(parent.0, name, mode & !umask, rdev, caller(req))
        {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _t = metrics::get().fuse("mkdir");
        match self.fs.mkdir(parent.0, name, mode & !umask, caller(req)) {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = metrics::get().fuse("unlink");
        match self.fs.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = metrics::get().fuse("rmdir");
        match self.fs.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _t = metrics::get().fuse("symlink");
        match self
            .fs
            .symlink(parent.0, link_name, target_bytes(target), caller(req))
        {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::get().fuse("rename");
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else if flags.is_empty() {
            RenameMode::Replace
        } else {
            return reply.error(Errno::EINVAL); // RENAME_WHITEOUT: overlayfs only
        };
        match self.fs.rename(parent.0, name, newparent.0, newname, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _t = metrics::get().fuse("link");
        match self.fs.link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _t = metrics::get().fuse("create");
        match self.fs.create(parent.0, name, mode & !umask, caller(req)) {
            Ok((a, fh)) => {
                self.fs.note_opener(fh, req.pid());
                // A new file is never in passthrough unless its creator writes it in place:
                // no reader may start it while this handle is open.
                let how = match flags & libc::O_ACCMODE {
                    acc @ (libc::O_WRONLY | libc::O_RDWR) => {
                        self.create_mode(a.ino, fh, acc == libc::O_WRONLY, &reply)
                    }
                    _ => self.modes.open(a.ino, || None),
                };
                let (fopen, backing) = match &how {
                    Open::Direct => (FopenFlags::FOPEN_DIRECT_IO, None),
                    Open::Passthrough(b) => (FopenFlags::empty(), Some(b.clone())),
                    Open::Cached { .. } => (FopenFlags::FOPEN_KEEP_CACHE, None),
                };
                self.record_open(fh, a.ino, how);
                let (ttl, attr) = (&self.ttl, &file_attr(&a));
                match backing {
                    Some(b) => reply.created_passthrough(
                        ttl,
                        attr,
                        Generation(0),
                        FileHandle(fh),
                        fopen,
                        &b.id,
                    ),
                    None => reply.created(ttl, attr, Generation(0), FileHandle(fh), fopen),
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let t = metrics::get().fuse("write");
        let others = self.direct_beside_others(fh.0);
        if self.fs.write_may_wait(fh.0) {
            // The handle's first write may fetch the old content first.
            let data = data.to_vec();
            let kernel = self.kernel.clone();
            self.off_thread(t, move |fs| {
                match fs.write(fh.0, offset, &data) {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno(&e)),
                }
                if let Some(ino) = others {
                    kernel.inval_inode(ino);
                }
            });
            return;
        }
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
        if let Some(ino) = others {
            let kernel = self.kernel.clone();
            self.rt.spawn_blocking(move || kernel.inval_inode(ino));
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let t = metrics::get().fuse("flush");
        let pid = req.pid();
        if self.fs.flush_may_wait(fh.0) {
            self.off_thread(t, move |fs| reply_empty(fs.flush_by(fh.0, pid), reply));
        } else {
            reply_empty(self.fs.flush_by(fh.0, pid), reply);
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = metrics::get().fuse("fsync");
        self.off_thread(t, move |fs| reply_empty(fs.fsync(ino.0), reply));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = metrics::get().fuse("fsyncdir");
        self.off_thread(t, move |fs| reply_empty(fs.fsyncdir(ino.0), reply));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let t = metrics::get().fuse("fallocate");
        let allocate =
            move |fs: &SimFs| reply_empty(fs.fallocate(fh.0, offset, length, mode), reply);
        // Like a first write, it may fetch the old content first.
        if self.fs.write_may_wait(fh.0) {
            self.off_thread(t, allocate);
        } else {
            allocate(&self.fs);
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = metrics::get().fuse("opendir");
        if self.no_opendir.load(Ordering::Relaxed) {
            return reply.error(Errno::ENOSYS);
        }
        // The kernel may keep a directory's listing across opens: the index changes only
        // through this mount (the kernel resets the cached listing itself) or through a
        // conflict rename, which invalidates the entry and with it the listing.
        let cache = FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE;
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), cache),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _t = metrics::get().fuse("readdir");
        let entries = match self.list(ino, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        for (cookie, e) in &entries {
            let name = OsStr::from_bytes(&e.name);
            if reply.add(INodeNo(e.attr.ino), *cookie, kind(e.attr.kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _t = metrics::get().fuse("readdirplus");
        let entries = match self.list(ino, fh, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        for (cookie, e) in &entries {
            let name = OsStr::from_bytes(&e.name);
            let attr = file_attr(&e.attr);
            if reply.add(
                INodeNo(e.attr.ino),
                *cookie,
                name,
                &self.ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::get().fuse("releasedir");
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    // simfs keeps no extended attributes. ENOSYS on the first xattr request sets the
    // connection's no-xattr flag for that operation: the kernel then answers EOPNOTSUPP itself
    // and never asks again. Without it, every `ls -l` (security.selinux, the ACL keys) and the
    // security.capability check before every write cost a round trip each.
    fn getxattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, _s: u32, reply: ReplyXattr) {
        let _t = metrics::get().fuse("getxattr");
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        let _t = metrics::get().fuse("listxattr");
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _t = metrics::get().fuse("setxattr");
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        let _t = metrics::get().fuse("removexattr");
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let _t = metrics::get().fuse("ioctl");
        reply.error(Errno::ENOTTY);
    }

    /// Not offered: the kernel copies with reads and writes instead, which simfs serves as
    /// any others, and stops asking. (fuser's default answers the same but logs a warning
    /// at every mount's first `cp`, which reads as a fault.)
    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _t = metrics::get().fuse("copy_file_range");
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _t = metrics::get().fuse("statfs");
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_free,
                s.files,
                s.files_free,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_writes_need_a_kernel_that_drops_pages_over_them() {
        // What Ubuntu 22.04's 5.15 offers: no FUSE_DIRECT_IO_ALLOW_MMAP (protocol 7.34).
        let old = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS;
        assert!(!drops_pages_over_direct_writes(old));
        assert!(drops_pages_over_direct_writes(
            old | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
        ));
    }
}
