//! Data writes held in memory between transactions.
//!
//! A transaction per `write(2)` would queue every writer of every file on the one writer
//! connection. Instead the first write to an inode after it was last recorded marks it
//! dirty and pending in a transaction (so a crash never forgets that the local copy holds
//! data the container lacks) and leaves an entry here; later writes only raise the entry's
//! size and mtime. A new file's create leaves one too (its row is born dirty and pending),
//! so a file created and written costs one transaction for the create and one for the close.
//! Reads overlay the entries, so stat sees every write at once.
//!
//! Invariants, which keep write-back's `gen` check exact:
//! - an entry exists only after the transaction that made its inode dirty and bumped `gen`
//!   (inserted under the gate, which every transaction holds);
//! - every transaction first persists the entries that took writes since (bumping `gen`
//!   again), so an upload that read the inode before those writes can never mark it clean;
//!   entries that took none are simply dropped;
//! - an entry that took no write has nothing to persist, so it asks for no transaction.
//!
//! A read looks at the row, then at the entries: a persist that commits and drops an entry
//! between the two would hide the write from both. `removals` counts the drops, and a read
//! that saw it move is repeated (`Index::overlaid`).

use crate::posix::{to_ns, Attr};
use rusqlite::{params, Transaction};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Write {
    pub size: u64,
    pub mtime: SystemTime,
    /// Writes since the entry's transaction (0: nothing to persist).
    pub writes: u64,
}

#[derive(Default)]
pub(super) struct Written {
    /// Held by every transaction, and while a first write inserts its entry.
    gate: Mutex<()>,
    map: RwLock<HashMap<u64, Write>>,
    /// Entries in `map`: reads skip the lock when there are none (the common case).
    len: AtomicUsize,
    /// Entries dropped so far; raised before `len` falls, so a read that sees `len` fall
    /// sees this move too.
    removals: AtomicU64,
}

impl Written {
    pub fn gate(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a write ending at `end` in an existing entry; false when there is none.
    pub fn update(&self, ino: u64, end: u64, now: SystemTime) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(&ino) {
            Some(w) => {
                w.size = w.size.max(end);
                w.mtime = now;
                w.writes += 1;
                true
            }
            None => false,
        }
    }

    /// A first write's transaction committed (call with the gate held).
    pub fn insert(&self, ino: u64, size: u64, mtime: SystemTime) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let w = Write {
            size,
            mtime,
            writes: 0,
        };
        if map.insert(ino, w).is_none() {
            self.len.fetch_add(1, Ordering::Release);
        }
    }

    /// The entries as they are now (call with the gate held).
    pub fn snapshot(&self) -> Vec<(u64, Write)> {
        if self.len.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(i, w)| (*i, *w)).collect()
    }

    /// Drops the entries of `snapshot` that took no write since it was taken.
    pub fn persisted(&self, snapshot: &[(u64, Write)]) {
        if snapshot.is_empty() {
            return;
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        for (ino, w) in snapshot {
            if map.get(ino) == Some(w) {
                map.remove(ino);
                self.removals.fetch_add(1, Ordering::SeqCst);
                self.len.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// How many entries were dropped so far (see `removals`).
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }

    /// Whether some entry took a write since its transaction.
    pub fn any_writes(&self) -> bool {
        if self.len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values().any(|w| w.writes > 0)
    }

    /// `a` with the size and times of writes not yet persisted.
    pub fn overlay(&self, mut a: Attr) -> Attr {
        if self.len.load(Ordering::SeqCst) == 0 {
            return a;
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = map.get(&a.ino) {
            a.size = w.size;
            a.mtime = w.mtime;
            a.ctime = w.mtime;
        }
        a
    }
}

/// Persists entry `w` of `ino`: nothing when it took no write since its transaction.
pub(super) fn persist(tx: &Transaction<'_>, ino: u64, w: &Write) -> rusqlite::Result<()> {
    if w.writes == 0 {
        return Ok(());
    }
    tx.prepare_cached(
        "UPDATE inodes SET size = ?2, mtime_ns = ?3, ctime_ns = ?3, dirty = 1, local = 1,
             gen = gen + 1, due_ns = CASE WHEN pending = 1 THEN due_ns ELSE ?3 END, pending = 1
         WHERE ino = ?1",
    )?
    .execute(params![ino as i64, w.size as i64, to_ns(w.mtime)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::memo::tests::{file, fresh_index};
    use super::super::Index;
    use std::time::Duration;

    fn committed_size(index: &Index, ino: u64) -> i64 {
        index
            .with_conn(|c| {
                Ok(c.query_row(
                    "SELECT size FROM inodes WHERE ino = ?1",
                    [ino as i64],
                    |r| r.get(0),
                )?)
            })
            .unwrap()
    }

    #[test]
    fn a_new_files_first_writes_stay_in_memory_until_the_next_transaction() {
        let (_dir, index, at) = fresh_index();
        let ino = file(&index, "new", at);
        assert!(!index.has_written(), "nothing written yet");
        let later = at + Duration::from_secs(1);
        index.wrote(ino, 4096, later, later).unwrap();
        assert_eq!(committed_size(&index, ino), 0, "no transaction for it");
        let a = index.getattr(ino).unwrap().unwrap();
        assert_eq!((a.size, a.mtime), (4096, later), "a stat sees it");
        assert!(index.has_written());
        index.persist_written().unwrap();
        assert_eq!(committed_size(&index, ino), 4096);
        assert!(!index.has_written());
    }

    #[test]
    fn a_new_file_not_yet_written_is_recorded_by_its_first_write_after_another_commit() {
        let (_dir, index, at) = fresh_index();
        let ino = file(&index, "first", at);
        // Another transaction drops the entry that took no write...
        file(&index, "second", at);
        assert!(index.written.snapshot().iter().all(|(i, _)| *i != ino));
        // ...so the first write commits, as for any file written after its last record.
        index.wrote(ino, 100, at, at).unwrap();
        assert_eq!(committed_size(&index, ino), 100);
    }
}
