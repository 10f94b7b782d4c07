//! The world every core test runs in: a filesystem over an in-memory (failure-injecting)
//! store, wired exactly as a mount is, with helpers to walk and read it.

use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use simfs::blob::BlobStore;
use simfs::cache::CacheOptions;
use simfs::fs::*;
use simfs::index::build::Defaults;
use simfs::index::ingest::no_progress;
use simfs::index::{SourceId, ROOT_INO};
use simfs::kernel::Kernel;
use simfs::mount::{prepare_with_store, MountConfig};
use std::ffi::OsStr;
use std::sync::Arc;

pub(crate) struct World {
    pub fs: Arc<SimFs>,
    pub store: Arc<FaultyStore<MemoryStore>>,
    _lock: simfs::mount::StateLock,
    /// The mount's state directory (index and cache), inside `_dir`.
    pub state: std::path::PathBuf,
    pub _rt: tokio::runtime::Runtime,
    pub _dir: tempfile::TempDir,
}

impl World {
    /// "kill -9": the filesystem goes without closing, flushing or draining anything; its
    /// lock on the state directory goes with the process. Returns the directory.
    pub fn crash(self) -> tempfile::TempDir {
        let World {
            fs, _lock, _dir, ..
        } = self;
        std::mem::forget(fs);
        drop(_lock);
        _dir
    }

    /// The write-back engine of a read-write world.
    pub fn wb(&self) -> &Arc<simfs::writeback::Writeback> {
        self.fs.writeback().expect("a read-write world")
    }
}

pub(crate) fn defaults() -> Defaults {
    Defaults {
        uid: 1000,
        gid: 1000,
        file_mode: 0o644,
        dir_mode: 0o755,
    }
}

pub(crate) fn world_with(mem: MemoryStore, prefix: &str, chunk: u64) -> World {
    let store = Arc::new(FaultyStore::new(mem));
    world_on(store, tempfile::tempdir().unwrap(), prefix, chunk, None)
}

/// A world over `store` with its state in `dir` (an index there is reused); read-write
/// when `delay` is given (the write-back delay). Wired exactly as a mount is, except that a
/// read-write world is a `sync` mount: close returns once the container has the file, which
/// is the contract most write tests pin. `world_async` is the default mount.
pub(crate) fn world_on(
    store: Arc<FaultyStore<MemoryStore>>,
    dir: tempfile::TempDir,
    prefix: &str,
    chunk: u64,
    delay: Option<std::time::Duration>,
) -> World {
    world_telling(store, dir, prefix, chunk, delay, Kernel::none())
}

/// `world_on`, telling `kernel` what changes behind the kernel's back.
pub(crate) fn world_telling(
    store: Arc<FaultyStore<MemoryStore>>,
    dir: tempfile::TempDir,
    prefix: &str,
    chunk: u64,
    delay: Option<std::time::Duration>,
    kernel: Kernel,
) -> World {
    let cfg = config(&dir, chunk, delay, true);
    world_with_kernel(store, dir, prefix, &cfg, kernel)
}

/// A read-write world as simfs mounts by default (`async`: close only journals the file),
/// with write-back `delay` for namespace changes.
pub(crate) fn world_async(
    store: Arc<FaultyStore<MemoryStore>>,
    dir: tempfile::TempDir,
    delay: std::time::Duration,
) -> World {
    let cfg = config(&dir, 1 << 20, Some(delay), false);
    world_from(store, dir, "", &cfg)
}

/// The configuration of a test world: small chunks and blocks, so that a few KiB take the
/// multi-request paths.
pub(crate) fn config(
    dir: &tempfile::TempDir,
    chunk: u64,
    delay: Option<std::time::Duration>,
    sync: bool,
) -> MountConfig {
    let mut cfg = MountConfig::new(dir.path());
    cfg.defaults = defaults();
    cfg.list_concurrency = 4;
    cfg.read_only = delay.is_none();
    cfg.cache = CacheOptions {
        chunk_size: chunk,
        parallel: 4,
        ..Default::default()
    };
    cfg.writeback = simfs::writeback::WritebackOptions {
        delay: delay.unwrap_or_default(),
        sync,
        upload: simfs::blob::upload::UploadOptions {
            single_put_max: 64 << 10,
            block_size: 16 << 10,
            parallel: 4,
        },
        // Nothing is staged for a writer's pause unless a test asks: a test thread held up
        // on a loaded machine would otherwise change what its requests count.
        quiet: None,
        ..Default::default()
    };
    cfg
}

/// A world over `store` with its state in `dir`, mounted with `cfg`.
pub(crate) fn world_from(
    store: Arc<FaultyStore<MemoryStore>>,
    dir: tempfile::TempDir,
    prefix: &str,
    cfg: &MountConfig,
) -> World {
    world_with_kernel(store, dir, prefix, cfg, Kernel::none())
}

fn world_with_kernel(
    store: Arc<FaultyStore<MemoryStore>>,
    dir: tempfile::TempDir,
    prefix: &str,
    cfg: &MountConfig,
    kernel: Kernel,
) -> World {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let source = SourceId {
        container_url: "mem://test".into(),
        prefix: prefix.into(),
    };
    let dyn_store: Arc<dyn BlobStore> = store.clone();
    let p = prepare_with_store(dyn_store, &source, cfg, &kernel, &rt, &no_progress).unwrap();
    World {
        fs: p.fs,
        store,
        _lock: p.lock,
        state: p.state_dir,
        _rt: rt,
        _dir: dir,
    }
}

/// A container written with the Blobfuse2 conventions: marker blobs, a symlinked
/// executable, a checkpoint with a `latest.pt` link, and the odd names real containers hold.
pub(crate) fn fixture() -> MemoryStore {
    let s = MemoryStore::with_page_size(3);
    s.put(
        "venv",
        "",
        &[("hdi_isfolder", "true"), ("permissions", "0750")],
    );
    s.put("venv/bin/python3.11", "#!elf", &[("permissions", "0755")]);
    s.put("venv/bin/python", "python3.11", &[("is_symlink", "true")]);
    s.put("venv/lib/site.py", "print('hi')", &[]);
    s.put(
        "ckpt/step-100.pt",
        vec![7u8; 10_000],
        &[("mtime", "2024-01-02T03:04:05.5Z")],
    );
    s.put("ckpt/latest.pt", "step-100.pt", &[("Is_Symlink", "TRUE")]);
    s.put("empty/", "", &[]);
    s.put("shadow", "I am hidden by shadow/", &[]);
    s.put("shadow/inner", "x", &[]);
    s.put("a//b", "empty segment", &[]);
    s.put("dots/../x", "dot segment", &[]);
    s.put("bad-meta", "y", &[("permissions", "rwx"), ("owner", "bob")]);
    s.put("broken-link", "", &[("is_symlink", "true")]);
    s
}

pub(crate) fn path(w: &World, p: &str) -> FsResult<Attr> {
    let mut ino = ROOT_INO;
    let mut attr = w.fs.getattr(ino)?;
    for seg in p.split('/').filter(|s| !s.is_empty()) {
        attr = w.fs.lookup(ino, OsStr::new(seg))?;
        ino = attr.ino;
    }
    Ok(attr)
}

pub(crate) fn read_all(w: &World, p: &str) -> FsResult<Vec<u8>> {
    let a = path(w, p)?;
    let fh = w.fs.open(a.ino, false, false)?;
    let data = w.fs.read(fh, 0, (a.size + 10) as u32);
    w.fs.release(fh)?;
    data
}

/// A read-only world whose clean cache may hold `capacity` bytes.
pub(crate) fn world_with_capacity(
    store: Arc<FaultyStore<MemoryStore>>,
    dir: tempfile::TempDir,
    capacity: u64,
) -> World {
    let mut cfg = MountConfig::new(dir.path());
    cfg.defaults = defaults();
    cfg.read_only = true;
    cfg.cache.capacity = Some(capacity);
    world_from(store, dir, "", &cfg)
}

/// Raises its flag when dropped, so the threads a test races stop even if the test fails:
/// a panic inside `thread::scope` waits for every thread of the scope, and one looping until
/// told to stop would hold the test (and CI) for ever instead of failing it.
pub(crate) struct StopOnDrop<'a>(pub(crate) &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// While it lives, every request the store sends waits (counted in `counters.held`): a test
/// changes the filesystem while an upload is known to be under way. Dropped, by a failing
/// test too, it lets them go, so a held upload cannot keep `thread::scope` waiting for ever.
pub(crate) struct Held<'a>(&'a FaultyStore<MemoryStore>);

impl<'a> Held<'a> {
    pub(crate) fn new(store: &'a FaultyStore<MemoryStore>) -> Held<'a> {
        store.hold(true);
        Held(store)
    }

    /// Waits until a request is held; fails if `by` ended first (it sent none) or after a
    /// minute.
    pub(crate) fn wait_for_request<T>(&self, by: &std::thread::ScopedJoinHandle<'_, T>) {
        use std::sync::atomic::Ordering;
        let start = std::time::Instant::now();
        while self.0.counters.held.load(Ordering::SeqCst) == 0 {
            assert!(!by.is_finished(), "it ended without sending a request");
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "no request held within a minute"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.hold(false);
    }
}
