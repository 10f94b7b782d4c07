//! The mount's levels for the metrics endpoint, read when Prometheus scrapes: cache use,
//! pending uploads and the uploads under way, index size and the last refresh. Each is read
//! from where it lives (the cache's counters, the journal, write-back, the index), so
//! nothing is kept twice.

use super::SimFs;
use crate::metrics::Levels;
use std::time::{SystemTime, UNIX_EPOCH};

impl SimFs {
    /// What the mount holds now. A figure that cannot be read (a busy index) is left at 0.
    pub fn levels(&self) -> Levels {
        let cache = self.cache.stats();
        let index = &self.index;
        let (pending_files, _) = index.pending().unwrap_or_default();
        let (_, pending_bytes) = index.pending_data(0).unwrap_or_default();
        let oldest = index
            .oldest_pending()
            .ok()
            .flatten()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let report = crate::refresh::last_report(index);
        let (uploads_in_flight, upload_window) = self
            .writeback
            .as_ref()
            .map_or((0, 0), |wb| wb.uploads_now());
        Levels {
            cache_used_bytes: cache.used,
            cache_limit_bytes: cache.capacity,
            fills_in_flight: self.cache.fills_in_flight() as u64,
            pending_files,
            pending_bytes,
            oldest_pending_seconds: oldest,
            uploads_in_flight,
            upload_window,
            index_entries: index.entry_count().unwrap_or(0),
            refresh_last_success_unix: report.as_ref().and_then(|r| {
                (r.started + r.took)
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64())
            }),
            refresh_last_seconds: report.map(|r| r.took.as_secs_f64()),
        }
    }
}
