//! The SQLite index: every inode, directory entry and attribute of the mounted tree.
//!
//! The index is the filesystem's metadata: lookup, getattr, readdir and readlink read it and
//! nothing else. It lives on the cache disk in WAL mode so readers never wait for the writer.
//! Inode numbers are SQLite rowids, persisted, so they are stable across remounts of the same
//! index. Directory entries are a table of their own (`dentries`), separate from `inodes`, so
//! that one inode can have several names (hardlinks) without a schema change.
//!
//! `meta` records which container and prefix the index describes and whether its listing
//! completed; an index for another source, or an unfinished one, is never reused.
//!
//! The index is also the write-back journal. Every local change marks the inode `pending`
//! (its container side differs) in the same transaction that makes the change, so a crash at
//! any point leaves a record of what is still to upload; `gen` counts changes so an upload that
//! raced with a newer change leaves the inode pending. Reads go through a pool of read-only
//! connections, writes through one writer connection; WAL lets them run side by side.
//! Inode numbers come from AUTOINCREMENT so a deleted inode's number is never handed out
//! again while the kernel may still know it.
//!
//! Data writes are the one change not made a transaction at a time (`written.rs`): the first
//! write to a clean inode marks it dirty in a transaction before it returns (the crash
//! guarantee), later ones only update its size and mtime in memory, which every read here
//! overlays and the next transaction of any kind persists. `totals` keeps the file count and
//! byte sum up to date by triggers, so `statfs` reads one row. Lookups and getattrs are
//! answered from hot rows kept in memory when they can be (`memo.rs`); every commit puts
//! back the rows it changed as they now stand (a few) or drops them (many).
//!
//! Every connection goes through `vfs.rs`, which writes each commit's log frames with one
//! call instead of two per changed page.

pub mod build;
mod checkpoint;
pub mod ingest;
pub mod journal;
mod memo;
pub mod names;
pub mod refresh;
mod riders;
pub mod snapshot;
mod vfs;
pub mod write;
mod written;

use crate::blob::BlobRef;
use crate::posix::{from_ns, Attr, Kind};
use memo::Memo;
use names::Name;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};
use std::time::Duration;
use written::Written;

pub const ROOT_INO: u64 = 1;

/// The page size of a new index. Every commit appends each page it changed to the log
/// whole, and a create, a close or a rename changes about seven pages (the row, the
/// indexes it is in, the directory's row, the totals): at SQLite's default of 4 KiB that
/// was some 28 KiB copied and checksummed per commit, most of a small file's cost in the
/// daemon. At 1 KiB (core probe of 3,000 small files created, written, closed and renamed,
/// one CPU) a close's transaction took 38 to 48 us against 75 to 91, a rename's 54 to 59
/// against 81 to 97; indexing a listing of 300,000 blobs took about 25 % longer (2.1
/// against 1.6 s, hidden behind the listing's own round trips on a real service), serving
/// lookups as long. Keys longer than about 230 bytes (a blob path that long) spill to an
/// overflow page. An index keeps the page size it was built with.
const PAGE_SIZE: i64 = 1024;
/// How much log the writer lets grow before it copies it back and starts it over (SQLite
/// counts in pages). A thread copies most of it before that (`checkpoint.rs`).
const CHECKPOINT_BYTES: i64 = 4 << 20;
const SCHEMA_VERSION: &str = "2";
/// Prepared statements kept per connection. rusqlite keeps 16 by default, fewer than the
/// distinct statements one close or upload runs: past it every statement was parsed again
/// (SQLite's parser showed in a profile of `pip install`).
const STATEMENTS: usize = 256;
/// The SQLite encoding of a kind.
fn kind_code(k: Kind) -> i64 {
    match k {
        Kind::Dir => 1,
        Kind::File => 2,
        Kind::Symlink => 3,
        Kind::Fifo => 4,
        Kind::Socket => 5,
        Kind::CharDevice => 6,
        Kind::BlockDevice => 7,
    }
}

fn kind_from_code(v: i64) -> rusqlite::Result<Kind> {
    match v {
        1 => Ok(Kind::Dir),
        2 => Ok(Kind::File),
        3 => Ok(Kind::Symlink),
        4 => Ok(Kind::Fifo),
        5 => Ok(Kind::Socket),
        6 => Ok(Kind::CharDevice),
        7 => Ok(Kind::BlockDevice),
        _ => Err(rusqlite::Error::IntegralValueOutOfRange(0, v)),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Name,
    pub attr: Attr,
}

/// Something `simfs check` reports about a blob: hidden from the tree, or shown with some of
/// its metadata ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub blob: String,
    pub hidden: bool,
    pub reason: String,
}

/// A namespace change refused for a POSIX reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("invalid argument")]
    Invalid,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("too many links")]
    TooManyLinks,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("index database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("index file: {0}")]
    Io(#[from] std::io::Error),
    #[error("index is inconsistent: {0}")]
    Corrupt(String),
}

impl IndexError {
    /// The database could not grow: the cache disk is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            IndexError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::DiskFull
            }
            IndexError::Io(e) => e.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

pub type IndexResult<T> = Result<T, IndexError>;

/// Identity of the source an index describes; an index is reused only for the same one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceId {
    pub container_url: String,
    pub prefix: String,
}

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inodes(
    ino      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     INTEGER NOT NULL,
    perm     INTEGER NOT NULL,
    uid      INTEGER NOT NULL,
    gid      INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    atime_ns INTEGER,
    nlink    INTEGER NOT NULL,
    rdev     INTEGER NOT NULL DEFAULT 0,
    blob     TEXT,
    etag     TEXT,
    md5      BLOB,
    target   BLOB,
    link_id  TEXT,
    local    INTEGER NOT NULL DEFAULT 0,
    dirty    INTEGER NOT NULL DEFAULT 0,
    pending  INTEGER NOT NULL DEFAULT 0,
    due_ns   INTEGER NOT NULL DEFAULT 0,
    gen      INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX inodes_by_blob ON inodes(blob) WHERE blob IS NOT NULL;
CREATE INDEX inodes_pending ON inodes(due_ns) WHERE pending = 1;
CREATE INDEX inodes_local ON inodes(ino) WHERE local = 1;
CREATE TABLE stubs(blob TEXT PRIMARY KEY, ino INTEGER NOT NULL, etag TEXT NOT NULL);
CREATE INDEX stubs_by_ino ON stubs(ino);
CREATE TABLE trash(blob TEXT PRIMARY KEY, etag TEXT NOT NULL);
CREATE TABLE intents(blob TEXT PRIMARY KEY, ino INTEGER NOT NULL);
CREATE TABLE dentries(
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    ino    INTEGER NOT NULL,
    PRIMARY KEY(parent, name)
) WITHOUT ROWID;
CREATE INDEX dentries_by_ino ON dentries(ino);
CREATE TABLE findings(blob TEXT NOT NULL, hidden INTEGER NOT NULL, reason TEXT NOT NULL);
";

/// Running totals for statfs, kept by triggers (added to indexes built before them, too).
const TOTALS: &str = "
CREATE TABLE IF NOT EXISTS totals(files INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO totals SELECT * FROM (
    SELECT count(*), coalesce(sum(CASE WHEN kind = 2 THEN size END), 0) FROM inodes
    WHERE nlink > 0) WHERE NOT EXISTS (SELECT 1 FROM totals);
CREATE TRIGGER IF NOT EXISTS totals_insert AFTER INSERT ON inodes BEGIN
    UPDATE totals SET files = files + (NEW.nlink > 0),
        bytes = bytes + CASE WHEN NEW.kind = 2 AND NEW.nlink > 0 THEN NEW.size ELSE 0 END;
END;
CREATE TRIGGER IF NOT EXISTS totals_delete AFTER DELETE ON inodes BEGIN
    UPDATE totals SET files = files - (OLD.nlink > 0),
        bytes = bytes - CASE WHEN OLD.kind = 2 AND OLD.nlink > 0 THEN OLD.size ELSE 0 END;
END;
CREATE TRIGGER IF NOT EXISTS totals_update AFTER UPDATE OF size, nlink ON inodes
WHEN OLD.size != NEW.size OR OLD.nlink != NEW.nlink BEGIN
    UPDATE totals SET files = files - (OLD.nlink > 0) + (NEW.nlink > 0),
        bytes = bytes - CASE WHEN OLD.kind = 2 AND OLD.nlink > 0 THEN OLD.size ELSE 0 END
                      + CASE WHEN NEW.kind = 2 AND NEW.nlink > 0 THEN NEW.size ELSE 0 END;
END;
";

const ATTR_COLS: &str = "i.ino, i.kind, i.perm, i.uid, i.gid, i.size, i.mtime_ns, i.ctime_ns,
     i.nlink, coalesce(i.atime_ns, i.mtime_ns), i.rdev";
/// Number of columns in `ATTR_COLS`.
const ATTR_N: usize = 11;

fn row_attr(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Attr> {
    Ok(Attr {
        ino: row.get::<_, i64>(at)? as u64,
        kind: kind_from_code(row.get(at + 1)?)?,
        perm: row.get::<_, i64>(at + 2)? as u32,
        uid: row.get::<_, i64>(at + 3)? as u32,
        gid: row.get::<_, i64>(at + 4)? as u32,
        size: row.get::<_, i64>(at + 5)? as u64,
        mtime: from_ns(row.get(at + 6)?),
        ctime: from_ns(row.get(at + 7)?),
        nlink: row.get::<_, i64>(at + 8)? as u32,
        atime: from_ns(row.get(at + 9)?),
        rdev: row.get::<_, i64>(at + 10)? as u32,
    })
}

/// Attributes of `ino` (on a pooled reader or inside a transaction alike).
pub(crate) fn attr_of(c: &Connection, ino: u64) -> IndexResult<Option<Attr>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {ATTR_COLS} FROM inodes i WHERE i.ino = ?1"
    ))?;
    Ok(st.query_row([ino as i64], |r| row_attr(r, 0)).optional()?)
}

/// Attributes of the inode named `name` in directory `parent`.
pub(crate) fn entry_of(c: &Connection, parent: u64, name: &Name) -> IndexResult<Option<Attr>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {ATTR_COLS} FROM dentries d JOIN inodes i ON i.ino = d.ino
         WHERE d.parent = ?1 AND d.name = ?2"
    ))?;
    Ok(st
        .query_row(params![parent as i64, name.as_bytes()], |r| row_attr(r, 0))
        .optional()?)
}

/// The value of `key` in the `meta` table of the index open on `c`.
pub(crate) fn meta_value(c: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

/// The names from the root to `ino` (through one of its names); None when it has none.
pub(crate) fn path_parts(c: &Connection, ino: u64) -> IndexResult<Option<Vec<Vec<u8>>>> {
    let mut st = c.prepare_cached("SELECT parent, name FROM dentries WHERE ino = ?1 LIMIT 1")?;
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut cur = ino;
    while cur != ROOT_INO {
        let Some((p, n)) = st
            .query_row([cur as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()?
        else {
            return Ok(None);
        };
        parts.push(n);
        cur = p as u64;
        if parts.len() > 4096 {
            return Err(IndexError::Corrupt(format!("directory loop above {ino}")));
        }
    }
    parts.reverse();
    Ok(Some(parts))
}

/// A complete index, shared by all FUSE threads: reads through a pool of read-only
/// connections, changes through the one writer connection.
pub struct Index {
    path: PathBuf,
    pool: crossbeam::queue::ArrayQueue<Connection>,
    writer: std::sync::Mutex<Option<Connection>>,
    /// Transactions waiting for the writer connection: point reads leave it to them.
    writers_waiting: std::sync::atomic::AtomicUsize,
    /// Data writes not yet persisted (see `written.rs`).
    written: Written,
    /// Inodes changed since a refresh began (see `refresh/`).
    watch: refresh::Watch,
    /// Hot rows in memory (see `memo.rs`).
    memo: Memo,
    /// Work waiting to be done by the next transaction (see `riders.rs`).
    riders: riders::Riders,
    /// Copies the log back into the index file (see `checkpoint.rs`).
    checkpoints: checkpoint::Checkpointer,
}

impl Index {
    /// Opens a complete index for `source`; None when there is none, it is unfinished or it
    /// describes another source.
    pub fn open_existing(path: &Path, source: &SourceId) -> IndexResult<Option<Index>> {
        if !path.exists() {
            return Ok(None);
        }
        let index = Index {
            path: path.to_path_buf(),
            pool: crossbeam::queue::ArrayQueue::new(32),
            writer: std::sync::Mutex::new(None),
            writers_waiting: Default::default(),
            written: Written::default(),
            watch: refresh::Watch::default(),
            memo: Memo::default(),
            riders: Default::default(),
            checkpoints: Default::default(),
        };
        let ok = index.with_conn(|c| {
            let get = |k: &str| meta_value(c, k);
            Ok(get("schema")?.as_deref() == Some(SCHEMA_VERSION)
                && get("complete")?.as_deref() == Some("1")
                && get("container_url")?.as_deref() == Some(&source.container_url)
                && get("prefix")?.as_deref() == Some(&source.prefix))
        });
        match ok {
            Ok(true) => {
                // Indexes written before the running totals, or before mount-time recovery
                // read local copies through their own index (a remount scanned every inode),
                // get them now: one scan, once.
                let has = |name: &str| {
                    index.with_conn(|c| {
                        Ok(c.query_row(
                            "SELECT 1 FROM sqlite_master WHERE name = ?1",
                            [name],
                            |_| Ok(()),
                        )
                        .optional()?
                        .is_some())
                    })
                };
                if !has("totals_update")? {
                    index.write(|tx| Ok(tx.execute_batch(TOTALS)?))?;
                }
                if !has("intents")? {
                    index.write(|tx| {
                        Ok(tx.execute_batch(
                            "CREATE TABLE IF NOT EXISTS intents(blob TEXT PRIMARY KEY, ino INTEGER NOT NULL)",
                        )?)
                    })?;
                }
                if !has("inodes_local")? {
                    index.write(|tx| {
                        Ok(tx.execute_batch(
                            "CREATE INDEX IF NOT EXISTS inodes_local ON inodes(ino) WHERE local = 1",
                        )?)
                    })?;
                }
                Ok(Some(index))
            }
            Ok(false) => Ok(None),
            // A damaged file is rebuilt, not served.
            Err(IndexError::Sqlite(e)) => {
                tracing::warn!("ignoring unreadable index {}: {e}", path.display());
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens an index file for reading, whatever source it describes (status reports).
    pub fn open_read_only(path: &Path) -> IndexResult<Index> {
        let index = Index {
            path: path.to_path_buf(),
            pool: crossbeam::queue::ArrayQueue::new(2),
            writer: std::sync::Mutex::new(None),
            writers_waiting: Default::default(),
            written: Written::default(),
            watch: refresh::Watch::default(),
            memo: Memo::default(),
            riders: Default::default(),
            checkpoints: Default::default(),
        };
        index.with_conn(|_| Ok(()))?;
        Ok(index)
    }

    fn connect(&self) -> IndexResult<Connection> {
        // Opened read-write (`query_only` keeps it from writing): unix-excl keeps its locks
        // in memory only for connections that may write. A read-only connection that opens
        // the index first makes the log's index a shared file again, locked by fcntl.
        let c = Connection::open_with_flags_and_vfs(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            vfs::name(),
        )?;
        c.pragma_update(None, "query_only", true)?;
        c.pragma_update(None, "cache_size", -16_000)?;
        c.pragma_update(None, "mmap_size", 256 * 1024 * 1024)?;
        c.set_prepared_statement_cache_capacity(STATEMENTS);
        Ok(c)
    }

    /// Runs `f` in a transaction on the writer connection (opened on first use), after
    /// persisting the data writes held in memory, so `f` sees every inode as it is.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> IndexResult<T>,
    ) -> IndexResult<T> {
        let _gate = self.written.gate();
        self.write_gated(f)
    }

    /// `write`, for a caller that holds the gate of `written` already.
    fn write_gated<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> IndexResult<T>,
    ) -> IndexResult<T> {
        let persisted = self.written.snapshot();
        let mut taken = riders::Taken::default();
        let out = self.transaction(|tx| {
            for (ino, w) in &persisted {
                written::persist(tx, *ino, w)?;
            }
            taken = riders::Taken::board(&self.riders, tx)?;
            if taken.is_empty() {
                return f(tx).map(Ok);
            }
            // Riders aboard: a failure of `f` undoes `f` alone, and the rest commits.
            riders::in_savepoint(tx, f)
        })?;
        taken.committed();
        self.written.persisted(&persisted);
        out
    }

    fn transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> IndexResult<T>,
    ) -> IndexResult<T> {
        use std::sync::atomic::Ordering::{AcqRel, Relaxed};
        let mut guard = match self.writer.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.writers_waiting.fetch_add(1, AcqRel);
                let g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                self.writers_waiting.fetch_sub(1, Relaxed);
                g
            }
        };
        if guard.is_none() {
            let c =
                Connection::open_with_flags_and_vfs(&self.path, OpenFlags::default(), vfs::name())?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            // A process crash loses nothing committed with NORMAL in WAL mode; only a power
            // loss could, and the cache disk does not survive that anyway.
            c.pragma_update(None, "synchronous", "NORMAL")?;
            c.busy_timeout(Duration::from_secs(10))?;
            c.pragma_update(None, "cache_size", -16_000)?;
            let page: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            c.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_BYTES / page.max(512))?;
            // A log that starts over is cut back to what its first commit wrote. Overwriting
            // the old one in place wrote 1 KiB frames into 4 KiB blocks that were no longer
            // cached (dropped caches, memory pressure), and each such block was read from
            // the disk first, with the writer held: during one `git clone` into the mount
            // 1,043 reads kept creates waiting 0.25 s in all. Appending reads nothing.
            c.pragma_update(None, "journal_size_limit", 0)?;
            c.set_prepared_statement_cache_capacity(STATEMENTS);
            let (watch, memo) = (self.watch.recorder(), self.memo.recorder());
            c.update_hook(Some(
                move |_: rusqlite::hooks::Action, _: &str, table: &str, rowid: i64| {
                    if table == "inodes" {
                        watch(rowid as u64);
                        memo(rowid as u64);
                    }
                },
            ));
            self.memo.install(&c)?;
            *guard = Some(c);
        }
        let conn = guard.as_mut().expect("opened above");
        let out = (|| {
            // IMMEDIATE: the write lock is taken before the first read, where SQLite waits
            // for it (busy_timeout). A deferred transaction that read first is refused at
            // once when another connection holds the lock as it upgrades ("database is
            // locked"), and a pooled reader takes it for a moment whenever it finds the
            // log's header mid-update, so busy metadata work saw such refusals as EIO.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })();
        // Committed or rolled back, the rows it touched are kept as they now stand or leave
        // memory (still under the writer's lock, so no other transaction's changes mix in).
        self.memo.ended(conn);
        if out.is_ok() {
            self.checkpoints.committed(&self.path);
        }
        out
    }

    /// Runs `f` on the writer connection when it is idle and no transaction waits for it,
    /// else on a pooled read connection. In WAL mode a connection drops its whole page cache
    /// when another connection committed since its last read, so while files are being
    /// written every pooled reader starts cold (a dozen page reads for one row); the
    /// writer's cache survives its own commits. For point reads only: a long read, or a
    /// stream of short ones (a configure's stats), would hold up the writes behind them.
    fn with_warm_conn<T>(&self, f: impl FnOnce(&Connection) -> IndexResult<T>) -> IndexResult<T> {
        let waiting = self
            .writers_waiting
            .load(std::sync::atomic::Ordering::Acquire);
        if let (0, Ok(guard)) = (waiting, self.writer.try_lock()) {
            if let Some(c) = guard.as_ref() {
                return f(c);
            }
        }
        self.with_conn(f)
    }

    /// Runs `f` on a pooled read connection.
    fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> IndexResult<T>) -> IndexResult<T> {
        let conn = match self.pool.pop() {
            Some(c) => c,
            None => self.connect()?,
        };
        let out = f(&conn);
        let _ = self.pool.push(conn);
        out
    }

    /// Runs `read` (rows overlaid with the writes held in memory) until no held write was
    /// persisted and dropped while it ran: such a read may have seen the row from before
    /// the persist and no longer the entry, and so missed the write.
    fn overlaid<T>(&self, mut read: impl FnMut() -> IndexResult<T>) -> IndexResult<T> {
        loop {
            let before = self.written.removals();
            let out = read()?;
            if self.written.removals() == before {
                return Ok(out);
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> IndexResult<Option<Attr>> {
        self.overlaid(|| Ok(self.committed_attr(ino)?.map(|a| self.written.overlay(a))))
    }

    /// `ino`'s row as committed: from memory, or read and kept.
    fn committed_attr(&self, ino: u64) -> IndexResult<Option<Attr>> {
        if let Some(a) = self.memo.attr(ino) {
            return Ok(Some(a));
        }
        let seen = self.memo.seen();
        let a = self.with_warm_conn(|c| attr_of(c, ino))?;
        if let Some(a) = &a {
            self.memo.keep_attr(seen, a);
        }
        Ok(a)
    }

    pub fn lookup(&self, parent: u64, name: &Name) -> IndexResult<Option<Attr>> {
        self.overlaid(|| {
            let a = match self.memo.entry(parent, name.as_bytes()) {
                // A kept entry's inode row is normally kept too; if not, one query.
                Some(ino) => self.committed_attr(ino)?,
                None => {
                    let seen = self.memo.seen();
                    let a = self.with_warm_conn(|c| entry_of(c, parent, name))?;
                    if let Some(a) = &a {
                        self.memo.keep_entry(seen, parent, name.as_bytes(), a);
                    }
                    a
                }
            };
            Ok(a.map(|a| self.written.overlay(a)))
        })
    }

    /// All entries of directory `ino` in name order (without `.` and `..`).
    pub fn readdir(&self, ino: u64) -> IndexResult<Vec<DirEntry>> {
        self.readdir_page(ino, None, 0, usize::MAX)
    }

    /// Up to `limit` entries of directory `ino` in name order, starting after the name
    /// `after` (from the first when None) or, with `after` None, after skipping `skip`.
    pub fn readdir_page(
        &self,
        ino: u64,
        after: Option<&[u8]>,
        skip: u64,
        limit: usize,
    ) -> IndexResult<Vec<DirEntry>> {
        self.overlaid(|| self.readdir_rows(ino, after, skip, limit))
    }

    fn readdir_rows(
        &self,
        ino: u64,
        after: Option<&[u8]>,
        skip: u64,
        limit: usize,
    ) -> IndexResult<Vec<DirEntry>> {
        self.with_conn(|c| {
            let (sql, cursor): (String, rusqlite::types::Value) = match after {
                Some(name) => (
                    format!(
                        "SELECT d.name, {ATTR_COLS} FROM dentries d JOIN inodes i ON i.ino = d.ino
                         WHERE d.parent = ?1 AND d.name > ?2 ORDER BY d.name LIMIT ?3"
                    ),
                    rusqlite::types::Value::Blob(name.to_vec()),
                ),
                None => (
                    format!(
                        "SELECT d.name, {ATTR_COLS} FROM dentries d JOIN inodes i ON i.ino = d.ino
                         WHERE d.parent = ?1 ORDER BY d.name LIMIT ?3 OFFSET ?2"
                    ),
                    rusqlite::types::Value::Integer(skip.min(i64::MAX as u64) as i64),
                ),
            };
            let mut st = c.prepare_cached(&sql)?;
            let limit = limit.min(i64::MAX as usize) as i64;
            let rows = st.query_map(params![ino as i64, cursor, limit], |r| {
                let name: Vec<u8> = r.get(0)?;
                Ok((name, row_attr(r, 1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (name, attr) = row?;
                let name = Name::new(&name)
                    .map_err(|e| IndexError::Corrupt(format!("entry name in {ino}: {e}")))?;
                out.push(DirEntry {
                    name,
                    attr: self.written.overlay(attr),
                });
            }
            Ok(out)
        })
    }

    /// The parent directory of `ino` (the root is its own parent).
    pub fn parent_of(&self, ino: u64) -> IndexResult<u64> {
        if ino == ROOT_INO {
            return Ok(ROOT_INO);
        }
        self.with_conn(|c| {
            let mut st = c.prepare_cached("SELECT parent FROM dentries WHERE ino = ?1 LIMIT 1")?;
            let p: Option<i64> = st.query_row([ino as i64], |r| r.get(0)).optional()?;
            Ok(p.map(|p| p as u64).unwrap_or(ROOT_INO))
        })
    }

    pub fn readlink(&self, ino: u64) -> IndexResult<Option<Vec<u8>>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached("SELECT target FROM inodes WHERE ino = ?1")?;
            Ok(st
                .query_row([ino as i64], |r| r.get::<_, Option<Vec<u8>>>(0))
                .optional()?
                .flatten())
        })
    }

    pub fn blob_of(&self, ino: u64) -> IndexResult<Option<BlobRef>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT blob, etag, size, md5 FROM inodes WHERE ino = ?1 AND blob IS NOT NULL",
            )?;
            Ok(st
                .query_row([ino as i64], |r| {
                    Ok(BlobRef {
                        name: r.get(0)?,
                        etag: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        size: r.get::<_, i64>(2)? as u64,
                        content_md5: r.get(3)?,
                    })
                })
                .optional()?)
        })
    }

    /// Up to `limit` regular files of directory `dir` with a blob of 1 to `max_size` bytes
    /// and no local copy, in name order: what a prefetch of the directory may fetch.
    pub fn small_blobs_in(
        &self,
        dir: u64,
        max_size: u64,
        limit: usize,
    ) -> IndexResult<Vec<(u64, BlobRef)>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT i.ino, i.blob, i.etag, i.size, i.md5 FROM dentries d
                 JOIN inodes i ON i.ino = d.ino
                 WHERE d.parent = ?1 AND i.kind = ?2 AND i.blob IS NOT NULL AND i.local = 0
                   AND i.size > 0 AND i.size <= ?3
                 ORDER BY d.name LIMIT ?4",
            )?;
            let rows = st.query_map(
                rusqlite::params![
                    dir as i64,
                    kind_code(Kind::File),
                    max_size.min(i64::MAX as u64) as i64,
                    limit as i64
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        BlobRef {
                            name: r.get(1)?,
                            etag: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                            size: r.get::<_, i64>(3)? as u64,
                            content_md5: r.get(4)?,
                        },
                    ))
                },
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    pub fn findings(&self) -> IndexResult<Vec<Finding>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT blob, hidden, reason FROM findings ORDER BY hidden DESC, blob",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Finding {
                    blob: r.get(0)?,
                    hidden: r.get(1)?,
                    reason: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// The random id of this index, which write-back stamps on every blob it writes
    /// (made on first use).
    pub fn writer_id(&self) -> IndexResult<String> {
        let get = |c: &Connection| -> IndexResult<Option<String>> {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = 'writer'", [], |r| {
                    r.get(0)
                })
                .optional()?,
            )
        };
        if let Some(id) = self.with_conn(get)? {
            return Ok(id);
        }
        self.write(|tx| {
            if let Some(id) = get(tx)? {
                return Ok(id);
            }
            use sha2::{Digest, Sha256};
            let seed = format!(
                "{}\n{}\n{}",
                crate::posix::to_ns(std::time::SystemTime::now()),
                std::process::id(),
                self.path.display()
            );
            let id = hex::encode(&Sha256::digest(seed.as_bytes())[..12]);
            tx.execute("INSERT INTO meta(key, value) VALUES ('writer', ?1)", [&id])?;
            Ok(id)
        })
    }

    /// How many names (directory entries) the index holds.
    pub fn entry_count(&self) -> IndexResult<u64> {
        self.with_conn(|c| {
            Ok(c.query_row("SELECT count(*) FROM dentries", [], |r| r.get::<_, i64>(0))? as u64)
        })
    }

    /// The value of `key` in the index's `meta` table.
    pub fn meta(&self, key: &str) -> IndexResult<Option<String>> {
        self.with_conn(|c| Ok(meta_value(c, key)?))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> IndexResult<()> {
        self.write(|tx| {
            tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)")?
                .execute([key, value])?;
            Ok(())
        })
    }

    /// The names from the root to `ino` (one of them, for a hard-linked inode); None when it
    /// has no name.
    pub fn path_of(&self, ino: u64) -> IndexResult<Option<Vec<Name>>> {
        self.with_warm_conn(|c| {
            let Some(parts) = path_parts(c, ino)? else {
                return Ok(None);
            };
            let names = parts
                .iter()
                .map(|n| Name::new(n).map_err(|e| IndexError::Corrupt(e.to_string())))
                .collect::<IndexResult<Vec<_>>>()?;
            Ok(Some(names))
        })
    }

    /// (number of inodes, total bytes of regular files), from the running totals.
    pub fn totals(&self) -> IndexResult<(u64, u64)> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached("SELECT files, bytes FROM totals")?;
            Ok(st
                .query_row([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?.max(0) as u64,
                        r.get::<_, i64>(1)?.max(0) as u64,
                    ))
                })
                .optional()?
                .unwrap_or((0, 0)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::memo::tests::{empty_index, file, fresh_index};
    use super::names::Name;
    use super::write::NewNode;
    use super::{Index, ROOT_INO};
    use crate::posix::{Kind, RenameMode};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// Records `ino` as uploaded to `blob`; its generation then.
    fn uploaded(index: &Index, ino: u64, blob: &str) -> i64 {
        let gen = index.pending_inode(ino).unwrap().unwrap().gen;
        let u = super::journal::Uploaded {
            ino,
            gen,
            blob: Some((blob.to_string(), "\"etag\"".to_string())),
            stubs: Vec::new(),
            uploaded_data: true,
            remove: false,
        };
        index.record_upload(Duration::ZERO, u).unwrap();
        assert!(index.pending_inode(ino).unwrap().is_none());
        gen
    }

    #[test]
    fn a_rename_marks_the_inode_and_the_uploaded_ones_below_it_with_a_new_generation() {
        let (_dir, index, at) = fresh_index();
        let name = |n: &str| Name::new(n.as_bytes()).unwrap();
        let f = file(&index, "f", at);
        let dir = NewNode {
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            target: None,
            rdev: 0,
        };
        let d = index
            .create(ROOT_INO, &name("d"), &dir, at, at, |_| {})
            .unwrap()
            .ino;
        let g = file(&index, "g", at);
        index
            .rename(
                ROOT_INO,
                &name("g"),
                d,
                &name("g"),
                RenameMode::Replace,
                at,
                at,
            )
            .unwrap();
        let gens = [(f, "f"), (d, "d"), (g, "d/g")].map(|(i, b)| (i, uploaded(&index, i, b)));
        let later = at + Duration::from_secs(5);
        for (from, to) in [("f", "f2"), ("d", "d2")] {
            index
                .rename(
                    ROOT_INO,
                    &name(from),
                    ROOT_INO,
                    &name(to),
                    RenameMode::Replace,
                    later,
                    later,
                )
                .unwrap();
        }
        for (ino, gen) in gens {
            let p = index.pending_inode(ino).unwrap().expect("pending again");
            assert_eq!(p.gen, gen + 1, "inode {ino}: a new generation");
            let moved = ino != g;
            assert_eq!(
                p.attr.ctime == later,
                moved,
                "inode {ino}: ctime of a moved inode"
            );
        }
    }

    /// A write transaction that reads before it writes (most do) while another connection
    /// holds the write lock for a moment, as a reader does when it finds the log's header
    /// mid-update: it waits, where a deferred one failed at once with "database is locked".
    #[test]
    fn a_write_waits_for_a_lock_another_connection_holds_for_a_moment() {
        let dir = tempfile::tempdir().unwrap();
        let index = empty_index(dir.path());
        index.write(|_| Ok(())).unwrap();
        let other = rusqlite::Connection::open(dir.path().join("index.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            other.execute_batch("COMMIT").unwrap();
        });
        // Held until the holder commits: a deferred transaction reaches its UPDATE well
        // before then.
        let wrote = index.write(|tx| {
            let n: i64 = tx.query_row("SELECT count(*) FROM inodes", [], |r| r.get(0))?;
            tx.execute(
                "UPDATE inodes SET nlink = nlink WHERE ino = ?1",
                [super::ROOT_INO as i64],
            )?;
            Ok(n)
        });
        holder.join().unwrap();
        assert!(wrote.is_ok(), "{wrote:?}");
    }

    /// Whether `c` is the writer connection: only it carries the memo's temporary triggers.
    fn is_writer(c: &rusqlite::Connection) -> super::IndexResult<bool> {
        let n: i64 = c.query_row("SELECT count(*) FROM sqlite_temp_master", [], |r| r.get(0))?;
        Ok(n > 0)
    }

    /// The log's index lives in the heap (no `-shm` file, no fcntl per transaction), with
    /// the reader that opens the index first too, and another process is kept out.
    #[test]
    fn the_log_index_is_kept_in_memory_and_the_file_is_this_process_alone() {
        let dir = tempfile::tempdir().unwrap();
        let index = empty_index(dir.path());
        // A pooled reader first, as a mount's open does, then writes.
        assert!(index.getattr(super::ROOT_INO).unwrap().is_some());
        index.write(|_| Ok(())).unwrap();
        index
            .write(|tx| Ok(tx.execute_batch("UPDATE inodes SET nlink = nlink WHERE ino = 1")?))
            .unwrap();
        assert!(dir.path().join("index.db-wal").exists());
        assert!(
            !dir.path().join("index.db-shm").exists(),
            "the log's index is a shared file"
        );
        let other = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; sqlite3.connect(sys.argv[1], timeout=0).execute('SELECT count(*) FROM inodes').fetchall()",
            ])
            .arg(dir.path().join("index.db"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&other.stderr);
        assert!(
            !other.status.success() && err.contains("locked"),
            "another process read the index: {err}"
        );
    }

    #[test]
    fn point_reads_use_the_idle_writer_and_leave_it_to_a_waiting_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let index = empty_index(dir.path());
        index.write(|_| Ok(())).unwrap();
        assert!(index.with_warm_conn(is_writer).unwrap(), "idle: the writer");
        assert!(!index.with_conn(is_writer).unwrap(), "the pool");
        index.writers_waiting.fetch_add(1, Ordering::AcqRel);
        assert!(
            !index.with_warm_conn(is_writer).unwrap(),
            "a transaction waits: the pool"
        );
        index.writers_waiting.fetch_sub(1, Ordering::AcqRel);
        let held = index.writer.lock().unwrap();
        assert!(!index.with_warm_conn(is_writer).unwrap(), "busy: the pool");
        drop(held);
    }

    #[test]
    fn a_create_appends_a_few_small_pages_to_the_log() {
        let (dir, index, at) = fresh_index();
        file(&index, "first", at);
        let log = dir.path().join("index.db-wal");
        let before = std::fs::metadata(&log).unwrap().len();
        for i in 0..100 {
            file(&index, &format!("f{i}"), at);
        }
        let per_create = (std::fs::metadata(&log).unwrap().len() - before) / 100;
        // Seven 1 KiB pages and their frame headers; 4 KiB pages made it about 28 KiB.
        assert!(
            per_create <= 8 * 1024,
            "{per_create} bytes of log per create"
        );
        let page: i64 = index
            .connect()
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(page, super::PAGE_SIZE);
    }
}
