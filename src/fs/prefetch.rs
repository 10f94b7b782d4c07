//! Which files to fetch ahead of their first read: a directory's other small files.
//!
//! Training jobs and Python imports read many small files of one directory one after
//! another; each would cost a round trip. The first read of a small file that is not cached
//! asks the cache to prefetch its siblings (`cache::prefetch` holds the budget and the
//! priority). Only files that fit `PREFETCH_MAX_FILE` are considered.

use super::SimFs;

/// Files up to this size count as small (and are prefetched with their directory).
pub const PREFETCH_MAX_FILE: u64 = 1 << 20;

impl SimFs {
    /// Starts fetching the small siblings of `ino`, just opened uncached at `size` bytes.
    pub(super) fn prefetch_siblings(&self, ino: u64, size: u64) {
        if size > PREFETCH_MAX_FILE || !self.cache.prefetch_enabled() {
            return;
        }
        let Ok(parent) = self.index.parent_of(ino) else {
            return;
        };
        let index = self.index.clone();
        self.cache.prefetch(parent, move || {
            // More than a round's budget: those already cached are skipped.
            index
                .small_blobs_in(parent, PREFETCH_MAX_FILE, 8 * crate::cache::PREFETCH_FILES)
                .unwrap_or_default()
                .into_iter()
                .filter(|(i, _)| *i != ino)
                .collect()
        });
    }
}
