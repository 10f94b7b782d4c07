//! Eviction: when clean cached files are deleted to make room, and by whom.
//!
//! A background thread keeps the clean cache under a high watermark (95% of `--cache-size`)
//! and the cache disk above its free-space floor (`--cache-min-free`), trimming down to a
//! low watermark (90%, or the floor plus a twentieth of the cache) each time either is
//! crossed. So the open that needs room finds it already made: it evicts itself only when
//! downloads outrun the thread, and then only the bytes it needs, because the bound is hard.
//! A writer the disk cannot take evicts clean files before it gets ENOSPC: a checkpoint
//! must never fail for room that a clean copy (fetchable again) is holding.
//!
//! Victims are the least recently used clean files whose inode no one has open; local copies
//! (data not yet uploaded) are never tracked here. The LRU's lock covers bookkeeping only:
//! files are unlinked after it is released, so eviction never holds up stat, readdir or a
//! read of another cached file. Staging and prefetching plan against the high watermark,
//! so what they just fetched is not what the thread trims next.

use super::Cache;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the thread looks without being woken (the disk may fill from elsewhere).
const PERIOD: Duration = Duration::from_secs(1);

/// The clean cache's limits, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Marks {
    /// The hard bound (`--cache-size`); None: only the disk bounds the cache.
    pub capacity: Option<u64>,
    /// Crossing it wakes the trim; staging and prefetch stay under it.
    pub high: Option<u64>,
    /// What a trim brings the cache down to.
    pub low: Option<u64>,
    /// Free bytes (above the writers' reserve) the clean cache leaves on the disk.
    pub floor: u64,
    /// What a trim for the floor brings the free space up to.
    pub floor_target: u64,
}

impl Marks {
    pub fn new(capacity: Option<u64>, floor: u64, disk: u64) -> Marks {
        let slack = capacity.unwrap_or(disk) / 20;
        Marks {
            capacity,
            high: capacity.map(|c| c - c / 20),
            low: capacity.map(|c| c - c / 10),
            floor,
            floor_target: floor.saturating_add(slack),
        }
    }

    /// Bytes to evict when the cache holds `used` (fills under way included) and the disk has
    /// `free`: none until a mark is crossed, then down to the low marks.
    pub fn excess(&self, used: u64, free: u64) -> u64 {
        let over = self.high.is_some_and(|h| used > h);
        if !over && free >= self.floor {
            return 0;
        }
        let for_bound = self.low.map_or(0, |l| used.saturating_sub(l));
        let for_floor = if free < self.floor {
            self.floor_target - free
        } else {
            0
        };
        for_bound.max(for_floor)
    }
}

/// The background thread's doorbell; dropping it (with the cache) stops the thread.
pub(super) struct Evictor {
    wake: SyncSender<()>,
}

impl Evictor {
    /// Starts the thread for `cache`; it holds the cache only while it trims.
    pub fn start(cache: Weak<Cache>) -> std::io::Result<Evictor> {
        let (wake, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("simfs-evict".into())
            .spawn(move || run(cache, rx))?;
        Ok(Evictor { wake })
    }

    /// Asks for a look soon (a fill finished); wakes already pending coalesce.
    pub fn nudge(&self) {
        let _ = self.wake.try_send(());
    }
}

fn run(cache: Weak<Cache>, wake: Receiver<()>) {
    loop {
        if let Err(RecvTimeoutError::Disconnected) = wake.recv_timeout(PERIOD) {
            return;
        }
        let Some(cache) = cache.upgrade() else { return };
        if let Err(e) = cache.trim() {
            tracing::warn!("cache eviction: {e}");
        }
    }
}

impl Cache {
    /// Starts background eviction (once the cache is shared).
    pub fn start_evictor(self: &Arc<Self>) -> std::io::Result<()> {
        let evictor = Evictor::start(Arc::downgrade(self))?;
        let _ = self.evictor.set(evictor);
        Ok(())
    }

    pub(super) fn nudge_evictor(&self) {
        if let Some(e) = self.evictor.get() {
            e.nudge();
        }
    }

    fn used_with_fills(&self) -> u64 {
        self.lru.bytes() + self.reserved.load(Ordering::Relaxed)
    }

    /// One look of the background thread: evicts down to the low marks once one is crossed.
    pub(super) fn trim(&self) -> std::io::Result<()> {
        let (free, _) = self.space.free()?;
        let excess = self.marks.excess(self.used_with_fills(), free);
        if excess > 0 {
            let freed = self.evict_lru(excess);
            tracing::debug!("evicted {freed} bytes in the background");
        }
        Ok(())
    }

    /// Evicts, in the open that needs it, what the thread has not: until `need` more bytes fit
    /// under the bound and on the disk. A file larger than the bound still hydrates
    /// (everything evictable goes first); the disk, not the bound, is the hard limit.
    pub(super) fn make_room(&self, need: u64) -> std::io::Result<()> {
        let over_cap = self
            .marks
            .capacity
            .map_or(0, |cap| (self.used_with_fills() + need).saturating_sub(cap));
        let (free, _) = self.space.free()?;
        let excess = over_cap.max(need.saturating_sub(free));
        if excess > 0 {
            self.evict_lru(excess);
        }
        self.nudge_evictor();
        Ok(())
    }

    /// Whether `need` bytes fit under the high watermark and on the disk without evicting:
    /// what staging and prefetch may use.
    pub(super) fn room_without_eviction(&self, need: u64) -> bool {
        let under = self
            .marks
            .high
            .is_none_or(|h| self.used_with_fills() + need <= h);
        under
            && self
                .space
                .free()
                .is_ok_and(|(free, _)| need + self.marks.floor <= free)
    }

    /// Deletes least recently used clean files no one has open until `bytes` are freed (or
    /// nothing evictable is left); returns the bytes freed.
    pub(super) fn evict_lru(&self, bytes: u64) -> u64 {
        let victims = self.lru.take_victims(bytes, |ino| self.pins.is_open(ino));
        let mut freed = 0;
        for (key, size) in victims {
            self.present.invalidate(&key);
            match std::fs::remove_file(self.data_dir.join(&key)) {
                Ok(()) => {
                    freed += size;
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    self.evicted_bytes.fetch_add(size, Ordering::Relaxed);
                    let m = crate::metrics::get();
                    m.cache_evictions.inc();
                    m.cache_evicted_bytes.inc_by(size);
                    if self.prefetch.forget(&key) {
                        m.prefetch.get_or_create(&vec![("outcome", "wasted")]).inc();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("evicting {key} from the cache: {e}"),
            }
        }
        self.space.forget();
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::Marks;

    #[test]
    fn nothing_is_evicted_until_a_mark_is_crossed_then_down_to_the_low_marks() {
        let m = Marks::new(Some(1000), 100, 10_000);
        assert_eq!((m.high, m.low), (Some(950), Some(900)));
        assert_eq!(m.excess(950, 5000), 0, "at the high mark, not over it");
        assert_eq!(m.excess(951, 5000), 51);
        // The disk under its floor: up to the floor plus a twentieth of the cache.
        assert_eq!(m.excess(500, 99), 150 - 99);
        assert_eq!(m.excess(500, 100), 0);
        // Both crossed: the larger of the two.
        assert_eq!(m.excess(1000, 0), 150);
        let unbounded = Marks::new(None, 0, 10_000);
        assert_eq!(unbounded.excess(u64::MAX / 2, 0), 0);
        assert_eq!(Marks::new(None, 10, 10_000).excess(0, 0), 510);
    }
}
