//! Wiring: from a resolved configuration to a serving mount.
//!
//! `prepare` builds the store, checks access (one request, so a missing container or a bad
//! credential fails the mount with a one-line cause), reuses or builds the index and opens
//! the cache. `serve` mounts with fuser and runs until unmounted (or a signal unmounts it).
//! Each source gets its own state directory under the cache dir, locked while mounted so two
//! mounts never share one index or cache.

use crate::blob::azure::{AzureOptions, AzureStore};
use crate::blob::{BlobError, BlobStore};
use crate::cache::{Cache, CacheOptions};
use crate::config::{resolve, SourceArgs, Target};
use crate::fs::SimFs;
use crate::fuse::SimFuse;
use crate::index::sync::{build_index, SyncError, SyncOptions};
use crate::index::{Index, SourceId};
use crate::writeback::{Writeback, WritebackOptions};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Blob(#[from] BlobError),
    #[error("index: {0}")]
    Index(#[from] crate::index::IndexError),
    #[error("{0}")]
    Io(String),
}

impl From<SyncError> for MountError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Blob(b) => MountError::Blob(b),
            SyncError::Index(i) => MountError::Index(i),
        }
    }
}

/// One line naming the cause, for the terminal.
pub fn explain(e: &MountError, target: Option<&Target>) -> String {
    let what = target
        .map(|t| format!("{} (prefix {:?})", t.container_url, t.prefix))
        .unwrap_or_default();
    match e {
        MountError::Blob(BlobError::ContainerNotFound(_)) => {
            format!("container not found: {what}")
        }
        MountError::Blob(BlobError::Auth(m)) => format!(
            "access denied to {what} with {}: {m} (is the SAS valid, unexpired and does it allow read and list?)",
            target.map(|t| t.credential.describe()).unwrap_or("the credential")
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

/// Opens (or builds) the index and the cache for `source` on `store`.
pub fn prepare_with_store(
    store: Arc<dyn BlobStore>,
    source: &SourceId,
    args: &SourceArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<Prepared, MountError> {
    rt.block_on(store.check_access())?;
    let dir = state_dir(&args.cache_dir, source);
    std::fs::create_dir_all(&dir)
        .and_then(|_| {
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        })
        .map_err(|e| MountError::Io(format!("cache dir {}: {e}", dir.display())))?;
    let lock = lock_state(&dir)?;
    let db = dir.join("index.db");
    let mut existing = Index::open_existing(&db, source)?;
    if args.reindex {
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
    let index = match existing {
        Some(i) => {
            tracing::info!("reusing the index at {}", db.display());
            i
        }
        None => {
            let opts = SyncOptions {
                concurrency: args.list_concurrency,
                defaults: args.defaults(),
                progress_after: Some(Duration::from_secs(2)),
            };
            rt.block_on(build_index(store.clone(), source, &db, &opts))?
                .0
        }
    };
    let cache = Cache::new(
        &dir.join("cache"),
        store.clone(),
        rt.handle().clone(),
        CacheOptions::default(),
    )
    .map_err(|e| MountError::Io(format!("cache dir {}: {e}", dir.display())))?;
    let fs = if args.read_only {
        SimFs::new(index, cache)
    } else {
        let opts = WritebackOptions {
            delay: Duration::from_secs_f64(args.upload_delay),
            ..Default::default()
        };
        let wb = Writeback::new(store, rt.handle().clone(), source.prefix.clone(), opts);
        let fs = SimFs::with_writeback(index, cache, wb);
        let pending = fs
            .recover()
            .map_err(|e| MountError::Io(format!("recovering pending changes: {e}")))?;
        if pending > 0 {
            tracing::info!("{pending} changes from an earlier mount are pending; uploading them");
        }
        fs
    };
    Ok(Prepared {
        fs: Arc::new(fs),
        lock,
        state_dir: dir,
    })
}

/// Resolves the source, connects to Azure and prepares the filesystem. The error is one
/// line naming the cause, ready for the terminal.
pub fn prepare(
    args: &SourceArgs,
    rt: &tokio::runtime::Runtime,
) -> Result<(Prepared, Target), String> {
    let target = resolve(args, &|k| std::env::var(k).ok()).map_err(|e| explain(&e.into(), None))?;
    let store = AzureStore::new(
        target.container_url.clone(),
        &target.credential,
        &AzureOptions::default(),
    )
    .map_err(|e| explain(&e.into(), Some(&target)))?;
    let source = SourceId {
        container_url: target.container_url.to_string(),
        prefix: target.prefix.clone(),
    };
    let mut args = args.clone();
    if !args.read_only && target.credential.sas_cannot_write() {
        tracing::warn!("the SAS token does not allow writing (no 'w' in sp=): mounting read-only");
        args.read_only = true;
    }
    let prepared = prepare_with_store(Arc::new(store), &source, &args, rt)
        .map_err(|e| explain(&e, Some(&target)))?;
    Ok((prepared, target))
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub fsname: String,
    pub allow_other: bool,
    pub ttl: Duration,
    pub threads: usize,
    pub noexec: bool,
}

/// Mounts `fs` at `mountpoint`: the FUSE session, not yet serving, with the kernel-cache
/// invalidation wired in. `Session::spawn` serves it in the background and unmounts when the
/// handle is dropped (the benchmarks); `serve` runs it in the foreground.
pub fn session(
    fs: Arc<SimFs>,
    mountpoint: &Path,
    opts: &ServeOptions,
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
    let fuse = SimFuse::new(fs.clone(), opts.ttl);
    let session = fuser::Session::new(fuse, mountpoint, &config)
        .map_err(|e| MountError::Io(format!("cannot mount at {}: {e}", mountpoint.display())))?;
    let notifier = session.notifier();
    fs.set_invalidator(Box::new(move |parent, name| {
        let name = std::ffi::OsStr::from_bytes(name);
        if let Err(e) = notifier.inval_entry(fuser::INodeNo(parent), name) {
            tracing::debug!("invalidating {name:?} in {parent}: {e}");
        }
    }));
    Ok(session)
}

/// Mounts `fs` at `mountpoint` and serves it until it is unmounted. `ready` is called once
/// the kernel has completed the FUSE handshake (or with the error that prevented it).
pub fn serve(
    fs: Arc<SimFs>,
    mountpoint: &Path,
    opts: &ServeOptions,
    ready: impl FnOnce(Result<(), String>),
) -> Result<(), MountError> {
    let mut session = match session(fs.clone(), mountpoint, opts) {
        Ok(s) => s,
        Err(e) => {
            ready(Err(e.to_string()));
            return Err(e);
        }
    };
    let unmounter = std::sync::Mutex::new(session.unmount_callable());
    install_unmount_on_signal(unmounter);
    ready(Ok(()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = (!fs.is_read_only()).then(|| spawn_writeback(fs.clone(), stop.clone()));
    let ran = session
        .run()
        .map_err(|e| MountError::Io(format!("FUSE session ended with an error: {e}")));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(w) = worker {
        let _ = w.join();
        finish_uploads(&fs)?;
    }
    ran
}

/// The background uploader: syncs what is due, then sleeps a little.
fn spawn_writeback(
    fs: Arc<SimFs>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("simfs-writeback".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Err(e) = fs.sync_due(false) {
                    tracing::warn!("write-back: {e}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .expect("spawning the write-back thread")
}

/// After unmount: upload everything still pending, with a progress line, and report what
/// failed (it stays in the journal for the next mount).
fn finish_uploads(fs: &SimFs) -> Result<(), MountError> {
    let (pending, _) = fs.pending().map_err(|e| MountError::Io(e.to_string()))?;
    if pending == 0 {
        return Ok(());
    }
    // A bar on a terminal; a log line every few seconds in the background mount's log.
    tracing::info!("unmounted: uploading {pending} pending changes");
    let bar = indicatif::ProgressBar::new(pending);
    bar.set_message("uploading pending changes");
    let mut logged = std::time::Instant::now();
    let failed = fs
        .drain(true, |left| {
            bar.set_position(pending.saturating_sub(left));
            if logged.elapsed() > Duration::from_secs(3) {
                tracing::info!("{left} changes left to upload");
                logged = std::time::Instant::now();
            }
        })
        .map_err(|e| MountError::Io(e.to_string()))?;
    bar.finish_and_clear();
    if failed == 0 {
        tracing::info!("all {pending} pending changes uploaded");
        return Ok(());
    }
    let (_, failing) = fs.pending().map_err(|e| MountError::Io(e.to_string()))?;
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

/// SIGINT/SIGTERM/SIGHUP unmount the filesystem, which ends `serve` cleanly.
fn install_unmount_on_signal(unmounter: std::sync::Mutex<fuser::SessionUnmounter>) {
    std::thread::spawn(move || {
        // SAFETY: blocking the signals in this thread and waiting for them with sigwait is
        // the documented way to handle signals synchronously; the set is initialised first.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            tracing::info!("signal {sig}: unmounting");
        }
        if let Err(e) = unmounter.lock().unwrap().unmount() {
            tracing::error!("unmount failed: {e}");
        }
    });
}

/// Blocks the unmount signals in the calling thread (call before spawning any thread, so
/// only the signal thread receives them).
pub fn block_unmount_signals() {
    // SAFETY: see install_unmount_on_signal.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
