//! The local cache: blobs hydrated to the NVMe, bounded, evicted least recently used first.
//!
//! A cached file is named by the blob's name *and* ETag, so a blob that changed in the
//! container is never served from a stale copy: its new ETag names a different file.
//! Opening an uncached blob starts a `Fill` (`fill/`) and returns at once; reads wait only
//! for their own chunks. A fill goes to `tmp/` and is renamed into `data/` only once complete
//! and verified, so any file in `data/` is whole. Concurrent opens of one blob share one fill.
//! A blob larger than the cache may hold is streamed through a bounded window instead and
//! never kept. Directories are 0700 and files 0600: the cache holds data other users may not
//! read.
//!
//! A file opened for writing takes its whole clean copy over (`take_whole`, used by
//! `local`): from then on the cache no longer knows it. An open file is never evicted: the
//! cache reads the open-handle counts (`pins`) but does not keep them.
//!
//! The cache also knows the disk's free space without a syscall per write (`space.rs`),
//! fetches a directory's small files ahead of their first read (`prefetch.rs`), and keeps
//! itself under its watermarks in the background (`evict.rs`).

mod evict;
mod fill;
mod lru;
mod prefetch;
mod space;
pub mod verify;

pub use fill::Fill;
pub use prefetch::BUDGET_FILES as PREFETCH_FILES;
pub use space::{available, disk_size};

use crate::blob::{BlobError, BlobRef, BlobStore};
use crate::pins::Pins;
use fill::{Mode, Tuning};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("cache disk: {0}")]
    Io(Arc<std::io::Error>),
    #[error("downloaded data failed verification: {0}")]
    Corrupt(String),
    #[error("the cache disk is full (its last 1%, at most 256 MiB, is kept for the index)")]
    DiskFull,
}

impl CacheError {
    /// The blob is not the version the cache was asked for.
    pub fn is_changed(&self) -> bool {
        matches!(self, CacheError::Blob(e) if e.is_changed())
    }
}

impl From<std::io::Error> for CacheError {
    fn from(e: std::io::Error) -> Self {
        CacheError::Io(Arc::new(e))
    }
}

#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// The largest ranged GET of a fill; a blob is cut into about 16 chunks between
    /// `min_chunk` and this.
    pub chunk_size: u64,
    pub min_chunk: u64,
    /// The most ranged GETs in flight for one blob; a fill starts at half of it and
    /// doubles while that raises its rate.
    pub parallel: usize,
    /// Bytes (allocated) the clean cached files may take; the least recently used ones
    /// that no one has open are evicted beyond it. None: bounded only by the disk (its
    /// writers' reserve). Local copies are not counted: they are never evicted.
    pub capacity: Option<u64>,
    /// The most a blob too large for the cache keeps on disk while it is streamed.
    pub stream_window: u64,
    /// Free bytes the clean cache leaves on the disk (above the writers' reserve): below
    /// it, clean files are evicted in the background.
    pub min_free: u64,
    /// How fetched bytes are checked (see `verify`).
    pub verify: verify::Verify,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            chunk_size: 8 << 20,
            min_chunk: 1 << 20,
            parallel: 16,
            capacity: None,
            stream_window: 256 << 20,
            min_free: 0,
            verify: verify::Verify::Auto,
        }
    }
}

impl CacheOptions {
    fn tuning(&self) -> Tuning {
        Tuning {
            min_chunk: self.min_chunk.min(self.chunk_size),
            max_chunk: self.chunk_size,
            start_parallel: (self.parallel / 2).max(1),
            max_parallel: self.parallel.max(1),
            opening: fill::OPENING,
        }
    }
}

/// Why a blob is opened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    /// A reader: a blob too large for the cache is streamed.
    Read,
    /// It must end whole in `data/`, even beyond the capacity (it becomes a local copy).
    Whole,
    /// Ahead of a reader: nothing is evicted for it, and it counts as neither hit nor miss.
    Prefetch,
}

/// An open blob's data: a whole cached file, or a fill still under way.
#[derive(Clone)]
pub enum Content {
    Whole(Arc<File>),
    Filling(Arc<Fill>),
}

impl Content {
    /// Up to `len` bytes at `off` (waiting for a fill's chunks under the range).
    pub fn read_vec(&self, len: usize, off: u64) -> Result<Vec<u8>, CacheError> {
        match self {
            Content::Whole(f) => read_vec(f, len, off),
            Content::Filling(f) => f
                .read_with(off, len as u64, |file| read_vec(file, len, off))
                .map(Option::unwrap_or_default),
        }
    }

    /// Whether a read of `len` bytes at `off` would be answered without waiting.
    pub fn ready(&self, off: u64, len: u64) -> bool {
        match self {
            Content::Whole(_) => true,
            Content::Filling(f) => f.ready(off, len),
        }
    }
}

/// Up to `len` bytes at `off`, `pread` until they are all read or the file ends, into a
/// buffer that is never zeroed first: a FUSE read of 1 MiB would otherwise pay a 1 MiB
/// `memset` (3% of the daemon's CPU in a cold read, perf) before the copy that overwrites it.
pub fn read_vec(file: &File, len: usize, off: u64) -> Result<Vec<u8>, CacheError> {
    Ok(pread_vec(file, len, off)?)
}

/// `read_vec`, for callers outside the cache (uploads reading a local copy back).
pub fn pread_vec(file: &File, len: usize, off: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    pread_into(file, &mut buf, len, off)?;
    Ok(buf)
}

/// Fills the empty `buf` (of any capacity) with up to `len` bytes at `off`.
fn pread_into(file: &File, buf: &mut Vec<u8>, len: usize, off: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    buf.clear();
    buf.reserve(len);
    while buf.len() < len {
        // The rest of `len`, not the whole spare capacity: a vector may get more room than
        // asked for, and a FUSE reply longer than the read asked for fails the read (a
        // page fault of a mapped file then gets SIGBUS).
        let want = len - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: pread writes at most `want` bytes into the spare capacity, and only the
        // bytes it reports written are then counted in the length.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                (off + buf.len() as u64) as libc::off_t,
            )
        };
        match n {
            0 => break,
            // SAFETY: pread initialised these `n` bytes of the spare capacity.
            n if n > 0 => unsafe { buf.set_len(buf.len() + n as usize) },
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// What `simfs status` shows of the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub capacity: Option<u64>,
    /// Allocated bytes of clean cached files.
    pub used: u64,
    /// Opens served from the cache, and opens that downloaded.
    pub hits: u64,
    pub downloads: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

pub struct Cache {
    data_dir: PathBuf,
    tmp_dir: PathBuf,
    store: Arc<dyn BlobStore>,
    verifier: Arc<verify::Verifier>,
    rt: tokio::runtime::Handle,
    opts: CacheOptions,
    /// Hydrated files known to be whole.
    present: moka::sync::Cache<String, ()>,
    /// Fills under way, by key: the single-flight point for downloads.
    filling: Arc<Mutex<HashMap<String, Weak<Fill>>>>,
    /// Bytes promised to fills under way (counted against the capacity with `lru`).
    reserved: Arc<AtomicU64>,
    tmp_seq: AtomicU64,
    pub downloads: AtomicU64,
    hits: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    pins: Arc<Pins>,
    space: space::Space,
    lru: Arc<lru::Lru>,
    prefetch: prefetch::Prefetch,
    marks: evict::Marks,
    evictor: std::sync::OnceLock<evict::Evictor>,
}

/// Blocks a file takes on disk, in bytes.
fn allocated(md: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(md) * 512
}

pub(crate) fn private_dir(p: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(p)?;
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// The inode flag `chattr +T` sets (linux/fs.h), which the libc crate does not name.
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Asks the filesystem to place each folder made in `dir` from now on away from the rest,
/// as ext4 places the folders of its root (`chattr +T`).
///
/// Why: ext4 without a journal (common on scratch NVMe) skips every inode freed in the last
/// half minute or so when it allocates one, and checks each one's deletion time; its
/// allocator keeps a folder's files in its folder's group and a new folder near its parent.
/// The cache's folders sat in the groups of the folder holding the cache, beside the job's
/// own files when the job works on the same disk: a `pip install` into the mount unpacks
/// its wheels on that disk and deletes them, and then each local copy simfs made paid for
/// those deletions (9 % of the daemon's CPU in a profile of one). Best effort: other
/// filesystems ignore the flag or refuse it, and folders already made stay where they are.
pub(crate) fn spread_children(dir: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(d) = File::open(dir) else {
        return;
    };
    let Some(flags) = inode_flags(&d).filter(|f| f & FS_TOPDIR_FL == 0) else {
        return;
    };
    let flags = flags | FS_TOPDIR_FL;
    // SAFETY: a valid descriptor and a pointer to an int, as FS_IOC_SETFLAGS takes.
    if unsafe { libc::ioctl(d.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) } != 0 {
        tracing::debug!(
            "cache dir {}: spreading its folders: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Whether folders made in `dir` are spread (`spread_children`); None when its filesystem
/// has no such flags.
pub fn spreads_children(dir: &Path) -> Option<bool> {
    let flags = inode_flags(&File::open(dir).ok()?)?;
    Some(flags & FS_TOPDIR_FL != 0)
}

fn inode_flags(f: &File) -> Option<libc::c_int> {
    use std::os::fd::AsRawFd;
    let mut flags: libc::c_int = 0;
    // SAFETY: a valid descriptor and a pointer to an int, as FS_IOC_GETFLAGS takes.
    (unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } == 0).then_some(flags)
}

impl Cache {
    /// A cache rooted at `dir` (created 0700). Leftover partial downloads are removed. Files
    /// whose inode `pins` counts open are never evicted.
    pub fn new(
        dir: &Path,
        pins: Arc<Pins>,
        store: Arc<dyn BlobStore>,
        rt: tokio::runtime::Handle,
        opts: CacheOptions,
    ) -> std::io::Result<Cache> {
        let data_dir = dir.join("data");
        let tmp_dir = dir.join("tmp");
        private_dir(dir)?;
        spread_children(dir);
        private_dir(&data_dir)?;
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir)?;
        }
        private_dir(&tmp_dir)?;
        // Files hydrated before a restart stay, least recently modified first in line for
        // eviction; each is trusted only when the index's blob name and ETag hash to it.
        let lru = lru::Lru::default();
        let mut kept: Vec<_> = std::fs::read_dir(&data_dir)?
            .filter_map(|e| {
                let e = e.ok()?;
                let md = e.metadata().ok()?;
                Some((
                    md.modified().ok()?,
                    e.file_name().into_string().ok()?,
                    allocated(&md),
                ))
            })
            .collect();
        kept.sort();
        for (_, key, bytes) in kept {
            lru.insert(&key, bytes, None);
        }
        let marks = evict::Marks::new(opts.capacity, opts.min_free, disk_size(dir)?);
        Ok(Cache {
            verifier: Arc::new(verify::Verifier::new(opts.verify)),
            data_dir,
            tmp_dir,
            store,
            rt,
            opts,
            present: moka::sync::Cache::new(1 << 20),
            filling: Arc::default(),
            reserved: Arc::default(),
            tmp_seq: AtomicU64::new(0),
            downloads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            pins,
            space: space::Space::new(dir),
            lru: Arc::new(lru),
            prefetch: prefetch::Prefetch::default(),
            marks,
            evictor: std::sync::OnceLock::new(),
        })
    }

    /// The cache file name for a blob version: hashes, so any blob name and ETag fit.
    fn key(blob: &BlobRef) -> String {
        let name = Sha256::digest(blob.name.as_bytes());
        let etag = Sha256::digest(blob.etag.as_bytes());
        format!("{}-{}", hex::encode(&name[..16]), hex::encode(&etag[..8]))
    }

    fn whole_file(&self, key: &str, size: u64) -> Option<PathBuf> {
        let p = self.data_dir.join(key);
        let md = std::fs::metadata(&p).ok()?;
        (md.len() == size).then_some(p)
    }

    /// Whether the clean copy of `blob` is cached whole (opening it makes no request).
    pub fn is_hydrated(&self, blob: &BlobRef) -> bool {
        let key = Self::key(blob);
        self.present.contains_key(&key) || self.whole_file(&key, blob.size).is_some()
    }

    /// Opens the cached copy of `blob` for inode `ino`. An uncached blob starts filling
    /// (after room is made for it) and is returned at once: reads wait for their ranges.
    pub fn open(&self, ino: u64, blob: &BlobRef) -> Result<Content, CacheError> {
        self.open_with(ino, blob, Want::Read)
    }

    fn open_with(&self, ino: u64, blob: &BlobRef, want: Want) -> Result<Content, CacheError> {
        loop {
            if let Some(c) = self.open_once(ino, blob, want)? {
                return Ok(c);
            }
        }
    }

    /// `open_with`, or None when a fill of the blob completed between the look for a whole
    /// copy and the look for a fill (then the whole copy is there: look again).
    fn open_once(
        &self,
        ino: u64,
        blob: &BlobRef,
        want: Want,
    ) -> Result<Option<Content>, CacheError> {
        let key = Self::key(blob);
        if self.present.contains_key(&key) || self.whole_file(&key, blob.size).is_some() {
            match File::open(self.data_dir.join(&key)) {
                Ok(file) => {
                    self.present.insert(key.clone(), ());
                    if want != Want::Prefetch {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        self.count_open("hit", &key, blob.size);
                    }
                    // A hit only moves the file to the front; its size is read when new.
                    if !self.lru.touch(&key, ino) {
                        let bytes = file.metadata().map(|m| allocated(&m)).unwrap_or(blob.size);
                        self.lru.insert(&key, bytes, Some(ino));
                    }
                    return Ok(Some(Content::Whole(Arc::new(file))));
                }
                // Removed behind our back (evicted, or someone cleaned the cache).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.present.invalidate(&key);
                    self.lru.remove(&key);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if blob.size == 0 {
            // Nothing to fetch (a fill of no chunks would never finish): the empty copy is
            // written here, through tmp/ like any other.
            let tmp = self.tmp_path(&key);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            std::fs::rename(&tmp, self.data_dir.join(&key))?;
            self.present.insert(key.clone(), ());
            self.lru.insert(&key, 0, Some(ino));
            return Ok(Some(Content::Whole(Arc::new(File::open(
                self.data_dir.join(&key),
            )?))));
        }
        Ok(self.fill_for(ino, &key, blob, want)?.map(Content::Filling))
    }

    /// A new, unique name in `tmp/` for a copy of `key` being written.
    fn tmp_path(&self, key: &str) -> PathBuf {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir
            .join(format!("{key}.{}.{seq}", std::process::id()))
    }

    /// The fill of `blob` under way, or a new one.
    fn fill_for(
        &self,
        ino: u64,
        key: &str,
        blob: &BlobRef,
        want: Want,
    ) -> Result<Option<Arc<Fill>>, CacheError> {
        let whole = want == Want::Whole;
        let mut filling = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = filling.get(key).and_then(Weak::upgrade) {
            if !(f.is_broken() || whole && f.is_window()) {
                if want != Want::Prefetch {
                    self.count_open("joined", key, blob.size);
                }
                return Ok(Some(f));
            }
        } else if self.present.contains_key(key) {
            // A fill finished since the caller looked: it marks its copy present before it
            // leaves this map (under this lock), so the copy is there to open.
            return Ok(None);
        }
        if want != Want::Prefetch {
            self.downloads.fetch_add(1, Ordering::Relaxed);
            self.count_open("miss", key, blob.size);
        }
        let mut tuning = self.opts.tuning();
        let fits = self.opts.capacity.is_none_or(|c| blob.size <= c)
            && blob.size <= self.space.free()?.0 + self.lru.bytes();
        let (mode, reserve) = if whole || fits {
            let dest = self.data_dir.join(key);
            (Mode::Whole { dest }, blob.size)
        } else {
            let window = self
                .opts
                .stream_window
                .min(self.opts.capacity.unwrap_or(u64::MAX) / 2);
            // At least four chunks fit in the window, however small the cache.
            tuning.max_chunk = tuning.max_chunk.min((window / 4).max(64 << 10));
            tuning.min_chunk = tuning.min_chunk.min(tuning.max_chunk);
            let chunk = tuning.chunk_for(blob.size);
            let chunks = (window / chunk).max(4) as usize;
            (Mode::Window { chunks }, chunks as u64 * chunk)
        };
        if want != Want::Prefetch {
            self.make_room(reserve)?;
        }
        self.reserved.fetch_add(reserve, Ordering::Relaxed);
        let tmp = self.tmp_path(key);
        let finish = {
            let (present, lru, reserved) = (
                self.present.clone(),
                self.lru.clone(),
                self.reserved.clone(),
            );
            let (filling, key) = (self.filling.clone(), key.to_string());
            Box::new(move |f: &Fill, ok: bool| {
                // Tracked before its reservation is returned, so the bytes are never out of
                // the count, and before the fill leaves the map, so `settle` sees them.
                if let (true, Mode::Whole { dest }) = (ok, f.mode()) {
                    let bytes = std::fs::metadata(dest).map(|m| allocated(&m)).unwrap_or(0);
                    lru.insert(&key, bytes, Some(ino));
                    present.insert(key.clone(), ());
                }
                reserved.fetch_sub(reserve, Ordering::Relaxed);
                let mut map = filling.lock().unwrap_or_else(|p| p.into_inner());
                // Only our own entry: a whole fill may have replaced a window of the blob.
                if map.get(&key).is_some_and(|w| std::ptr::eq(w.as_ptr(), f)) {
                    map.remove(&key);
                }
            }) as fill::Finish
        };
        let store = self.store.clone();
        let fill = Fill::new(
            blob.clone(),
            tmp,
            mode,
            tuning,
            (store, self.verifier.clone()),
            self.rt.clone(),
            finish,
        )?;
        filling.insert(key.to_string(), Arc::downgrade(&fill));
        drop(filling);
        fill.start();
        Ok(Some(fill))
    }

    /// Counts a reader's open of `key` (`size` bytes) for the metrics: served from the
    /// cache (`hit`), by a download under way (`joined`) or by a new one (`miss`); a file
    /// fetched ahead of its read counts as prefetch `used` the first time.
    fn count_open(&self, result: &'static str, key: &str, size: u64) {
        let m = crate::metrics::get();
        m.cache_opens.get_or_create(&vec![("result", result)]).inc();
        m.cache_open_bytes
            .get_or_create(&vec![("result", result)])
            .inc_by(size);
        if self.prefetch.forget(key) {
            m.prefetch.get_or_create(&vec![("outcome", "used")]).inc();
        }
    }

    /// Downloads of whole files (or windows) under way.
    pub fn fills_in_flight(&self) -> usize {
        self.filling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|f| f.strong_count() > 0)
            .count()
    }

    /// What the cache holds and how it has done.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            capacity: self.opts.capacity,
            used: self.lru.bytes(),
            hits: self.hits.load(Ordering::Relaxed),
            downloads: self.downloads.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            evicted_bytes: self.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// Moves the whole clean copy of `blob` to `dest` (hydrating it first, even beyond the
    /// capacity): the inode `ino` takes it over as its local copy and the cache forgets it.
    /// It is not pinned between the two steps, so an eviction may take it first: then it is
    /// fetched again.
    pub fn take_whole(&self, ino: u64, blob: &BlobRef, dest: &Path) -> Result<(), CacheError> {
        let key = Self::key(blob);
        let mut tries = 0;
        loop {
            self.hydrate(ino, blob)?;
            self.present.invalidate(&key);
            self.lru.remove(&key);
            match std::fs::rename(self.data_dir.join(&key), dest) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
                r => return Ok(r?),
            }
        }
    }

    /// Free bytes and free inodes on the cache disk, less the reserve writers cannot use
    /// (an estimate at most a fraction of a second old).
    pub fn free_space(&self) -> std::io::Result<(u64, u64)> {
        self.space.free()
    }

    /// Refuses (ENOSPC) a write of `bytes` that would eat into the reserve: the index needs
    /// that room to record deletions, or a full disk could never be freed from the mount.
    pub fn check_room(&self, bytes: u64) -> Result<(), CacheError> {
        if self.space.take(bytes)? {
            return Ok(());
        }
        // Clean copies can be fetched again; the writer's data cannot.
        if self.evict_lru(bytes) == 0 || !self.space.take(bytes)? {
            return Err(CacheError::DiskFull);
        }
        Ok(())
    }

    /// Makes sure the clean copy of `blob` is cached whole for inode `ino` (downloading it
    /// once, however many callers ask at the same time), even beyond the capacity.
    pub fn hydrate(&self, ino: u64, blob: &BlobRef) -> Result<(), CacheError> {
        match self.open_with(ino, blob, Want::Whole)? {
            Content::Whole(_) => Ok(()),
            Content::Filling(f) => f.wait_complete(),
        }
    }

    /// What the clean cache may hold in all without trimming what it holds: its high
    /// watermark, or (unbounded) what it holds now plus the free disk above the floor.
    pub fn room(&self) -> Result<u64, CacheError> {
        match self.marks.high {
            Some(h) => Ok(h),
            None => Ok(self.space.free()?.0.saturating_sub(self.marks.floor) + self.lru.bytes()),
        }
    }

    /// Drops the cached copy of `blob` unless inode `ino` is open; returns the bytes freed
    /// (None: not cached, or open).
    pub fn evict(&self, ino: u64, blob: &BlobRef) -> Option<u64> {
        if self.pins.is_open(ino) {
            return None;
        }
        let key = Self::key(blob);
        self.present.invalidate(&key);
        let path = self.data_dir.join(&key);
        // The LRU knows its size; a copy it does not track (from before a restart) is sized
        // from the disk before it goes.
        let bytes = self
            .lru
            .remove(&key)
            .or_else(|| std::fs::metadata(&path).map(|m| allocated(&m)).ok());
        std::fs::remove_file(&path).ok()?;
        self.space.forget();
        bytes
    }

    /// Waits until no fill or prefetch round is under way (fills that fail are not retried).
    /// For tests: a fill completes in the background after its last read.
    #[cfg(any(test, feature = "test-util"))]
    pub fn settle(&self) {
        let mut failed = std::collections::HashSet::new();
        loop {
            let fills: Vec<Arc<Fill>> = self
                .filling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter_map(Weak::upgrade)
                .filter(|f| !f.is_window() && !failed.contains(&Arc::as_ptr(f)))
                .collect();
            let rounds = self.prefetch_running();
            if fills.is_empty() && !rounds {
                return;
            }
            for f in fills {
                if f.wait_complete().is_err() {
                    failed.insert(Arc::as_ptr(&f));
                }
            }
            if rounds {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

fn md5_file(p: &Path) -> std::io::Result<Vec<u8>> {
    use md5::{Digest as _, Md5};
    let mut f = File::open(p)?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().to_vec());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::read_vec;

    /// A 100,000-byte file of a known pattern, opened, and its bytes.
    fn patterned_file() -> (tempfile::TempDir, std::fs::File, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &body).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        (dir, f, body)
    }

    #[test]
    fn read_vec_reads_the_range_and_stops_short_at_the_end_of_the_file() {
        let (_dir, f, body) = patterned_file();
        assert_eq!(read_vec(&f, 4096, 1000).unwrap(), &body[1000..5096]);
        assert_eq!(read_vec(&f, 1 << 20, 99_000).unwrap(), &body[99_000..]);
        assert!(read_vec(&f, 10, 200_000).unwrap().is_empty());
        assert!(read_vec(&f, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn a_read_into_a_roomier_buffer_returns_no_more_than_asked() {
        let (_dir, f, body) = patterned_file();
        let mut buf = Vec::with_capacity(1 << 20);
        super::pread_into(&f, &mut buf, 4096, 1000).unwrap();
        assert_eq!(buf, &body[1000..5096]);
    }
}
