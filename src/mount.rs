//! Wiring: from a plain configuration to a serving mount.
//!
//! `MountConfig` is everything a mount needs besides where the container is; the CLI builds
//! it from the command line, tests and benches build it directly. `prepare` connects to the
//! container described by a resolved `Source` (one request, so a missing container or a bad
//! credential fails the mount with a one-line cause), reuses or builds the index, opens the
//! cache and the write-back engine and recovers an earlier mount's pending changes;
//! `prepare_with_store` does the same over any `BlobStore`. `session` mounts with fuser,
//! `serve` runs the session with the write-back thread until unmounted (or a signal
//! unmounts it), and `finish_uploads` drains what is left. Each source gets its own state
//! directory under the cache dir, locked while mounted so two mounts never share one index
//! or cache. Progress is reported through callbacks; drawing it is the caller's business.

use crate::blob::auth::Credential;
use crate::blob::azure::{AzureOptions, AzureStore};
use crate::blob::bounded::{self, Bounded};
use crate::blob::{BlobError, BlobStore};
use crate::cache::{Cache, CacheOptions};
use crate::fs::SimFs;
use crate::fuse::SimFuse;
use crate::index::build::Defaults;
use crate::index::ingest::{build_index, IngestError, IngestOptions, IngestProgress};
use crate::index::snapshot::{self, Published};
use crate::index::{Index, SourceId};
use crate::kernel::{Kernel, KernelLink};
use crate::local::LocalCopies;
use crate::pins::Pins;
use crate::refresh::Refresher;
use crate::writeback::{Writeback, WritebackOptions};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Blob(#[from] BlobError),
    #[error("index: {0}")]
    Index(#[from] crate::index::IndexError),
    #[error("{0}")]
    Writeback(#[from] crate::writeback::WritebackError),
    #[error("{0}")]
    Io(String),
}

impl From<IngestError> for MountError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Blob(b) => MountError::Blob(b),
            IngestError::Index(i) => MountError::Index(i),
        }
    }
}

/// A container resolved from the command line: where it is and how to reach it.
#[derive(Clone, Debug)]
pub struct Source {
    /// The container URL without any query string (what the index records).
    pub container_url: url::Url,
    /// Blob-name prefix of the mount root: empty, or ending in `/`.
    pub prefix: String,
    pub credential: Credential,
}

impl Source {
    pub fn id(&self) -> SourceId {
        SourceId {
            container_url: self.container_url.to_string(),
            prefix: self.prefix.clone(),
        }
    }
}

/// How to mount, independent of the container.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Where the state directories (index, cache) live; put it on the local NVMe.
    pub cache_dir: PathBuf,
    /// Attributes of blobs that carry none of their own.
    pub defaults: Defaults,
    /// List the container again instead of reusing a persisted index.
    pub reindex: bool,
    /// List requests in flight while indexing.
    pub list_concurrency: usize,
    /// Never write to the container.
    pub read_only: bool,
    pub writeback: WritebackOptions,
    pub cache: CacheOptions,
    /// How long a request may go unanswered (plus a second per MiB it moves).
    pub request_timeout: Duration,
    /// With no index to reuse, start from the snapshot published in the container (when
    /// there is a compatible one) instead of listing.
    pub index_from_container: bool,
    /// Rates the mount holds itself to, across all its traffic.
    pub limits: crate::blob::limits::RateLimits,
}

/// The default `refresh_interval`: a training node sees a new checkpoint or a refreshed
/// dataset within about a minute, and a fleet of 100 nodes on a 100k-blob container costs
/// the account about 2,000 list requests a minute (see docs/consistency.md).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

impl MountConfig {
    /// The defaults for a mount with its state under `cache_dir`, owned by the calling user.
    pub fn new(cache_dir: &Path) -> MountConfig {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        MountConfig {
            cache_dir: cache_dir.to_path_buf(),
            defaults: Defaults {
                uid,
                gid,
                file_mode: 0o644,
                dir_mode: 0o755,
            },
            reindex: false,
            list_concurrency: 32,
            read_only: false,
            writeback: WritebackOptions::default(),
            cache: CacheOptions::default(),
            request_timeout: bounded::DEFAULT_BASE,
            index_from_container: false,
            limits: Default::default(),
        }
    }

    /// How a listing of the container is turned into an index under this configuration.
    fn ingest_options(&self) -> IngestOptions {
        IngestOptions {
            concurrency: self.list_concurrency,
            defaults: self.defaults.clone(),
        }
    }
}

/// One line naming the cause, for the terminal.
pub fn explain(e: &MountError, source: Option<&Source>) -> String {
    let what = source
        .map(|t| format!("{} (prefix {:?})", t.container_url, t.prefix))
        .unwrap_or_default();
    match e {
        MountError::Blob(BlobError::ContainerNotFound(_)) => {
            format!("container not found: {what}")
        }
        MountError::Blob(BlobError::Auth(m)) => format!(
            "access denied to {what} with {}: {m} (is the SAS valid, unexpired and does it allow read and list?)",
            source.map(|t| t.credential.describe()).unwrap_or("the credential")
        ),
        MountError::Blob(BlobError::Unreachable(m)) => {
            format!("cannot reach the storage service for {what}: {m}")
        }
        other => other.to_string(),
    }
}

/// A held lock on a state directory, released when dropped.
pub struct StateLock(#[allow(dead_code)] File);

fn lock_state(dir: &Path) -> Result<StateLock, MountError> {
    let f = File::create(dir.join("lock"))
        .map_err(|e| MountError::Io(format!("{}: {e}", dir.display())))?;
    // SAFETY: flock on a valid, owned descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(MountError::Io(format!(
            "{} is in use by another simfs mount of the same source",
            dir.display()
        )));
    }
    Ok(StateLock(f))
}

/// The state directory of `source` under `cache_dir`.
pub fn state_dir(cache_dir: &Path, source: &SourceId) -> PathBuf {
    let h = Sha256::digest(format!("{}\n{}", source.container_url, source.prefix).as_bytes());
    cache_dir.join(hex::encode(&h[..8]))
}

pub struct Prepared {
    pub fs: Arc<SimFs>,
    pub lock: StateLock,
    pub state_dir: PathBuf,
}

/// Raises the soft limit on open files to the hard one, as Go programs do when they start.
///
/// A mount holds a descriptor for every open handle of a written or cached file, besides its
/// SQLite readers, cache fills and connections. The usual soft limit, 1,024 (systemd's
/// default, and many shells'), is a few hundred open files away: past it every create and
/// open fails with EMFILE, a data loader's or a build's included. The hard limit is what the
/// administrator allows, so it is taken whole (an unlimited one as the kernel's `nr_open`,
/// the most a process may have).
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let mut most = lim.rlim_max;
    if most == libc::RLIM_INFINITY {
        most = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if lim.rlim_cur >= most {
        return;
    }
    let was = lim.rlim_cur;
    lim.rlim_cur = most;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        tracing::warn!(
            "could not raise the open files limit from {was}: {}",
            std::io::Error::last_os_error()
        );
    } else {
        tracing::debug!("open files limit raised from {was} to {most}");
    }
}

/// Opens (or builds) the index, the cache and the write-back engine for `source` on
/// `store`, and recovers an earlier mount's pending changes. What changes behind the kernel's
/// back is told to `kernel` (`Kernel::for_session` for a mount, `Kernel::none` without).
pub fn prepare_with_store(
    store: Arc<dyn BlobStore>,
    source: &SourceId,
    cfg: &MountConfig,
    kernel: &Kernel,
    rt: &tokio::runtime::Runtime,
    progress: &(dyn Fn(IngestProgress) + Sync),
) -> Result<Prepared, MountError> {
    rt.block_on(store.check_access())?;
    raise_open_files_limit();
    let dir = state_dir(&cfg.cache_dir, source);
    std::fs::create_dir_all(&dir)
        .and_then(|_| {
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(|e| MountError::Io(format!("cache dir {}: {e}", dir.display())))?;
    let lock = lock_state(&dir)?;
    let db = dir.join("index.db");
    let mut existing = Index::open_existing(&db, source)?;
    if cfg.reindex {
        if let Some(i) = &existing {
            let pending = i.pending()?.0;
            if pending > 0 {
                return Err(MountError::Io(format!(
                    "--reindex would discard {pending} changes not yet uploaded; mount without it first so they are uploaded"
                )));
            }
        }
        existing = None;
    }
    let ingest = cfg.ingest_options();
    // With no index to reuse: the container's snapshot when asked for and usable, else a
    // listing.
    let from_snapshot = || {
        if !cfg.index_from_container || cfg.reindex {
            return None;
        }
        match rt.block_on(snapshot::fetch(store.clone(), source, &db)) {
            Ok(i) => {
                tracing::info!(
                    "started from the index snapshot in the container; the refresh brings it up to date"
                );
                Some(i)
            }
            Err(e) => {
                tracing::warn!("{e}; listing the container");
                None
            }
        }
    };
    let index = match existing {
        Some(i) => {
            tracing::info!("reusing the index at {}", db.display());
            i
        }
        None => match from_snapshot() {
            Some(i) => i,
            None => {
                rt.block_on(build_index(store.clone(), source, &db, &ingest, progress))?
                    .0
            }
        },
    };
    // Whoever made them (an older simfs, a caller with a loose umask), the index and its
    // journal are private: the index names every file, the journal what is not uploaded.
    for f in ["index.db", "index.db-wal", "index.db-shm", "lock"] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| MountError::Io(format!("{}: {e}", p.display())))?;
        }
    }
    let index = Arc::new(index);
    let pins = Arc::new(Pins::default());
    let cache = Cache::new(
        &dir.join("cache"),
        pins.clone(),
        store.clone(),
        rt.handle().clone(),
        cfg.cache.clone(),
    )
    .map_err(|e| MountError::Io(format!("cache dir {}: {e}", dir.display())))?;
    let cache = Arc::new(cache);
    cache
        .start_evictor()
        .map_err(|e| MountError::Io(format!("starting the cache's eviction thread: {e}")))?;
    // Beside the clean cache's own folders, where they have always been.
    let local_dir = dir.join("cache").join("local");
    let local = LocalCopies::new(&local_dir, cache.clone())
        .map_err(|e| MountError::Io(format!("cache dir {}: {e}", local_dir.display())))?;
    let local = Arc::new(local);
    let refresher = Arc::new(Refresher::new(
        store.clone(),
        source.clone(),
        ingest,
        index.clone(),
        cache.clone(),
        local.clone(),
        pins.clone(),
        kernel.clone(),
        dir.clone(),
        rt.handle().clone(),
    ));
    let writeback = if cfg.read_only {
        None
    } else {
        let wb = Writeback::new(
            store,
            index.clone(),
            local.clone(),
            pins.clone(),
            kernel.clone(),
            rt.handle().clone(),
            source.prefix.clone(),
            cfg.writeback.clone(),
        )?;
        let pending = wb.recover()?;
        if pending > 0 {
            tracing::info!("{pending} changes from an earlier mount are pending; uploading them");
        }
        Some(Arc::new(wb))
    };
    let fs = Arc::new(SimFs::new(index, cache, local, pins, writeback, refresher));
    Ok(Prepared {
        fs,
        lock,
        state_dir: dir,
    })
}

/// Connects to `source` on Azure and prepares the filesystem. The error is one line naming
/// the cause, ready for the terminal.
pub fn prepare(
    source: &Source,
    cfg: &MountConfig,
    kernel: &Kernel,
    rt: &tokio::runtime::Runtime,
    progress: &(dyn Fn(IngestProgress) + Sync),
) -> Result<Prepared, String> {
    let store = connect(source, cfg)?;
    let mut cfg = cfg.clone();
    if !cfg.read_only && source.credential.sas_cannot_write() {
        tracing::warn!("the SAS token does not allow writing (no 'w' in sp=): mounting read-only");
        cfg.read_only = true;
    }
    prepare_with_store(store, &source.id(), &cfg, kernel, rt, progress)
        .map_err(|e| explain(&e, Some(source)))
}

/// The container of `source` on Azure, every request bounded by `cfg.request_timeout` (a
/// frozen service fails instead of hanging: see blob::bounded).
pub fn connect(source: &Source, cfg: &MountConfig) -> Result<Arc<dyn BlobStore>, String> {
    let store = AzureStore::new(
        source.container_url.clone(),
        &source.credential,
        &AzureOptions {
            limits: cfg.limits,
            ..AzureOptions::default()
        },
    )
    .map_err(|e| explain(&e.into(), Some(source)))?;
    Ok(Arc::new(Bounded::new(store, cfg.request_timeout)))
}

/// Lists `source` and publishes its index as a snapshot in the container (see
/// `index::snapshot`), working in a scratch directory under the cache directory.
pub fn publish_index(
    source: &Source,
    cfg: &MountConfig,
    rt: &tokio::runtime::Runtime,
) -> Result<Published, String> {
    let store = connect(source, cfg)?;
    rt.block_on(store.check_access())
        .map_err(|e| explain(&e.into(), Some(source)))?;
    let work = cfg
        .cache_dir
        .join(format!("publish-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let opts = cfg.ingest_options();
    let out = rt.block_on(snapshot::publish(store, &source.id(), &opts, &work));
    let _ = std::fs::remove_dir_all(&work);
    out.map_err(|e| e.to_string())
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub fsname: String,
    pub allow_other: bool,
    pub ttl: Duration,
    pub threads: usize,
    pub noexec: bool,
    /// Which kernel features to use where the kernel offers them.
    pub kernel_features: crate::fuse::KernelFeatures,
    /// How often to list the container again for others' changes (zero: never).
    pub refresh_interval: Duration,
    /// Entries listed through the mount before it is reported ready, so the kernel knows
    /// them (see `prime`); zero: none.
    pub prime_entries: usize,
    /// Where Prometheus metrics are served (`/metrics`), if anywhere.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The kernel's read-ahead for the mount in bytes (see `set_read_ahead`); zero leaves
    /// the kernel's default.
    pub read_ahead: u64,
}

/// The most a mount spends priming the kernel's dentry cache before it reports ready.
const PRIME_BUDGET: Duration = Duration::from_secs(2);

/// Mounts `fs` at `mountpoint`: the FUSE session, not yet serving, with `kernel` (the handle
/// `fs` was prepared with) linked to it. `Session::spawn` serves it in the background and unmounts when the
/// handle is dropped (the benchmarks); `serve` runs it in the foreground.
pub fn session(
    fs: Arc<SimFs>,
    (kernel, link): (Kernel, KernelLink),
    mountpoint: &Path,
    opts: &ServeOptions,
    rt: &tokio::runtime::Handle,
) -> Result<fuser::Session<SimFuse>, MountError> {
    use fuser::{Config, MountOption, SessionACL};
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("simfs".into()),
        MountOption::NoDev,
        MountOption::DefaultPermissions,
    ];
    if fs.is_read_only() {
        config.mount_options.push(MountOption::RO);
    }
    if opts.noexec {
        config.mount_options.push(MountOption::NoExec);
    }
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    // One /dev/fuse descriptor per worker: no thundering herd on a shared one.
    config.clone_fd = true;
    let fuse = SimFuse::new(
        fs.clone(),
        opts.ttl,
        rt.clone(),
        opts.kernel_features,
        kernel,
    );
    let session = fuser::Session::new(fuse, mountpoint, &config)
        .map_err(|e| MountError::Io(format!("cannot mount at {}: {e}", mountpoint.display())))?;
    link.connect(session.notifier());
    Ok(session)
}

/// Mounts `fs` at `mountpoint` and serves it, with the write-back thread, until it is
/// unmounted. `ready` is called once the mount serves and the kernel's dentry cache is
/// primed (or with the error that prevented serving). What is still pending afterwards is
/// `finish_uploads`'s.
pub fn serve(
    fs: Arc<SimFs>,
    kernel: (Kernel, KernelLink),
    mountpoint: &Path,
    opts: &ServeOptions,
    rt: &tokio::runtime::Handle,
    ready: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Result<(), MountError> {
    if let Some(addr) = opts.metrics_address {
        // Before the mount: an address in use fails it, with the reason.
        match crate::metrics::serve(addr) {
            Ok(at) => tracing::info!("metrics at http://{at}/metrics"),
            Err(e) => {
                let e = MountError::Io(format!("serving metrics at {addr}: {e}"));
                ready(Err(e.to_string()));
                return Err(e);
            }
        }
    }
    // Read at scrape time (and by `simfs stats` over the control socket).
    let source = fs.clone();
    crate::metrics::get().set_source(Box::new(move || source.levels()));
    let mut session = match session(fs.clone(), kernel, mountpoint, opts, rt) {
        Ok(s) => s,
        Err(e) => {
            ready(Err(e.to_string()));
            return Err(e);
        }
    };
    let unmounter = std::sync::Mutex::new(session.unmount_callable());
    install_unmount_on_signal(unmounter);
    // Through the mount, so it needs the session below running.
    let (at, entries, read_ahead) = (
        mountpoint.to_path_buf(),
        opts.prime_entries,
        opts.read_ahead,
    );
    std::thread::spawn(move || {
        if read_ahead > 0 {
            set_read_ahead(&at, read_ahead);
        }
        if entries > 0 {
            let p = crate::prime::prime(&at, entries, PRIME_BUDGET);
            tracing::info!(
                "primed the kernel's dentry cache: {} entries in {} directories, {:.0} ms{}",
                p.entries,
                p.dirs,
                p.elapsed.as_secs_f64() * 1e3,
                if p.partial {
                    " (stopped at its bound)"
                } else {
                    ""
                }
            );
        }
        ready(Ok(()));
    });
    let background = fs.writeback().map(|wb| wb.start());
    let _refreshing = fs.refresher().start(opts.refresh_interval);
    let ran = session
        .run()
        .map_err(|e| MountError::Io(format!("FUSE session ended with an error: {e}")));
    if let Some(b) = background {
        b.stop();
    }
    ran
}

/// Sets the kernel's read-ahead for the mount at `mountpoint` (its backing device's
/// `read_ahead_kb`). FUSE mounts start at 128 KiB, and the INIT reply may only lower it: a
/// sequential read of uncached data then arrives as 8,192 requests of 128 KiB per GiB, each
/// a wake-up of a simfs thread and a reply. With 1 MiB (the largest request the kernel sends)
/// the daemon spent about 5% less CPU per cold GiB (measured, BENCHMARKS.md), and a page
/// fault in a mapped cold file asks for a larger window around it. Called once the mount
/// serves: the `stat` waits for INIT, after which nothing resets it. It needs root (sysfs);
/// otherwise the default stays and the reason is logged.
fn set_read_ahead(mountpoint: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => {
            tracing::info!("read-ahead stays at the kernel's default: {e}");
            return;
        }
    };
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let kib = bytes.div_ceil(1024);
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::debug!("read-ahead {kib} KiB ({knob})"),
        Err(e) => tracing::info!("read-ahead stays at the kernel's default ({knob}: {e})"),
    }
}

/// After unmount: uploads everything still pending, calling `progress(total, left)` as it
/// goes, and reports what failed (it stays in the journal for the next mount).
pub fn finish_uploads(fs: &SimFs, mut progress: impl FnMut(u64, u64)) -> Result<(), MountError> {
    let Some(wb) = fs.writeback() else {
        return Ok(());
    };
    let (pending, _) = wb.pending()?;
    if pending == 0 {
        return Ok(());
    }
    tracing::info!("unmounted: uploading {pending} pending changes");
    let mut logged = std::time::Instant::now();
    let failed = wb.drain(true, |left| {
        progress(pending, left);
        if logged.elapsed() > Duration::from_secs(3) {
            tracing::info!("{left} changes left to upload");
            logged = std::time::Instant::now();
        }
    })?;
    if failed == 0 {
        tracing::info!("all {pending} pending changes uploaded");
        return Ok(());
    }
    let (_, failing) = wb.pending()?;
    for f in &failing {
        tracing::error!(
            "inode {}: not uploaded after {} attempts: {}",
            f.ino,
            f.attempts,
            f.error
        );
    }
    Err(MountError::Io(format!(
        "{failed} changes could not be uploaded; they are kept in the cache and retried at the next mount"
    )))
}

/// The signals that unmount.
fn unmount_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set before sigaddset adds to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// SIGINT/SIGTERM/SIGHUP unmount the filesystem, which ends `serve` cleanly.
fn install_unmount_on_signal(unmounter: std::sync::Mutex<fuser::SessionUnmounter>) {
    std::thread::spawn(move || {
        let set = unmount_signals();
        let mut sig = 0;
        // SAFETY: waiting with sigwait for signals every thread blocks is the documented way
        // to handle them synchronously; `set` is initialised.
        unsafe { libc::sigwait(&set, &mut sig) };
        tracing::info!("signal {sig}: unmounting");
        if let Err(e) = unmounter.lock().unwrap().unmount() {
            tracing::error!("unmount failed: {e}");
        }
    });
}

/// Blocks the unmount signals in the calling thread (call before spawning any thread, so
/// only the signal thread receives them).
pub fn block_unmount_signals() {
    let set = unmount_signals();
    // SAFETY: blocks an initialised set in the calling thread; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}
