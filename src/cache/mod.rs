//! The local cache: whole blobs hydrated to the NVMe on first open.
//!
//! A cached file is named by the blob's name *and* ETag, so a blob that changed in the
//! container is never served from a stale copy: its new ETag names a different file.
//! Downloads go to `tmp/` and are renamed into `data/` only once complete and verified (size,
//! and Content-MD5 when the service has one), so any file in `data/` is whole. Concurrent
//! opens of one blob download it once (single-flight through moka's `try_get_with`).
//! Directories are 0700 and files 0600: the cache holds data other users may not read.
//!
//! Large blobs are fetched as parallel ranged GETs written at their offsets. Eviction, reads
//! during hydration and pinning of open files will extend this module; its layout already
//! keys files so that an evicted one is simply downloaded again.
//!
//! A file opened for writing gets a *local* copy, `local/<ino>`, which from then on is the
//! inode's data (the index says so): a hydrated copy is renamed there, not copied, so read
//! handles opened earlier see the writes too, as on a local disk. Local files hold data not
//! yet uploaded and are never evicted; they are removed with their inode.
//!
//! The cache also counts open handles per inode (`pins.rs`) and knows the disk's free space
//! without a syscall per write (`space.rs`).

mod lru;
mod pins;
mod space;

pub use pins::Pins;
pub use space::disk_size;

use crate::blob::{BlobError, BlobRef, BlobStore};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

impl From<std::io::Error> for CacheError {
    fn from(e: std::io::Error) -> Self {
        CacheError::Io(Arc::new(e))
    }
}

#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Blobs larger than this are fetched as parallel ranges of this size.
    pub chunk_size: u64,
    /// Ranged GETs in flight for one blob.
    pub parallel: usize,
    /// Bytes (allocated) the clean cached files may take; the least recently used ones
    /// that no one has open are evicted beyond it. None: bounded only by the disk (its
    /// writers' reserve). Local copies are not counted: they are never evicted.
    pub capacity: Option<u64>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            chunk_size: 8 << 20,
            parallel: 8,
            capacity: None,
        }
    }
}

/// What `simfs status` shows of the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    local_dir: PathBuf,
    tmp_dir: PathBuf,
    store: Arc<dyn BlobStore>,
    rt: tokio::runtime::Handle,
    opts: CacheOptions,
    /// Hydrated files known to be whole; also the single-flight point for downloads.
    present: moka::sync::Cache<String, Arc<PathBuf>>,
    tmp_seq: AtomicU64,
    pub downloads: AtomicU64,
    hits: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    pins: Pins,
    space: space::Space,
    lru: lru::Lru,
}

/// Blocks a file takes on disk, in bytes.
fn allocated(md: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(md) * 512
}

fn private_dir(p: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(p)?;
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

impl Cache {
    /// A cache rooted at `dir` (created 0700). Leftover partial downloads are removed.
    pub fn new(
        dir: &Path,
        store: Arc<dyn BlobStore>,
        rt: tokio::runtime::Handle,
        opts: CacheOptions,
    ) -> std::io::Result<Cache> {
        let data_dir = dir.join("data");
        let tmp_dir = dir.join("tmp");
        let local_dir = dir.join("local");
        private_dir(dir)?;
        private_dir(&data_dir)?;
        private_dir(&local_dir)?;
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
        Ok(Cache {
            data_dir,
            tmp_dir,
            store,
            rt,
            opts,
            present: moka::sync::Cache::new(1 << 20),
            tmp_seq: AtomicU64::new(0),
            downloads: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            pins: Pins::default(),
            space: space::Space::new(&local_dir),
            lru,
            local_dir,
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

    /// Opens the cached copy of `blob` for inode `ino`, downloading it first when it is not
    /// cached (after making room for it).
    pub fn open(&self, ino: u64, blob: &BlobRef) -> Result<File, CacheError> {
        let key = Self::key(blob);
        let downloaded = std::cell::Cell::new(false);
        let path = self
            .present
            .try_get_with(key.clone(), || -> Result<Arc<PathBuf>, CacheError> {
                if let Some(p) = self.whole_file(&key, blob.size) {
                    return Ok(Arc::new(p));
                }
                downloaded.set(true);
                self.hydrate_now(&key, blob).map(Arc::new)
            })
            .map_err(|e| (*e).clone())?;
        let file = match File::open(path.as_ref()) {
            Ok(f) => f,
            Err(e) => {
                // Removed behind our back (evicted, or someone cleaned the cache): forget it
                // and fetch it again.
                self.present.invalidate(&key);
                self.lru.remove(&key);
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(e.into());
                }
                downloaded.set(true);
                File::open(self.hydrate_now(&key, blob)?)?
            }
        };
        if downloaded.get() {
            // A fresh download replaced whatever was recorded under the key.
            self.lru.remove(&key);
        } else {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        // A hit only moves the file to the front; its size is read when it is new.
        if !self.lru.touch(&key, ino) {
            let bytes = file.metadata().map(|m| allocated(&m)).unwrap_or(blob.size);
            self.lru.insert(&key, bytes, Some(ino));
        }
        Ok(file)
    }

    /// Downloads `blob` into the cache (room made first); returns its path.
    fn hydrate_now(&self, key: &str, blob: &BlobRef) -> Result<PathBuf, CacheError> {
        self.make_room(blob.size)?;
        self.rt.block_on(self.download(key, blob))
    }

    /// Evicts least recently used clean files no one has open until `need` more bytes fit
    /// under the capacity and on the disk. A file larger than the capacity still hydrates
    /// (everything evictable goes first); the disk, not the capacity, is the hard limit.
    fn make_room(&self, need: u64) -> Result<(), CacheError> {
        let mut excess = match self.opts.capacity {
            Some(cap) => (self.lru.bytes() + need).saturating_sub(cap),
            None => 0,
        };
        let (free, _) = self.space.free()?;
        excess = excess.max(need.saturating_sub(free));
        if excess == 0 {
            return Ok(());
        }
        let victims = self.lru.take_victims(excess, |ino| self.pins.is_open(ino));
        for (key, bytes) in victims {
            self.present.invalidate(&key);
            match std::fs::remove_file(self.data_dir.join(&key)) {
                Ok(()) => {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    self.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("evicting {key} from the cache: {e}"),
            }
        }
        self.space.forget();
        Ok(())
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

    /// The local copy of inode `ino`.
    pub fn local_path(&self, ino: u64) -> PathBuf {
        self.local_dir.join(ino.to_string())
    }

    /// Opens the local copy of `ino`, read-write when `write`.
    pub fn open_local(&self, ino: u64, write: bool) -> Result<File, CacheError> {
        Ok(OpenOptions::new()
            .read(true)
            .write(write)
            .open(self.local_path(ino))?)
    }

    /// Gives `ino` a local copy: the hydrated blob moved into place, or an empty file when
    /// there is no blob or its content is about to be discarded (`empty`).
    pub fn make_local(
        &self,
        ino: u64,
        blob: Option<&BlobRef>,
        empty: bool,
    ) -> Result<(), CacheError> {
        let dest = self.local_path(ino);
        match blob {
            Some(b) if !empty => {
                // Hydrate (or find) the clean copy, then take it over.
                self.hydrate(ino, b)?;
                let key = Self::key(b);
                self.present.invalidate(&key);
                self.lru.remove(&key);
                std::fs::rename(self.data_dir.join(&key), &dest)?;
            }
            _ => {
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&dest)?;
            }
        }
        Ok(())
    }

    /// Free bytes and free inodes on the cache disk, less the reserve writers cannot use
    /// (an estimate at most a fraction of a second old).
    pub fn free_space(&self) -> std::io::Result<(u64, u64)> {
        self.space.free()
    }

    /// Refuses (ENOSPC) a write of `bytes` that would eat into the reserve: the index needs
    /// that room to record deletions, or a full disk could never be freed from the mount.
    pub fn check_room(&self, bytes: u64) -> Result<(), CacheError> {
        if !self.space.take(bytes)? {
            return Err(CacheError::DiskFull);
        }
        Ok(())
    }

    /// The open handles per inode.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Makes sure the clean copy of `blob` is cached for inode `ino` (downloading it once,
    /// however many callers ask at the same time).
    pub fn hydrate(&self, ino: u64, blob: &BlobRef) -> Result<(), CacheError> {
        self.open(ino, blob).map(drop)
    }

    /// Removes the local copy of a deleted inode.
    pub fn remove_local(&self, ino: u64) {
        let _ = std::fs::remove_file(self.local_path(ino));
    }

    async fn download(&self, key: &str, blob: &BlobRef) -> Result<PathBuf, CacheError> {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .tmp_dir
            .join(format!("{key}.{}.{seq}", std::process::id()));
        if let Err(e) = self.fill(&tmp, blob).await {
            tracing::warn!("hydrating {:?} failed: {e}", blob.name);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let dest = self.data_dir.join(key);
        std::fs::rename(&tmp, &dest)?;
        Ok(dest)
    }

    async fn fill(&self, tmp: &Path, blob: &BlobRef) -> Result<(), CacheError> {
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp)?;
        if blob.size > 0 {
            file.set_len(blob.size)?;
        }
        let chunk = self.opts.chunk_size.max(1);
        let ranges =
            (0..blob.size.div_ceil(chunk)).map(|i| i * chunk..((i + 1) * chunk).min(blob.size));
        let mut fetches = futures::stream::iter(ranges.map(|r| {
            let store = self.store.clone();
            async move {
                let data = store.get_range(&blob.name, r.clone(), &blob.etag).await;
                (r, data)
            }
        }))
        .buffer_unordered(self.opts.parallel.max(1));
        while let Some((r, data)) = fetches.next().await {
            let data = data?;
            if data.len() as u64 != r.end - r.start {
                return Err(CacheError::Corrupt(format!(
                    "{:?}: range {}..{} returned {} bytes",
                    blob.name,
                    r.start,
                    r.end,
                    data.len()
                )));
            }
            file.write_all_at(&data, r.start)?;
        }
        if let Some(expected) = &blob.content_md5 {
            let actual = md5_file(tmp)?;
            if &actual != expected {
                return Err(CacheError::Corrupt(format!(
                    "{:?}: Content-MD5 mismatch",
                    blob.name
                )));
            }
        }
        Ok(())
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
