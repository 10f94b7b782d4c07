//! Freshness: what others change in the container appears on this mount within a stated
//! bound, and the kernel forgets exactly what changed.
//!
//! A refresh lists the container (or one subtree) into a side index file with the mount's
//! own builder, applies the difference to the live index (`index::refresh`, where local
//! changes win), then tells the kernel which names and inodes changed, so the long entry and
//! attribute timeouts stay safe, and drops cached copies of versions the container no longer
//! has (an open handle keeps its copy: it reads the version it opened).
//!
//! Refreshes run one at a time: on a timer (`--refresh-interval`, with jitter so a fleet of
//! nodes does not list in lockstep), on demand (`simfs refresh`, through the control socket),
//! and for one entry when a read finds that its blob changed (HTTP 412): the entry is
//! refreshed and the next open, or a read through a handle that has read nothing yet, gets
//! the new version instead of ESTALE.

use crate::blob::BlobStore;
use crate::cache::Cache;
use crate::index::ingest::{no_progress, write_listing, IngestError, IngestOptions, Listing};
use crate::index::names::Name;
use crate::index::refresh::Applied;
use crate::index::{Index, IndexError, SourceId};
use crate::kernel::Kernel;
use crate::local::LocalCopies;
use crate::pins::Pins;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a read that found its blob changed waits for a refresh under way.
const ENTRY_WAIT: Duration = Duration::from_secs(5);

/// The index `meta` key holding the last refresh's report (JSON), for `simfs status`.
pub const LAST_REFRESH: &str = "last_refresh";

/// The last refresh's report recorded in `index` (None: none since it was built, or
/// unreadable).
pub fn last_report(index: &Index) -> Option<Report> {
    let json = index.meta(LAST_REFRESH).ok().flatten()?;
    serde_json::from_str(&json).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("listing the container: {0}")]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("refresh task failed: {0}")]
    Task(String),
    #[error("bad path: {0}")]
    Path(String),
    #[error("another refresh is under way")]
    Busy,
}

/// What one refresh did (recorded in the index for `simfs status`, and sent to `simfs
/// refresh`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The listed prefix, relative to the mount's root ("" for all of it).
    pub scope: String,
    #[serde(rename = "started_unix_ms", with = "crate::protocol::unix_ms")]
    pub started: SystemTime,
    #[serde(rename = "took_ms", with = "crate::protocol::millis")]
    pub took: Duration,
    pub list_requests: u64,
    /// Entries the listing produced.
    pub listed: u64,
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
    pub kept_local: u64,
}

impl Report {
    pub fn changed_anything(&self) -> bool {
        self.added + self.changed + self.removed > 0
    }

    /// One line for logs and `simfs status`.
    pub fn summary(&self) -> String {
        format!(
            "{} added, {} changed, {} removed, {} kept local; {} entries listed with {} requests in {:.2} s",
            self.added,
            self.changed,
            self.removed,
            self.kept_local,
            self.listed,
            self.list_requests,
            self.took.as_secs_f64()
        )
    }
}

pub struct Refresher {
    store: Arc<dyn BlobStore>,
    source: SourceId,
    opts: IngestOptions,
    index: Arc<Index>,
    /// Copies of versions the container no longer has leave the clean cache; local copies
    /// of files others deleted go; an open file keeps both.
    cache: Arc<Cache>,
    local: Arc<LocalCopies>,
    pins: Arc<Pins>,
    /// Where the side index of a refresh is written (the state directory).
    dir: PathBuf,
    rt: tokio::runtime::Handle,
    kernel: Kernel,
    /// One refresh at a time.
    one: tokio::sync::Mutex<()>,
}

/// The periodic refresh task; it stops when dropped.
pub struct Periodic(tokio::task::JoinHandle<()>);

impl Drop for Periodic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `every` give or take a tenth, different on every node and every round.
fn jittered(every: Duration) -> Duration {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64
        ^ (std::process::id() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let unit = (seed % 2001) as f64 / 1000.0 - 1.0; // -1.0 ..= 1.0
    every.mul_f64(1.0 + unit / 10.0)
}

/// Tells the kernel which names and inodes a refresh changed.
fn tell_kernel(k: &Kernel, a: &Applied) {
    for (parent, name) in &a.names {
        k.inval_entry(*parent, name);
    }
    for ino in a.inodes.iter().collect::<BTreeSet<_>>() {
        k.inval_inode(*ino);
    }
}

impl Refresher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn BlobStore>,
        source: SourceId,
        opts: IngestOptions,
        index: Arc<Index>,
        cache: Arc<Cache>,
        local: Arc<LocalCopies>,
        pins: Arc<Pins>,
        kernel: Kernel,
        dir: PathBuf,
        rt: tokio::runtime::Handle,
    ) -> Refresher {
        Refresher {
            store,
            source,
            opts,
            index,
            cache,
            local,
            pins,
            dir,
            rt,
            kernel,
            one: tokio::sync::Mutex::new(()),
        }
    }

    /// Refreshes the tree below `path` (names from the root; empty for everything) and
    /// returns once the changes are visible.
    pub async fn refresh(&self, path: &[Name]) -> Result<Report, RefreshError> {
        self.refresh_with(path, true).await
    }

    /// `refresh`; without `keep_open` a changed file is updated in place even while open
    /// (for a file whose old version is gone and was never read).
    async fn refresh_with(&self, path: &[Name], keep_open: bool) -> Result<Report, RefreshError> {
        // A read waiting on its one entry does not wait out a whole listing: it gives up
        // (and gets ESTALE) if another refresh holds on for long.
        let _one = if keep_open {
            self.one.lock().await
        } else {
            tokio::time::timeout(ENTRY_WAIT, self.one.lock())
                .await
                .map_err(|_| RefreshError::Busy)?
        };
        let (started, t0) = (SystemTime::now(), Instant::now());
        let scope = self.index.scope_for(path)?;
        let prefix = scope.listing_prefix();
        let watching = self.index.watch_changes();
        let side = self.dir.join("refresh.db");
        let known = |name: &str, etag: &str| self.index.known_target(name, etag);
        let listing = Listing {
            under: &prefix,
            known_target: &known,
        };
        let built = write_listing(
            self.store.clone(),
            &self.source,
            &side,
            &self.opts,
            &listing,
            &no_progress,
        )
        .await;
        let applied = match built {
            Ok((stats, requests)) => {
                let (index, pins, side2) = (self.index.clone(), self.pins.clone(), side.clone());
                let scope2 = scope.clone();
                let applied = tokio::task::spawn_blocking(move || {
                    let fresh = Index::open_read_only(&side2)?;
                    let is_open = |ino| pins.is_open(ino);
                    index.refresh_from(&fresh, &scope2, &is_open, keep_open)
                })
                .await;
                match applied {
                    Ok(Ok(a)) => Ok((a, stats, requests)),
                    Ok(Err(e)) => Err(RefreshError::Index(e)),
                    Err(e) => Err(RefreshError::Task(e.to_string())),
                }
            }
            Err(e) => Err(e.into()),
        };
        drop(watching);
        for ext in [
            "db",
            "db-wal",
            "db-shm",
            "db.tmp",
            "db.tmp-wal",
            "db.tmp-shm",
        ] {
            let _ = std::fs::remove_file(side.with_extension(ext));
        }
        let (applied, stats, requests) = applied?;
        // Without `keep_open` this runs for a read of this very inode: the kernel holds the
        // pages being read until the read is answered, so waiting for their invalidation
        // here would wait forever. The kernel then hears of the change just after.
        self.follow(&applied, keep_open).await;
        let report = Report {
            scope: prefix,
            started,
            took: t0.elapsed(),
            list_requests: requests,
            listed: stats.files + stats.dirs + stats.symlinks,
            added: applied.added,
            changed: applied.changed,
            removed: applied.removed,
            kept_local: applied.kept_local,
        };
        let m = crate::metrics::get();
        for (kind, n) in [
            ("added", report.added),
            ("changed", report.changed),
            ("removed", report.removed),
        ] {
            m.refresh_changes
                .get_or_create(&vec![("kind", kind)])
                .inc_by(n);
        }
        if let Err(e) = self.index.set_meta(
            LAST_REFRESH,
            &serde_json::to_string(&report).unwrap_or_default(),
        ) {
            tracing::warn!("cannot record the refresh in the index: {e}");
        }
        Ok(report)
    }

    /// After a refresh's commit: the kernel forgets what changed (waited for when `wait`),
    /// and copies of versions that are gone leave the cache (unless open). An invalidation
    /// waits for reads in flight on the inode, so it runs off the runtime's workers, which
    /// those reads' downloads need.
    async fn follow(&self, a: &Applied, wait: bool) {
        let told = {
            let (a, kernel) = (a.clone(), self.kernel.clone());
            self.rt.spawn_blocking(move || tell_kernel(&kernel, &a))
        };
        if wait {
            let _ = told.await;
        }
        for (ino, blob) in &a.stale {
            self.cache.evict(*ino, blob);
        }
        for ino in &a.unlocal {
            self.local.remove(*ino);
        }
    }

    /// `refresh` of `path` given as text relative to the mount's root (`a/b`, `""` for
    /// all), blocking until it is done: call it off the runtime's workers.
    pub fn refresh_path(&self, path: &str) -> Result<Report, RefreshError> {
        let mut names = Vec::new();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            let name = Name::new(part.as_bytes()).map_err(|e| RefreshError::Path(e.to_string()))?;
            names.push(name);
        }
        self.rt.block_on(self.refresh(&names))
    }

    /// Refreshes the one entry `ino` (its blob was found changed); returns whether the
    /// index changed. Blocks: call it off the runtime's workers.
    pub fn refresh_inode(&self, ino: u64) -> Result<bool, RefreshError> {
        let Some(path) = self.index.path_of(ino)? else {
            return Ok(false);
        };
        // The handle that found the change has read nothing of the old version, which the
        // container no longer has: the inode takes the new version in place.
        let report = self.rt.block_on(self.refresh_with(&path, false))?;
        tracing::info!(
            "{}: the blob changed; refreshed: {}",
            report.scope,
            report.summary()
        );
        Ok(report.changed_anything())
    }

    /// Refreshes everything every `every` (give or take a tenth), until the returned task is
    /// dropped; None when `every` is zero.
    pub fn start(self: &Arc<Self>, every: Duration) -> Option<Periodic> {
        if every.is_zero() {
            return None;
        }
        let me = self.clone();
        Some(Periodic(self.rt.spawn(async move {
            loop {
                tokio::time::sleep(jittered(every)).await;
                match me.refresh(&[]).await {
                    Ok(r) if r.changed_anything() || r.kept_local > 0 => {
                        tracing::info!("refresh: {}", r.summary())
                    }
                    Ok(r) => tracing::debug!("refresh: {}", r.summary()),
                    Err(e) => tracing::warn!("refresh failed (the next one retries): {e}"),
                }
            }
        })))
    }
}
