//! Write-back: makes the container match the index, pending inode by pending inode.
//!
//! This module is the one home of uploading. The engine (`Writeback`) owns what it works
//! with: the store, the index, the local copies it uploads from, the open-handle counts, the
//! kernel handle (a conflict renames an entry behind the kernel's back) and a lock per
//! inode. The filesystem core asks it to upload an inode (`upload`, which returns once the
//! container has it: fsync, and close on a `sync` mount), tells it when a written file was
//! closed (`closed`: due at once, with back-pressure past the window) and when other changes
//! were made (`changed`, so the background thread wakes when the first of them is due), and
//! what a writer wrote (`wrote_range`, for blocks staged ahead of the commit); nothing here
//! calls back into the core.
//!
//! - `inode.rs`: the idempotent steps that bring one inode's container side up to date;
//! - `conflict.rs`: what happens when someone else changed a blob, and emptying the trash;
//! - `scheduler.rs`: due changes in parallel batches, drain, mount-time recovery, and the
//!   background thread, which sleeps until the next change is due or it is woken;
//! - `stream.rs`: blocks of a file being written sequentially, staged before its commit;
//! - `unseen.rs`: the same for files written in place, found by looking, checked at commit;
//! - `settled.rs`: what an upload of a file written in place committed, so a look
//!   that finds nothing new costs no data upload;
//! - `window.rs`: the bounded window of closed-but-uncommitted data (back-pressure on close);
//! - `sync.rs`: the barrier of `simfs sync PATH`.
//!
//! Every write names the ETag simfs last saw at the target (see `index::journal`). A name
//! simfs has never seen holding a blob is a conflict: the local file is renamed to
//! `<name>.conflict-<time>` and uploaded there, the other writer's blob stays where it is,
//! and the close or fsync that found it fails. Nothing is overwritten unseen and nothing is
//! dropped.
//!
//! Concurrency: uploads of different inodes run side by side, one at a time per inode (close,
//! fsync and the background may race), and one at a time per blob name: an upload holds the
//! names it writes until their new ETags are recorded, and the trash skips a name that is
//! being written, so no upload ever expects a version its own mount is replacing. An upload that must take a name another live inode
//! still claims (renames that swapped names before either was uploaded) locks that inode
//! too, in ascending inode order, so the other inode's upload cannot act on the name it is
//! losing; no other upload waits for it.

mod conflict;
mod inode;
mod intents;
mod scheduler;
mod settled;
mod stream;
mod sync;
mod unseen;
mod window;

pub use scheduler::Background;
pub use sync::SyncOutcome;

use crate::blob::upload::{UploadError, UploadOptions};
use crate::blob::{BlobError, BlobStore};
use crate::index::{Index, IndexError};
use crate::kernel::Kernel;
use crate::local::LocalCopies;
use crate::locks::{InodeLocks, NameLocks};
use crate::pins::Pins;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("uploading: {0}")]
    Upload(#[from] UploadError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(
        "{blob} was changed in the container by someone else; the local version was kept as {kept}"
    )]
    Conflict { blob: String, kept: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0} changes could not be uploaded")]
    Failing(u64),
}

impl WritebackError {
    /// The service refused a write because the name holds another version than expected.
    pub fn is_changed(&self) -> bool {
        match self {
            WritebackError::Blob(e) => e.is_changed(),
            WritebackError::Upload(e) => e.is_changed(),
            _ => false,
        }
    }

    /// The service could not be reached at all (after the client's own retries).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            WritebackError::Blob(BlobError::Unreachable(_))
                | WritebackError::Upload(UploadError::Blob(BlobError::Unreachable(_)))
        )
    }

    /// The service pushed back (see `BlobError::is_pushback`).
    pub fn is_pushback(&self) -> bool {
        match self {
            WritebackError::Blob(e) | WritebackError::Upload(UploadError::Blob(e)) => {
                e.is_pushback()
            }
            _ => false,
        }
    }
}

pub type WbResult<T> = Result<T, WritebackError>;

impl Writeback {
    /// Brings a deleted inode's bookkeeping up to date now (its names go to the trash, its
    /// row once unused: no request), unless an upload of it is under way: then it is made
    /// due and the background finishes it, so an unlink never waits for the network.
    pub fn settle_deleted(&self, ino: u64) -> WbResult<()> {
        // (The probe's guard goes at once: an upload that takes the lock in between only
        // makes this one wait for it, as before.)
        if self.locks.try_lock(&ino).is_some() {
            return self.upload_inode(ino);
        }
        self.due_at_once(ino)
    }

    /// `ino`'s upload is due now and the background is woken; in memory (`Closed`).
    fn due_at_once(&self, ino: u64) -> WbResult<()> {
        self.closed.add(ino);
        self.changed(SystemTime::now());
        Ok(())
    }
}

/// The default bound on closed-but-uncommitted bytes: about 20 s of a 25 Gbit/s link's
/// uploads, and a small share of a GPU node's local NVMe (3.5 to 28 TB): what a wiped cache
/// disk could lose is bounded by it.
pub const DEFAULT_MAX_PENDING_BYTES: u64 = 64 << 30;
/// The default bound on closed-but-uncommitted files: a `pip install` of a large
/// environment (tens of thousands of small files) stays ahead of its uploads.
pub const DEFAULT_MAX_PENDING_FILES: u64 = 100_000;

#[derive(Clone, Debug)]
pub struct WritebackOptions {
    /// How long a namespace or attribute change waits before the background uploads it
    /// (bursts coalesce). A written file's upload is due when it is closed, at once.
    pub delay: Duration,
    /// mount(8)'s `sync`: every close of a written file waits until its blob is committed.
    /// Otherwise (`async`, the default) close only records the file in the journal.
    pub sync: bool,
    /// The most closed-but-uncommitted data, in bytes and in files: past either, a close
    /// waits until uploads bring it back under (back-pressure).
    pub max_pending_bytes: u64,
    pub max_pending_files: u64,
    /// Longest wait between retries of a failing upload.
    pub max_backoff: Duration,
    pub upload: UploadOptions,
    /// How long a writer with a large file open must write nothing before the blocks it
    /// has not staged, the partial last one included, are staged ahead of the commit
    /// (None: only whole blocks the writer has moved past are).
    pub quiet: Option<Duration>,
    /// How long a batch of uploads goes on while every upload fails because the service
    /// cannot be reached: past it the rest of the batch is left due for a later round, so a
    /// drain (an unmount, `simfs sync`) with the service down ends with the failure listed
    /// after a few attempts, not after one attempt of seconds per pending file.
    pub give_up_after: Duration,
}

impl Default for WritebackOptions {
    fn default() -> Self {
        WritebackOptions {
            delay: Duration::from_secs(1),
            sync: false,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            max_pending_files: DEFAULT_MAX_PENDING_FILES,
            max_backoff: Duration::from_secs(60),
            upload: UploadOptions::default(),
            quiet: Some(Duration::from_millis(50)),
            give_up_after: Duration::from_secs(10),
        }
    }
}

pub struct Writeback {
    store: Arc<dyn BlobStore>,
    index: Arc<Index>,
    local: Arc<LocalCopies>,
    pins: Arc<Pins>,
    kernel: Kernel,
    rt: tokio::runtime::Handle,
    /// Blob name prefix of the mount root ("" or ending in '/').
    prefix: String,
    /// This mount's `simfs_writer` id, stamped on every blob it writes.
    writer: String,
    opts: WritebackOptions,
    /// One upload at a time per inode.
    locks: InodeLocks,
    /// One write or delete at a time per blob name, from the request until its result is
    /// recorded: the next writer of the name then sees the ETag it must expect, so a
    /// mount's own uploads never look like someone else's change to each other.
    names: NameLocks,
    wakeup: scheduler::Wakeup,
    /// Uploads that ended, for the closes waiting for room in the window.
    finished: window::Finished,
    /// Blocks of files being written, staged ahead of their commit.
    streams: stream::Streams,
    /// Uploads the background runs at once.
    concurrency: scheduler::Concurrency,
    /// Uploads someone waits for (fsync, a sync close, a barrier): the background holds back.
    foreground: scheduler::Foreground,
    /// What uploads of files written in place committed (see `settled.rs`).
    settled: settled::Settled,
    /// Files closed, due at once (see `scheduler::Closed`).
    closed: scheduler::Closed,
}

impl Writeback {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn BlobStore>,
        index: Arc<Index>,
        local: Arc<LocalCopies>,
        pins: Arc<Pins>,
        kernel: Kernel,
        rt: tokio::runtime::Handle,
        prefix: String,
        opts: WritebackOptions,
    ) -> WbResult<Writeback> {
        let writer = index.writer_id()?;
        let streams = stream::Streams::new(&opts.upload, opts.quiet);
        Ok(Writeback {
            store,
            writer,
            index,
            local,
            pins,
            kernel,
            rt,
            prefix,
            opts,
            locks: InodeLocks::default(),
            names: NameLocks::default(),
            wakeup: scheduler::Wakeup::default(),
            finished: window::Finished::default(),
            streams,
            concurrency: scheduler::Concurrency::default(),
            foreground: scheduler::Foreground::default(),
            settled: settled::Settled::default(),
            closed: scheduler::Closed::default(),
        })
    }

    /// How long a change waits before the background uploads it.
    pub fn delay(&self) -> Duration {
        self.opts.delay
    }

    /// Uploads inode `ino` now if it is pending, for someone who waits (see `Foreground`);
    /// returns once the container has it. A failure is recorded with a retry time for the
    /// background, and returned.
    pub fn upload(&self, ino: u64) -> WbResult<()> {
        let _waiting = self.foreground.enter();
        // A background upload of `ino` that waits for its record to be carried holds the
        // inode's lock meanwhile: commit it now rather than when its wait runs out.
        self.index.hurry_riders()?;
        let _flight = self.concurrency.begin();
        self.upload_inode(ino)
    }

    /// `upload`, without holding the background back.
    fn upload_inode(&self, ino: u64) -> WbResult<()> {
        let mut locked = vec![ino];
        let mut rounds = 0;
        let result = loop {
            let _held = self.locks.lock_all(&locked);
            // The names, to lock them: exact without persisting the writes held in memory.
            let Some(seen) = self.index.pending_inode_as_recorded(ino)? else {
                return Ok(());
            };
            // Claims on a name change only under its lock, so who holds the names this
            // upload writes is read with those locks held.
            let names = self.names_written(&seen)?;
            let _names = self.names.lock_all(&names);
            // Names this upload takes from other live inodes: those inodes wait too. Decided
            // before anything is written, so a redo starts from a clean slate.
            let holders = self.claim_holders(&names, ino)?;
            if holders.iter().all(|h| locked.contains(h)) {
                // The state uploaded, read after the writes held in memory are persisted (its
                // `gen` covers every write so far), and the intents on the names it writes
                // first: one transaction, or none when there is neither.
                if self.new_names(&seen)?.is_empty() && !self.index.has_written() {
                    break self.rt.block_on(self.apply(&locked, &seen, Vec::new()));
                }
                let mut named = Ok(());
                let begun = self.index.begin_upload(ino, |v| match self.new_names(v) {
                    Ok(n) => n,
                    Err(e) => {
                        named = Err(e);
                        Vec::new()
                    }
                })?;
                named?;
                let Some((p, fresh)) = begun else {
                    return Ok(());
                };
                // Renamed between the two reads: its names are not the ones locked.
                if p.names == seen.names {
                    break self.rt.block_on(self.apply(&locked, &p, fresh));
                }
            }
            rounds += 1;
            if rounds > 4 {
                break Err(WritebackError::Invalid(format!(
                    "the names of inode {ino} keep changing hands; will retry"
                )));
            }
            locked = std::iter::once(ino).chain(holders).collect();
        };
        self.finished.one();
        let outcome = match &result {
            Ok(()) => "ok",
            Err(e) if e.is_changed() => "conflict",
            Err(_) => "failed",
        };
        crate::metrics::get()
            .uploads
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
        if let Err(e) = &result {
            let backoff = self.index.upload_failed(
                ino,
                &e.to_string(),
                SystemTime::now(),
                self.opts.max_backoff,
            )?;
            tracing::warn!("uploading inode {ino} failed (retry in {backoff:?}): {e}");
        }
        result
    }
}
