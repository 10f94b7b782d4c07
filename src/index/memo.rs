//! The index's hot rows in memory: attributes by inode, and directory entries by parent and
//! name, in front of SQLite.
//!
//! The kernel asks again for what it knew once: its entry or attribute timeout ran out, a
//! read invalidated the atime (every `stat` after a read is a GETATTR), or it reclaimed its
//! dentries. Those answers come from here without a query; a miss reads SQLite and keeps the
//! row. Rows are kept as committed; the data writes held in memory (`written.rs`) are
//! overlaid on them like on every read.
//!
//! Every change goes through the one writer connection, which reports the rows it changes:
//! `inodes` rows through SQLite's update hook, `dentries` rows (a WITHOUT ROWID table, which
//! the hook skips) through temporary triggers that call back into Rust. After each commit
//! those rows are read again on the writer connection and kept as they now stand (a few
//! rows, from the writer's warm pages: while files are written every commit touches the
//! directory they are in, and a reader's own query would find its pages dropped by the
//! commit and read them again from the WAL); a large transaction's rows are dropped.
//!
//! The tricky case is a reader that read SQLite just before a commit and keeps its (now old)
//! row just after the commit dropped it. So a commit first raises `gen` and then drops or
//! replaces its rows, and a reader notes `gen` before its query and keeps the row only if
//! `gen` has not moved since. The rows a commit puts back are read while the writer is
//! still held, so no later commit can have changed them. The check and the insert happen
//! under a lock (one of `STRIPES`, by key) that the drop of that key takes too: either the
//! reader sees the raise, or the commit's drop comes after the reader's insert. Without the
//! lock another reader could get the old row in the moment between an insert and a check
//! that takes it back.
//!
//! Both maps are bounded (moka's policy, TinyLFU, picks the rows that go); a row not kept is
//! only a query.

use crate::posix::Attr;
use moka::sync::Cache;
use rusqlite::functions::FunctionFlags;
use rusqlite::Connection;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Rows kept in each map: a tree's hot set, not all of it. Each row costs about 365 bytes
/// with moka's bookkeeping (measured: 48 MB of RSS for 65,536 in both maps), so about
/// 12 MB per map when full.
const ROWS: u64 = 32_768;

/// A transaction that changed at most this many rows has them read again and kept; a larger
/// one (a refresh, a subtree renamed) has them dropped, as reading them all would cost the
/// writer more than the readers save.
const REFILL: usize = 16;

/// Locks that order a reader's keep against a commit's drop of the same key.
const STRIPES: usize = 64;

type EntryKey = (u64, Box<[u8]>);

/// Rows the open transaction changed.
#[derive(Default)]
struct Changed {
    inodes: Vec<u64>,
    entries: Vec<EntryKey>,
}

pub(super) struct Memo {
    attrs: Cache<u64, Attr>,
    entries: Cache<EntryKey, u64>,
    /// Raised by every commit before it drops its rows.
    gen: AtomicU64,
    stripes: [Mutex<()>; STRIPES],
    changed: Arc<Mutex<Changed>>,
}

/// A reader's note of `gen`, taken before its query.
#[derive(Clone, Copy)]
pub(super) struct Seen(u64);

impl Default for Memo {
    fn default() -> Self {
        Memo {
            attrs: Cache::new(ROWS),
            entries: Cache::new(ROWS),
            gen: AtomicU64::new(0),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            changed: Arc::default(),
        }
    }
}

impl Memo {
    /// The lock for key `k` (an inode, or a parent and name hashed).
    fn stripe(&self, k: impl std::hash::Hash) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h =
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(k);
        self.stripes[h as usize % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) -> std::sync::MutexGuard<'_, Changed> {
        self.changed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the writer connection `c` report the `dentries` rows it changes (the update
    /// hook, installed by the caller, reports `inodes` rows through `recorder`).
    pub(super) fn install(&self, c: &Connection) -> rusqlite::Result<()> {
        let changed = self.changed.clone();
        c.create_scalar_function(
            "simfs_entry_changed",
            2,
            FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DIRECTONLY,
            move |ctx| {
                let parent: i64 = ctx.get(0)?;
                let name: Vec<u8> = ctx.get(1)?;
                changed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entries
                    .push((parent as u64, name.into_boxed_slice()));
                Ok(rusqlite::types::Null)
            },
        )?;
        c.execute_batch(
            "CREATE TEMP TRIGGER IF NOT EXISTS memo_entry_insert AFTER INSERT ON dentries
             BEGIN SELECT simfs_entry_changed(NEW.parent, NEW.name); END;
             CREATE TEMP TRIGGER IF NOT EXISTS memo_entry_delete AFTER DELETE ON dentries
             BEGIN SELECT simfs_entry_changed(OLD.parent, OLD.name); END;
             CREATE TEMP TRIGGER IF NOT EXISTS memo_entry_update AFTER UPDATE ON dentries
             BEGIN SELECT simfs_entry_changed(OLD.parent, OLD.name);
                   SELECT simfs_entry_changed(NEW.parent, NEW.name); END;",
        )
    }

    /// What records an `inodes` row the writer connection changed (its update hook calls it).
    pub(super) fn recorder(&self) -> impl Fn(u64) + Send + 'static {
        let changed = self.changed.clone();
        move |ino| {
            changed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .inodes
                .push(ino)
        }
    }

    /// A transaction ended (committed or not) on the writer connection `now`, which the
    /// caller still holds: its rows are kept as they now stand, or leave memory.
    pub(super) fn ended(&self, now: &Connection) {
        let Changed {
            mut inodes,
            mut entries,
        } = std::mem::take(&mut *self.changed());
        if inodes.is_empty() && entries.is_empty() {
            return;
        }
        inodes.sort_unstable();
        inodes.dedup();
        entries.sort_unstable();
        entries.dedup();
        // A row that cannot be read is dropped, like one that is gone.
        let refill = inodes.len() + entries.len() <= REFILL;
        let attrs: Vec<(u64, Option<Attr>)> = inodes
            .into_iter()
            .map(|ino| {
                let a = refill.then(|| super::attr_of(now, ino).ok().flatten());
                (ino, a.flatten())
            })
            .collect();
        let names: Vec<(EntryKey, Option<u64>)> = entries
            .into_iter()
            .map(|key| {
                let ino = refill.then(|| entry_ino(now, &key).ok().flatten());
                (key, ino.flatten())
            })
            .collect();
        self.gen.fetch_add(1, Ordering::SeqCst);
        for (ino, a) in attrs {
            let _order = self.stripe(ino);
            match a {
                Some(a) => self.attrs.insert(ino, a),
                None => self.attrs.invalidate(&ino),
            }
        }
        for (key, ino) in names {
            let _order = self.stripe(&key);
            match ino {
                Some(ino) => self.entries.insert(key, ino),
                None => self.entries.invalidate(&key),
            }
        }
    }

    /// Called before a query whose result may be kept.
    pub(super) fn seen(&self) -> Seen {
        Seen(self.gen.load(Ordering::SeqCst))
    }

    pub(super) fn attr(&self, ino: u64) -> Option<Attr> {
        self.attrs.get(&ino)
    }

    /// The inode `name` in `parent` names, when kept.
    pub(super) fn entry(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.entries.get(&(parent, Box::from(name)))
    }

    /// Keeps `a`, read from SQLite after `seen`.
    pub(super) fn keep_attr(&self, seen: Seen, a: &Attr) {
        let _order = self.stripe(a.ino);
        if self.gen.load(Ordering::SeqCst) == seen.0 {
            self.attrs.insert(a.ino, a.clone());
        }
    }

    /// Keeps the entry `name` in `parent` for inode `a` (and `a`), read after `seen`.
    pub(super) fn keep_entry(&self, seen: Seen, parent: u64, name: &[u8], a: &Attr) {
        self.keep_attr(seen, a);
        let key: EntryKey = (parent, Box::from(name));
        let _order = self.stripe(&key);
        if self.gen.load(Ordering::SeqCst) == seen.0 {
            self.entries.insert(key, a.ino);
        }
    }
}

/// The inode `key`'s name leads to, as committed on `c`.
fn entry_ino(c: &Connection, key: &EntryKey) -> rusqlite::Result<Option<u64>> {
    use rusqlite::OptionalExtension;
    c.prepare_cached("SELECT ino FROM dentries WHERE parent = ?1 AND name = ?2")?
        .query_row(rusqlite::params![key.0 as i64, &key.1[..]], |r| {
            r.get::<_, i64>(0)
        })
        .optional()
        .map(|ino| ino.map(|i| i as u64))
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::build::{Defaults, TreeBuilder};
    use super::super::names::Name;
    use super::super::write::NewNode;
    use super::super::{Index, SourceId, ROOT_INO};
    use crate::posix::Kind;
    use std::time::{Duration, SystemTime};

    pub(in crate::index) fn empty_index(dir: &std::path::Path) -> Index {
        let path = dir.join("index.db");
        let defaults = Defaults {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
        };
        let source = SourceId {
            container_url: "mem://memo".into(),
            prefix: String::new(),
        };
        TreeBuilder::create(&path, defaults)
            .unwrap()
            .write(&path, &source)
            .unwrap();
        Index::open_existing(&path, &source).unwrap().unwrap()
    }

    /// An empty index in a temporary directory (kept alive with it), and a fixed time.
    pub(in crate::index) fn fresh_index() -> (tempfile::TempDir, Index, SystemTime) {
        let dir = tempfile::tempdir().unwrap();
        let index = empty_index(dir.path());
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        (dir, index, at)
    }

    pub(in crate::index) fn file(index: &Index, name: &str, at: SystemTime) -> u64 {
        let node = NewNode {
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            target: None,
            rdev: 0,
        };
        let name = Name::new(name.as_bytes()).unwrap();
        index
            .create(ROOT_INO, &name, &node, at, at, |_| {})
            .unwrap()
            .ino
    }

    #[test]
    fn a_small_commit_leaves_its_rows_in_memory_as_they_now_stand() {
        let (_dir, index, at) = fresh_index();
        let ino = file(&index, "new", at);
        let root = index
            .memo
            .attr(ROOT_INO)
            .expect("the directory's row is kept");
        assert_eq!(root.mtime, at, "kept with the create's mtime");
        assert_eq!(index.memo.attr(ino).map(|a| a.ino), Some(ino));
        assert_eq!(index.memo.entry(ROOT_INO, b"new"), Some(ino));
        // What memory holds is what SQLite answers.
        let c = index.connect().unwrap();
        assert_eq!(super::super::attr_of(&c, ROOT_INO).unwrap(), Some(root));
    }

    #[test]
    fn a_large_commit_drops_its_rows_and_readers_read_them_again() {
        let (_dir, index, at) = fresh_index();
        let inos: Vec<u64> = (0..super::REFILL + 1)
            .map(|i| file(&index, &format!("f{i}"), at))
            .collect();
        assert!(inos.iter().all(|&i| index.memo.attr(i).is_some()));
        index
            .write(|tx| Ok(tx.execute("UPDATE inodes SET perm = 384 WHERE kind = 2", [])?))
            .unwrap();
        assert!(inos.iter().all(|&i| index.memo.attr(i).is_none()));
        assert_eq!(index.getattr(inos[0]).unwrap().unwrap().perm, 0o600);
    }
}
