//! The bounded window: how much closed-but-uncommitted data a mount may hold.
//!
//! A close on an `async` mount returns once the file is in the journal, so a writer could run
//! ahead of the link without limit, and a wiped cache disk would lose all of it. Past
//! `max_pending_bytes` or `max_pending_files` (of *other* files: the closing file itself
//! never waits for its own upload, which could not start while it waited), a close waits
//! until uploads bring the window back under. Every finished upload, committed or failed,
//! wakes the waiters, who count again in the index (the truth, whatever uploaded it).
//!
//! A close waits for as long as that takes: with the service down it waits, like a `hard`
//! NFS mount, rather than fail a write whose data is safe on the local disk. It logs why.

use super::{WbResult, Writeback};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often a waiting close counts again without being woken (the index may have been
/// drained by another path, such as `simfs sync`).
const RECHECK: Duration = Duration::from_millis(250);
/// Counting the window is a scan of the pending rows: while the last count found it under
/// half full, closes within this long of it trust that count plus what closed since.
const TRUST: Duration = Duration::from_millis(100);

/// Finished uploads, counted, for the closes that wait on them; and the last count of the
/// window, for the closes that do not.
#[derive(Default)]
pub(super) struct Finished {
    count: Mutex<u64>,
    cv: Condvar,
    /// When the window was last counted under half full, and that count (files, bytes) plus
    /// the files closed since.
    roomy: Mutex<Option<(Instant, u64, u64)>>,
}

impl Finished {
    /// An upload ended (committed or failed).
    pub(super) fn one(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_all();
    }

    /// Waits until an upload ends after `seen`, or `RECHECK` passes; returns the new count.
    fn wait(&self, seen: u64) -> u64 {
        let g = self.count.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, RECHECK, |n| *n == seen)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    fn now(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Writeback {
    /// Whether close waits for the commit (`sync`) or only for the journal (`async`).
    pub fn is_sync(&self) -> bool {
        self.opts.sync
    }

    /// Whether a close now may wait: on a `sync` mount always; on an `async` one unless the
    /// window was counted under half full a moment ago (the close counts again itself).
    pub fn close_may_wait(&self) -> bool {
        if self.opts.sync {
            return true;
        }
        let (max_files, max_bytes) = (self.opts.max_pending_files, self.opts.max_pending_bytes);
        let roomy = self
            .finished
            .roomy
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        !matches!(*roomy, Some((at, files, bytes))
            if at.elapsed() < TRUST && files < max_files / 2 && bytes < max_bytes / 2)
    }

    /// A file written through a handle was closed (`async`): it is recorded in the journal
    /// with its size and times, its upload is due at once and the background is woken.
    /// Returns when the window has room for it (back-pressure).
    pub fn closed(&self, ino: u64) -> WbResult<()> {
        self.due_at_once(ino)?;
        if !self.pins.is_writing(ino) {
            self.writers_done(ino);
        }
        let size = self.index.getattr(ino)?.map_or(0, |a| a.size);
        self.wait_for_room(ino, size)
    }

    /// Closed-but-uncommitted data of other files than `ino`, in files and bytes, when it
    /// is past the window.
    fn over_window(&self, ino: u64, size: u64) -> WbResult<Option<(u64, u64)>> {
        let (max_files, max_bytes) = (self.opts.max_pending_files, self.opts.max_pending_bytes);
        {
            let mut roomy = self
                .finished
                .roomy
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((at, files, bytes)) = roomy.as_mut() {
                if at.elapsed() < TRUST && *files < max_files / 2 && *bytes < max_bytes / 2 {
                    // Uploads only shrink the window: counting up is on the safe side.
                    *files += 1;
                    *bytes += size;
                    return Ok(None);
                }
            }
        }
        let (files, bytes) = self.index.pending_data(ino)?;
        if files < max_files / 2 && bytes < max_bytes / 2 {
            *self
                .finished
                .roomy
                .lock()
                .unwrap_or_else(|p| p.into_inner()) =
                Some((Instant::now(), files + 1, bytes + size));
        }
        let over = files >= max_files || bytes >= max_bytes;
        Ok(over.then_some((files, bytes)))
    }

    fn wait_for_room(&self, ino: u64, size: u64) -> WbResult<()> {
        let mut seen = self.finished.now();
        let Some((files, bytes)) = self.over_window(ino, size)? else {
            return Ok(());
        };
        tracing::info!(
            "{files} files ({:.1} MiB) are waiting for upload, past --max-pending: a close waits for uploads",
            bytes as f64 / (1 << 20) as f64
        );
        let start = Instant::now();
        let mut told = Instant::now();
        loop {
            seen = self.finished.wait(seen);
            if self.over_window(ino, size)?.is_none() {
                tracing::debug!("a close waited {:?} for the window", start.elapsed());
                return Ok(());
            }
            if told.elapsed() > Duration::from_secs(30) {
                tracing::warn!(
                    "a close has waited {:.0} s for uploads to make room (is the service reachable?)",
                    start.elapsed().as_secs_f64()
                );
                told = Instant::now();
            }
        }
    }
}
