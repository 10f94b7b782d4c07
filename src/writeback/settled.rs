//! What the last upload of a file written in place committed, by checksum.
//!
//! A writer in place (`fs::in_place`) is found by looking, and each look (an fsync, then the
//! close's flush and release) takes its writes in again: nothing tells a write made since
//! the last look from one already committed, as a write within the same clock tick leaves the
//! mtime as it was. So a file fsynced and then closed was marked written once or twice more
//! and went up again whole, and renamed into place after that (git's packs, `.idx` and
//! `.rev`, pip's RECORD), once more under its new name instead of being copied there.
//!
//! So an upload of such a file keeps the CRC64 of each part of the body it committed (the
//! one PUT, or each block of a committed block list, from the very bytes the service got),
//! with the blob and the ETag it got. The inode's next upload takes the entry; if the local
//! copy still has those parts and the claimed blob is still that version, it sends no data:
//! the file is treated as unchanged (its metadata updated in place, or the blob copied to a
//! new name; nothing at all when the metadata is what that upload committed too, so a file
//! fsynced and then closed keeps the version its fsync made, which other nodes may already
//! be reading), and the entry is kept for the upload after, with the new ETag. A write racing
//! the check is found by the next look, as before, and uploaded.
//!
//! In memory only (a remount uploads as before); one entry per inode, taken by its next
//! upload, at most `MOST` entries and `MOST_PARTS` parts (16 MiB) in all. The check reads
//! the whole local copy, a part at a time, in the upload's own thread: for a large file that
//! is far cheaper than sending it again.

use crate::blob::upload::{open_local_copy, range_has};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// Entries kept at most, and their parts in all (16 bytes each): each is an upload that
/// may be saved, not a need.
const MOST: usize = 4096;
const MOST_PARTS: usize = 1 << 20;

/// The parts of a committed body, in order: each one's length and CRC64.
pub(super) type Parts = Vec<(u64, u64)>;

/// One upload's committed body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Committed {
    pub(super) blob: String,
    pub(super) etag: String,
    pub(super) parts: Parts,
    /// The metadata committed with it: the same again needs no request at all.
    pub(super) meta: crate::blob::Metadata,
}

impl Committed {
    /// The committed body's length.
    pub(super) fn len(&self) -> u64 {
        self.parts.iter().map(|(l, _)| l).sum()
    }

    /// Whether the container's `blob` (name, ETag) is this version and the local copy at
    /// `path` holds the very bytes it committed.
    pub(super) fn holds(&self, blob: &(String, String), path: &Path) -> bool {
        if (&self.blob, &self.etag) != (&blob.0, &blob.1) {
            return false;
        }
        let Ok(file) = open_local_copy(path) else {
            return false;
        };
        if file.metadata().map(|m| m.len()).ok() != Some(self.len()) {
            return false;
        }
        let mut off = 0;
        self.parts.iter().all(|&(len, sum)| {
            let same = range_has(&file, off, len, sum);
            off += len;
            same
        })
    }
}

#[derive(Default)]
pub(super) struct Settled(Mutex<Kept>);

#[derive(Default)]
struct Kept {
    map: HashMap<u64, Committed>,
    /// The parts of all the entries.
    parts: usize,
}

impl Settled {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ino`'s entry, which leaves the map: an upload of `ino` is starting.
    pub(super) fn take(&self, ino: u64) -> Option<Committed> {
        let mut kept = self.kept();
        let c = kept.map.remove(&ino)?;
        kept.parts -= c.parts.len();
        Some(c)
    }

    /// Keeps `c` as `ino`'s entry, unless the bounds are reached (then `ino` has none).
    pub(super) fn keep(&self, ino: u64, c: Committed) {
        let mut kept = self.kept();
        if let Some(old) = kept.map.remove(&ino) {
            kept.parts -= old.parts.len();
        }
        if kept.map.len() < MOST && kept.parts + c.parts.len() <= MOST_PARTS {
            kept.parts += c.parts.len();
            kept.map.insert(ino, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::upload::crc64;

    #[test]
    fn a_copy_holds_what_was_committed_only_with_the_same_bytes_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"committed").unwrap();
        let c = Committed {
            blob: "a/f".into(),
            etag: "\"1\"".into(),
            parts: vec![(4, crc64(b"comm")), (5, crc64(b"itted"))],
            meta: Default::default(),
        };
        let blob = |e: &str| ("a/f".to_string(), e.to_string());
        assert!(c.holds(&blob("\"1\""), &path));
        assert!(!c.holds(&blob("\"2\""), &path), "another version");
        assert!(
            !c.holds(&("a/g".into(), "\"1\"".into()), &path),
            "another blob"
        );
        std::fs::write(&path, b"Committed").unwrap();
        assert!(
            !c.holds(&blob("\"1\""), &path),
            "a byte of the first part changed"
        );
        std::fs::write(&path, b"committeD").unwrap();
        assert!(
            !c.holds(&blob("\"1\""), &path),
            "a byte of the last part changed"
        );
        std::fs::write(&path, b"committed!").unwrap();
        assert!(!c.holds(&blob("\"1\""), &path), "longer");
        std::fs::remove_file(&path).unwrap();
        assert!(!c.holds(&blob("\"1\""), &path), "gone");
    }

    #[test]
    fn an_entry_is_taken_once_and_the_map_is_bounded() {
        let s = Settled::default();
        let c = |n: u64| Committed {
            blob: format!("b{n}"),
            etag: "e".into(),
            parts: Vec::new(),
            meta: Default::default(),
        };
        for n in 0..MOST as u64 + 10 {
            s.keep(n, c(n));
        }
        assert_eq!(s.kept().map.len(), MOST);
        assert_eq!(s.take(0), Some(c(0)));
        assert_eq!(s.take(0), None);
        // The parts are bounded too: a file of many blocks is kept only while they fit.
        let s = Settled::default();
        let blocks = |n: u64, count: usize| Committed {
            parts: vec![(8 << 20, 0); count],
            meta: Default::default(),
            ..c(n)
        };
        s.keep(1, blocks(1, MOST_PARTS - 10));
        s.keep(2, blocks(2, 11));
        assert_eq!(s.take(2), None, "over the bound: not kept");
        s.keep(2, blocks(2, 10));
        assert_eq!(s.take(1), Some(blocks(1, MOST_PARTS - 10)));
        s.keep(3, blocks(3, MOST_PARTS - 10));
        assert_eq!(s.kept().parts, MOST_PARTS, "taken parts are freed");
    }
}
