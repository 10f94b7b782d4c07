//! Fetching a directory's small files before they are read.
//!
//! A first read of a small uncached file (the filesystem decides what is small) hands the
//! cache the directory's other small files. One background task per directory starts their
//! fills, at most `BUDGET_BYTES` and `BUDGET_FILES` per round. A walk that touches hundreds of
//! directories must not queue thousands of requests at the service ahead of the next demand
//! read (a service answers them in order), so all rounds together keep at most `IN_FLIGHT`
//! (32) fills going, and a round stops once `NEWER_ROUNDS` (4) rounds have started after it:
//! the directories read last are the ones likely read next.
//!
//! It never evicts: a file that does not fit in the room left under the capacity ends the
//! round, so prefetched data never pushes out data someone read. Demand reads never wait for
//! it in simfs (they start their own requests, and join a prefetch of the same file instead
//! of fetching it twice). `cancel_prefetch` (tests) stops every round at its next file.

use super::{BlobRef, Cache, Content};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Fills all prefetch rounds keep in flight together.
pub const IN_FLIGHT: usize = 32;
/// What one round may fetch.
pub const BUDGET_BYTES: u64 = 64 << 20;
pub const BUDGET_FILES: usize = 512;
/// How many rounds may start after a round before it stops.
const NEWER_ROUNDS: u64 = 4;

pub(super) struct Prefetch {
    /// Directories with a round under way.
    running: Mutex<HashSet<u64>>,
    /// Bumped by `cancel_prefetch`; a round stops when it moves.
    generation: std::sync::atomic::AtomicU64,
    pub files: std::sync::atomic::AtomicU64,
    pub enabled: std::sync::atomic::AtomicBool,
    /// One permit per prefetch fill in flight, across rounds.
    slots: Arc<tokio::sync::Semaphore>,
    /// Files fetched ahead and not read yet (for the metrics: used or wasted).
    unread: Mutex<HashSet<String>>,
    /// Rounds started so far (each round's number is its place in this count).
    rounds: std::sync::atomic::AtomicU64,
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch {
            running: Mutex::default(),
            generation: Default::default(),
            files: Default::default(),
            enabled: true.into(),
            slots: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            rounds: Default::default(),
            unread: Mutex::default(),
        }
    }
}

impl Prefetch {
    /// Whether `key` was fetched ahead and not read yet (it is not any more).
    pub(super) fn forget(&self, key: &str) -> bool {
        let mut unread = self.unread.lock().unwrap_or_else(|p| p.into_inner());
        !unread.is_empty() && unread.remove(key)
    }
}

impl Cache {
    pub fn prefetch_enabled(&self) -> bool {
        self.prefetch.enabled.load(Ordering::Relaxed)
    }

    /// Whether a prefetch round is under way.
    #[cfg(any(test, feature = "test-util"))]
    pub(super) fn prefetch_running(&self) -> bool {
        !self
            .prefetch
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Turns prefetching on or off (on by default).
    pub fn set_prefetch(&self, on: bool) {
        self.prefetch.enabled.store(on, Ordering::Relaxed);
    }

    /// Stops every prefetch round under way (at its next file).
    #[cfg(any(test, feature = "test-util"))]
    pub fn cancel_prefetch(&self) {
        self.prefetch.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Prefetches the blobs `list` returns (run in the background) for directory `dir`,
    /// unless a round for it is under way.
    pub fn prefetch(
        self: &Arc<Self>,
        dir: u64,
        list: impl FnOnce() -> Vec<(u64, BlobRef)> + Send + 'static,
    ) {
        if !self.prefetch_enabled()
            || !self
                .prefetch
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(dir)
        {
            return;
        }
        let me = self.clone();
        // Async, so that a round waiting on its fills goes with the runtime at shutdown.
        self.rt.spawn(async move {
            if let Ok(list) = tokio::task::spawn_blocking(list).await {
                me.prefetch_round(list).await;
            }
            me.prefetch
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&dir);
        });
    }

    async fn prefetch_round(&self, list: Vec<(u64, BlobRef)>) {
        let generation = self.prefetch.generation.load(Ordering::SeqCst);
        let me = self.prefetch.rounds.fetch_add(1, Ordering::SeqCst);
        let superseded = || self.prefetch.rounds.load(Ordering::SeqCst) > me + NEWER_ROUNDS + 1;
        let mut in_flight = FuturesUnordered::new();
        let (mut bytes, mut files) = (0u64, 0usize);
        for (ino, blob) in list {
            if self.prefetch.generation.load(Ordering::SeqCst) != generation
                || files >= BUDGET_FILES
                || bytes + blob.size > BUDGET_BYTES
            {
                break;
            }
            if self.is_hydrated(&blob) || !self.room_without_eviction(blob.size) {
                continue;
            }
            let Ok(slot) = self.prefetch.slots.clone().acquire_owned().await else {
                break;
            };
            if superseded() {
                break;
            }
            match self.open_with(ino, &blob, super::Want::Prefetch) {
                Ok(Content::Filling(f)) => {
                    bytes += blob.size;
                    files += 1;
                    self.prefetch.files.fetch_add(1, Ordering::Relaxed);
                    self.prefetch
                        .unread
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(Self::key(&blob));
                    crate::metrics::get()
                        .prefetch
                        .get_or_create(&vec![("outcome", "issued")])
                        .inc();
                    // Its own task: the slot frees when the fill settles, even while this
                    // round waits for a slot.
                    in_flight.push(self.rt.spawn(async move {
                        f.settled().await;
                        drop(slot);
                    }));
                }
                Ok(Content::Whole(_)) => {}
                Err(e) => {
                    tracing::debug!("prefetch of {:?} stopped: {e}", blob.name);
                    break;
                }
            }
        }
        while in_flight.next().await.is_some() {}
    }
}
