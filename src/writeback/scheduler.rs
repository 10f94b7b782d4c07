//! When uploads happen: batches of due changes, drain, recovery, the background thread.
//!
//! A namespace or attribute change becomes due `delay` after the first change of a burst
//! (see `index::write`); a written file becomes due when it is closed (`closed`), at once.
//! The background thread uploads what is due, oldest first, 16 inodes at a time to start
//! with and adapted to the service (`Concurrency`: halved when it pushes back, grown by one
//! per success up to 64), then sleeps
//! until the next change is due, a new change is due earlier than that (`changed` wakes it),
//! or in-memory data writes should be persisted to the index. An idle mount's thread sleeps
//! and does no work. A file a handle is still writing (written, not yet flushed) is left for
//! later: uploading it midway would only be uploaded again.

use super::{WbResult, Writeback, WritebackError};
use crate::index::journal::Failing;
use crate::posix::{AttrChanges, SetTime};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

/// Inodes the background uploads at once: it starts at `START`, halves (down to one) when
/// the service pushes back (busy, throttling, timing out) and grows by one with each upload
/// that succeeds, up to `MOST`, from one batch to the next.
const START: usize = 16;
const MOST: usize = 64;

/// How many uploads the background runs at once, adapted to the service.
pub(super) struct Concurrency(AtomicUsize);

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency(AtomicUsize::new(START))
    }
}

impl Concurrency {
    fn now(&self) -> usize {
        self.0.load(Ordering::Relaxed).clamp(1, MOST)
    }

    fn succeeded(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some((n + 1).min(MOST))
            });
    }

    fn pushed_back(&self) {
        let before = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some((n / 2).max(1))
            })
            .unwrap_or(1);
        tracing::debug!(
            "the service pushes back: {} uploads at once",
            (before / 2).max(1)
        );
    }
}
/// Longest time data writes stay in memory only (their size and mtime; the dirty mark is
/// always in the index).
const PERSIST_WRITES: Duration = Duration::from_secs(1);

#[derive(Default)]
struct WakeState {
    stop: bool,
    /// The thread is uploading now; a change seen meanwhile makes it look again.
    busy: bool,
    changed: bool,
    /// When the sleeping thread wakes by itself (None: only when woken).
    wake_at: Option<SystemTime>,
}

#[derive(Default)]
pub(super) struct Wakeup {
    state: Mutex<WakeState>,
    cv: Condvar,
}

impl Wakeup {
    fn lock(&self) -> std::sync::MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The background thread; stopped (and joined) by `stop` or on drop.
pub struct Background {
    wb: Arc<Writeback>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.wb.wakeup.lock().stop = true;
        self.wb.wakeup.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.halt();
    }
}

impl Writeback {
    /// A change due at `due` was made: wakes the background thread if it would sleep past it.
    pub fn changed(&self, due: SystemTime) {
        let mut st = self.wakeup.lock();
        if st.busy {
            st.changed = true;
        } else if st.wake_at.is_none_or(|w| due < w) {
            st.wake_at = Some(due);
            self.wakeup.cv.notify_one();
        }
    }

    /// Starts the background thread.
    pub fn start(self: &Arc<Self>) -> Background {
        self.wakeup.lock().stop = false;
        let wb = self.clone();
        let thread = std::thread::Builder::new()
            .name("simfs-writeback".into())
            .spawn(move || wb.background())
            .expect("spawning the write-back thread");
        Background {
            wb: self.clone(),
            thread: Some(thread),
        }
    }

    fn background(&self) {
        if let Err(e) = self.rt.block_on(self.settle_intents(None)) {
            tracing::warn!("write-back: settling interrupted uploads: {e}");
        }
        loop {
            {
                let mut st = self.wakeup.lock();
                if st.stop {
                    return;
                }
                st.busy = true;
                st.changed = false;
            }
            if self.index.has_written() {
                if let Err(e) = self.index.persist_written() {
                    tracing::warn!("write-back: recording data writes: {e}");
                }
            }
            let next = match self.upload_due(false) {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!("write-back: {e}");
                    Some(SystemTime::now() + Duration::from_secs(1))
                }
            };
            let next = if self.index.has_written() {
                let tick = SystemTime::now() + PERSIST_WRITES;
                Some(next.map_or(tick, |n| n.min(tick)))
            } else {
                next
            };
            let mut st = self.wakeup.lock();
            st.busy = false;
            if st.changed {
                continue;
            }
            st.wake_at = next;
            loop {
                if st.stop {
                    return;
                }
                let now = SystemTime::now();
                st = match st.wake_at {
                    Some(t) if t <= now => break,
                    Some(t) => {
                        let wait = t.duration_since(now).unwrap_or_default();
                        self.wakeup
                            .cv
                            .wait_timeout(st, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => self.wakeup.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                };
            }
        }
    }

    /// One round of background work: uploads what is due and empties the trash. A file
    /// open for writing is left to its writer unless `writers_too`. Returns when the next
    /// change will be due (None: nothing pending).
    pub fn upload_due(&self, writers_too: bool) -> WbResult<Option<SystemTime>> {
        self.upload_due_with(writers_too, &mut || {})
    }

    /// Uploads `inos`, `workers` at a time (each upload is mostly a round trip), calling
    /// `done(i, result)` as the `i`th ends. A failure is recorded with its retry time by
    /// `upload` itself.
    pub(super) fn upload_each(
        &self,
        inos: &[u64],
        workers: usize,
        done: &(dyn Fn(usize, &WbResult<()>) + Sync),
    ) {
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..workers.min(inos.len()) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(ino) = inos.get(i) else {
                        return;
                    };
                    done(i, &self.upload(*ino));
                });
            }
        });
    }

    /// `upload_due`, calling `after_batch` after each batch of (up to 256) inodes.
    fn upload_due_with(
        &self,
        writers_too: bool,
        after_batch: &mut dyn FnMut(),
    ) -> WbResult<Option<SystemTime>> {
        loop {
            let now = SystemTime::now();
            let due = self.index.due(now, 256)?;
            if due.is_empty() {
                break;
            }
            let mut ready = Vec::with_capacity(due.len());
            for ino in due {
                if !writers_too && self.pins.is_writing(ino) {
                    self.index.defer(ino, now + self.opts.delay)?;
                } else {
                    ready.push(ino);
                }
            }
            let progress = AtomicBool::new(false);
            self.upload_each(&ready, self.concurrency.now(), &|_, r| match r {
                Ok(()) => {
                    progress.store(true, Ordering::Relaxed);
                    self.concurrency.succeeded();
                }
                Err(e) if e.is_pushback() => self.concurrency.pushed_back(),
                Err(_) => {}
            });
            after_batch();
            if !progress.load(Ordering::Relaxed) {
                break;
            }
        }
        self.empty_trash(writers_too)?;
        Ok(self.index.pending()?.1)
    }

    /// Uploads everything pending now (files still open for writing too when
    /// `writers_too`), calling `progress` with the number left after each round; returns how
    /// many changes are still failing.
    pub fn drain(&self, writers_too: bool, mut progress: impl FnMut(u64)) -> WbResult<u64> {
        self.index.persist_written()?;
        self.rt.block_on(self.settle_intents(None))?;
        self.index.all_due_now()?;
        let mut last_left = u64::MAX;
        loop {
            self.upload_due_with(writers_too, &mut || {
                if let Ok((left, _)) = self.index.pending() {
                    progress(left);
                }
            })?;
            let left = self.index.pending()?.0;
            progress(left);
            if left == 0 {
                return Ok(0);
            }
            if left >= last_left {
                // No progress this round: what is left is failing.
                return Ok(left);
            }
            last_left = left;
            self.index.all_due_now()?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Number of pending changes and the ones failing with their last error.
    pub fn pending(&self) -> WbResult<(u64, Vec<Failing>)> {
        Ok((self.index.pending()?.0, self.index.failing()?))
    }

    /// Mount-time recovery: local copies may be longer than the index recorded, and newer
    /// (a crash between a write and its record); every pending change is due at once.
    /// Returns the number pending.
    pub fn recover(&self) -> WbResult<u64> {
        for ino in self.index.local_inodes()? {
            let Some(a) = self.index.getattr(ino)? else {
                continue;
            };
            let path = self.local.path(ino);
            // A crash between creating the inode and its (empty) local file.
            if !path.exists() && a.size == 0 {
                self.local
                    .make(ino, None, true)
                    .map_err(|e| WritebackError::Invalid(e.to_string()))?;
            }
            // Written in place by the kernel (FUSE passthrough) when the crash came: what was
            // written may never have reached the journal, so the copy is uploaded.
            let marker = self.local.in_place_marker(ino);
            if marker.exists() {
                if let (Ok(md), true) = (std::fs::metadata(&path), a.nlink > 0) {
                    let now = SystemTime::now();
                    self.index.wrote(ino, md.len(), now, now)?;
                }
                let _ = std::fs::remove_file(&marker);
                continue;
            }
            if let Ok(md) = std::fs::metadata(&path) {
                if md.len() != a.size && a.nlink > 0 {
                    let now = SystemTime::now();
                    let fix = AttrChanges {
                        size: Some(md.len()),
                        mtime: md.modified().ok().map(SetTime::At),
                        ..Default::default()
                    };
                    self.index.setattr(ino, &fix, now, now)?;
                }
            }
        }
        self.index.all_due_now()?;
        Ok(self.index.pending()?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobError;

    #[test]
    fn concurrency_halves_when_the_service_pushes_back_and_grows_by_one_per_success() {
        let c = Concurrency::default();
        assert_eq!(c.now(), START);
        c.pushed_back();
        assert_eq!(c.now(), START / 2);
        for _ in 0..10 {
            c.pushed_back();
        }
        assert_eq!(c.now(), 1, "never below one");
        c.succeeded();
        assert_eq!(c.now(), 2);
        for _ in 0..200 {
            c.succeeded();
        }
        assert_eq!(c.now(), MOST, "never above the most");
    }

    #[test]
    fn busy_throttled_and_unreachable_answers_are_pushback_and_others_are_not() {
        let service = |m: &str| BlobError::Service(m.to_string());
        assert!(service("put of \"a\": HTTP 503 ServerBusy").is_pushback());
        assert!(service("put of \"a\": HTTP 500 OperationTimedOut").is_pushback());
        assert!(service("put of \"a\": HTTP 429 TooManyRequests").is_pushback());
        assert!(BlobError::Unreachable("timed out".into()).is_pushback());
        assert!(!service("put of \"a\": HTTP 400 InvalidBlobOrBlock").is_pushback());
        assert!(!BlobError::Changed("a".into()).is_pushback());
        assert!(!BlobError::Auth("a".into()).is_pushback());
    }
}
