//! The write-back journal: which inodes differ from the container and what the container
//! holds for them.
//!
//! An inode is `pending` from the transaction that changed it until write-back has made the
//! container match and recorded the result with the same `gen` it started from. Each inode
//! *claims* the blob names it last wrote or indexed (`inodes.blob` for its data, directory
//! marker or symlink, `stubs` for its extra hard-link names) together with their ETags:
//! write-back overwrites or deletes a blob only with the ETag of a claim, so a blob simfs
//! has never seen is never replaced. When one inode's write replaces a name another inode
//! claimed (a file renamed over another), the other claim is dropped in the same
//! transaction that records the write. Names an inode no longer needs (the old name after a
//! rename, every name of a deleted file) move to `trash` in that same transaction and are
//! deleted from there: a crash between writing the new name and deleting the old one leaves
//! a trash row, never an unclaimed duplicate.
//!
//! A name write-back is about to write for the first time is an *intent* first (`begin_upload`),
//! persisted before the request: a crash after the service committed it and before the
//! result was recorded would otherwise leave a blob no one claims (a temporary file renamed
//! while its upload ran, seen by every other node). `record_upload` drops the intents it
//! settles by a claim; what is left is looked up in the container and, when it is this
//! index's own write, trashed (`Writeback::settle_intents`).

use super::{row_attr, Index, IndexResult, ATTR_COLS, ATTR_N};
use crate::posix::{from_ns, to_ns, Attr, Kind};
use rusqlite::{params, Connection, OptionalExtension};
use std::time::{Duration, SystemTime};

/// Everything write-back needs to bring one pending inode's container side up to date.
#[derive(Clone, Debug)]
pub struct PendingInode {
    pub attr: Attr,
    /// The claimed data blob (file data, directory marker, symlink) and its ETag.
    pub blob: Option<(String, String)>,
    pub link_id: Option<String>,
    pub target: Option<Vec<u8>>,
    pub local: bool,
    pub dirty: bool,
    pub gen: i64,
    /// Upload attempts that failed since the last one that succeeded.
    pub failures: u32,
    /// The inode's names, sorted by path; empty once unlinked.
    pub names: Vec<NameRef>,
    /// Claimed hard-link stub blobs and their ETags.
    pub stubs: Vec<(String, String)>,
}

/// A pending inode whose uploads keep failing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failing {
    pub ino: u64,
    pub attempts: u32,
    pub error: String,
}

/// One name of an inode: its path relative to the mount root and its directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRef {
    pub path: Vec<u8>,
    pub parent: u64,
    pub name: Vec<u8>,
}

/// Who claims a blob name (`ino` 0: the trash, waiting to be deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub ino: u64,
    pub etag: String,
    pub stub: bool,
    /// The claiming inode still has names (else it is waiting to be deleted).
    pub live: bool,
    pub kind: Kind,
    pub local: bool,
}

/// The path of directory `ino` relative to the mount root (empty for the root).
fn dir_path(c: &Connection, ino: u64) -> IndexResult<Option<Vec<u8>>> {
    Ok(super::path_parts(c, ino)?.map(|parts| parts.join(&b'/')))
}

/// What an upload of one inode put in the container, for `Index::record_upload`.
pub struct Uploaded {
    pub ino: u64,
    /// The generation the upload read: a change since keeps the inode pending.
    pub gen: i64,
    /// The data blob and its ETag (None: nothing, e.g. the root or an unlinked inode).
    pub blob: Option<(String, String)>,
    /// The stub blobs of its other names, with their ETags.
    pub stubs: Vec<(String, String)>,
    /// Its data went up (not only its metadata): unchanged since, it is clean.
    pub uploaded_data: bool,
    /// The (unlinked) inode's row goes too.
    pub remove: bool,
}

/// The state of pending inode `ino` as `c` sees it; None when it is not pending (or gone).
fn pending_view(c: &Connection, ino: u64) -> IndexResult<Option<PendingInode>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {ATTR_COLS}, i.blob, i.etag, i.link_id, i.target, i.local, i.dirty, i.gen,
                    i.failures
             FROM inodes i WHERE i.ino = ?1 AND i.pending = 1"
    ))?;
    let Some(mut view) = st
        .query_row([ino as i64], |r| {
            let n = ATTR_N;
            let blob: Option<String> = r.get(n)?;
            let etag: Option<String> = r.get(n + 1)?;
            Ok(PendingInode {
                attr: row_attr(r, 0)?,
                blob: blob.map(|b| (b, etag.unwrap_or_default())),
                link_id: r.get(n + 2)?,
                target: r.get(n + 3)?,
                local: r.get(n + 4)?,
                dirty: r.get(n + 5)?,
                gen: r.get(n + 6)?,
                failures: r.get::<_, i64>(n + 7)? as u32,
                names: Vec::new(),
                stubs: Vec::new(),
            })
        })
        .optional()?
    else {
        return Ok(None);
    };
    let mut names = c.prepare_cached("SELECT parent, name FROM dentries WHERE ino = ?1")?;
    let rows = names
        .query_map([ino as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (parent, name) in rows {
        if let Some(mut path) = dir_path(c, parent as u64)? {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            view.names.push(NameRef {
                path,
                parent: parent as u64,
                name,
            });
        }
    }
    view.names.sort_by(|a, b| a.path.cmp(&b.path));
    let mut stubs = c.prepare_cached("SELECT blob, etag FROM stubs WHERE ino = ?1")?;
    view.stubs = stubs
        .query_map([ino as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(view))
}

/// Records in `tx` that inode `ino` is about to write `names` (those it does not claim
/// yet). Returns the names that had no intent yet: no earlier attempt can have written those.
fn intend_in(tx: &Connection, ino: u64, names: &[String]) -> IndexResult<Vec<String>> {
    let mut fresh = Vec::new();
    for n in names {
        let added = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO intents(blob, ino) SELECT ?1, ?2
                 WHERE NOT EXISTS (SELECT 1 FROM inodes WHERE ino = ?2 AND blob = ?1)
                   AND NOT EXISTS (SELECT 1 FROM stubs WHERE ino = ?2 AND blob = ?1)",
            )?
            .execute(params![n, ino as i64])?;
        if added > 0 {
            fresh.push(n.clone());
        }
    }
    Ok(fresh)
}

impl Index {
    /// The state of a pending inode, data writes held in memory included; None when it is
    /// not pending (or gone).
    pub fn pending_inode(&self, ino: u64) -> IndexResult<Option<PendingInode>> {
        self.persist_written()?;
        self.with_warm_conn(|c| pending_view(c, ino))
    }

    /// The state of a pending inode as the journal records it, without persisting the data
    /// writes held in memory first: its names are exact (every name change is a
    /// transaction), its size and times may be older than what stat shows.
    pub fn pending_inode_as_recorded(&self, ino: u64) -> IndexResult<Option<PendingInode>> {
        self.with_warm_conn(|c| pending_view(c, ino))
    }

    /// The start of an upload of `ino` in one transaction: the data writes held in memory
    /// are persisted, the pending state is read, and the names `new` picks from it (those
    /// the upload will write for the first time) are recorded as intents (`intend_in`).
    /// Returns the state and the names that had no intent yet; None when not pending.
    pub fn begin_upload(
        &self,
        ino: u64,
        new: impl FnOnce(&PendingInode) -> Vec<String>,
    ) -> IndexResult<Option<(PendingInode, Vec<String>)>> {
        self.write(|tx| {
            let Some(view) = pending_view(tx, ino)? else {
                return Ok(None);
            };
            let names = new(&view);
            let fresh = intend_in(tx, ino, &names)?;
            Ok(Some((view, fresh)))
        })
    }

    /// Every pending inode.
    pub fn pending_inodes(&self) -> IndexResult<Vec<u64>> {
        self.inodes_where("SELECT ino FROM inodes WHERE pending = 1", [])
    }

    /// Pending inodes with an entry in directory `dir`.
    pub fn pending_entries_of(&self, dir: u64) -> IndexResult<Vec<u64>> {
        self.inodes_where(
            "SELECT i.ino FROM dentries d JOIN inodes i ON i.ino = d.ino
             WHERE d.parent = ?1 AND i.pending = 1",
            [dir as i64],
        )
    }

    /// Pending inodes with no name left (their blobs are to be deleted).
    pub fn pending_unlinked(&self) -> IndexResult<Vec<u64>> {
        self.inodes_where("SELECT ino FROM inodes WHERE pending = 1 AND nlink = 0", [])
    }

    /// The inode numbers `sql` selects.
    fn inodes_where<P: rusqlite::Params>(&self, sql: &str, params: P) -> IndexResult<Vec<u64>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(sql)?;
            let rows = st.query_map(params, |r| r.get::<_, i64>(0))?;
            Ok(rows
                .map(|r| r.map(|i| i as u64))
                .collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Pending inodes due at `now`, oldest first.
    pub fn due(&self, now: SystemTime, limit: usize) -> IndexResult<Vec<u64>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT ino FROM inodes WHERE pending = 1 AND due_ns <= ?1 ORDER BY due_ns LIMIT ?2",
            )?;
            let rows = st.query_map(params![to_ns(now), limit as i64], |r| r.get::<_, i64>(0))?;
            Ok(rows.map(|r| r.map(|i| i as u64)).collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Number of pending inodes, and when the next one is due.
    pub fn pending(&self) -> IndexResult<(u64, Option<SystemTime>)> {
        self.with_conn(|c| {
            Ok(c.query_row(
                "SELECT (SELECT count(*) FROM inodes WHERE pending = 1) + (SELECT count(*) FROM trash),
                        (SELECT min(due_ns) FROM inodes WHERE pending = 1)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<i64>>(1)?.map(from_ns))),
            )?)
        })
    }

    /// Closed-but-uncommitted data: pending inodes with data to upload and their bytes,
    /// leaving out `except` (the file whose close asks).
    pub fn pending_data(&self, except: u64) -> IndexResult<(u64, u64)> {
        self.with_conn(|c| {
            Ok(c.prepare_cached(
                "SELECT count(*), coalesce(sum(size), 0) FROM inodes
                 WHERE pending = 1 AND dirty = 1 AND ino != ?1",
            )?
            .query_row([except as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?)
        })
    }

    /// When the least recently changed pending inode last changed: how long the oldest
    /// change not yet in the container has waited, at least.
    pub fn oldest_pending(&self) -> IndexResult<Option<SystemTime>> {
        self.with_conn(|c| {
            Ok(c.query_row(
                "SELECT min(ctime_ns) FROM inodes WHERE pending = 1",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .map(from_ns))
        })
    }

    /// Pending inodes whose last attempt failed.
    pub fn failing(&self) -> IndexResult<Vec<Failing>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT ino, failures, coalesce(last_error, '') FROM inodes
                 WHERE pending = 1 AND failures > 0 ORDER BY ino",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Failing {
                    ino: r.get::<_, i64>(0)? as u64,
                    attempts: r.get::<_, i64>(1)? as u32,
                    error: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Who claims blob `name`, if anyone.
    pub fn claim_on(&self, name: &str) -> IndexResult<Option<Claim>> {
        self.with_warm_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT ino, etag, 0 FROM inodes WHERE blob = ?1
                 UNION ALL SELECT ino, etag, 1 FROM stubs WHERE blob = ?1
                 UNION ALL SELECT 0, etag, 0 FROM trash WHERE blob = ?1 LIMIT 1",
            )?;
            let Some((ino, etag, stub)) = st
                .query_row([name], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        r.get::<_, bool>(2)?,
                    ))
                })
                .optional()?
            else {
                return Ok(None);
            };
            let mut st =
                c.prepare_cached("SELECT kind, nlink, local FROM inodes WHERE ino = ?1")?;
            let (kind, nlink, local) = st
                .query_row([ino], |r| {
                    Ok((
                        super::kind_from_code(r.get(0)?)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, bool>(2)?,
                    ))
                })
                .optional()?
                .unwrap_or((Kind::File, 0, false));
            Ok(Some(Claim {
                ino: ino as u64,
                etag,
                stub,
                live: nlink > 0,
                kind,
                local,
            }))
        })
    }

    /// Records what write-back uploaded (`Uploaded`). Claims other inodes had on its names
    /// are dropped; names the inode claimed before and no longer does go to the trash. The
    /// inode stops being pending unless it changed meanwhile (`gen`). The record is done by
    /// the next transaction anyone makes within `within` (see `riders.rs`; zero: one of its
    /// own, at once); the caller's locks cover it until it is done, as they cover a commit
    /// of its own.
    pub fn record_upload(&self, within: Duration, u: Uploaded) -> IndexResult<()> {
        self.write_soon(within, move |tx| record(tx, &u))
    }
}

/// What `record_upload` records, in `tx`.
fn record(tx: &rusqlite::Transaction<'_>, u: &Uploaded) -> IndexResult<()> {
    let Uploaded {
        ino,
        gen,
        ref blob,
        ref stubs,
        uploaded_data,
        remove,
    } = *u;
    let mut names: Vec<&str> = stubs.iter().map(|s| s.0.as_str()).collect();
    if let Some((b, _)) = blob {
        names.push(b);
    }
    let old: Vec<(String, String)> = tx
        .prepare_cached(
            "SELECT blob, coalesce(etag, '') FROM inodes WHERE ino = ?1 AND blob IS NOT NULL
             UNION ALL SELECT blob, etag FROM stubs WHERE ino = ?1",
        )?
        .query_map([ino as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (b, e) in &old {
        if !names.contains(&b.as_str()) {
            tx.prepare_cached("INSERT OR REPLACE INTO trash(blob, etag) VALUES (?1, ?2)")?
                .execute(params![b, e])?;
        }
    }
    for n in &names {
        tx.prepare_cached(
            "UPDATE inodes SET blob = NULL, etag = NULL WHERE blob = ?1 AND ino != ?2",
        )?
        .execute(params![n, ino as i64])?;
        tx.prepare_cached("DELETE FROM stubs WHERE blob = ?1")?
            .execute([n])?;
        tx.prepare_cached("DELETE FROM trash WHERE blob = ?1")?
            .execute([n])?;
    }
    tx.prepare_cached("DELETE FROM stubs WHERE ino = ?1")?
        .execute([ino as i64])?;
    // The names now claimed (or trashed) are settled intents.
    for n in &names {
        tx.prepare_cached("DELETE FROM intents WHERE blob = ?1")?
            .execute([n])?;
    }
    if remove {
        tx.prepare_cached("DELETE FROM inodes WHERE ino = ?1 AND nlink = 0")?
            .execute([ino as i64])?;
        return Ok(());
    }
    for (b, e) in stubs {
        tx.prepare_cached("INSERT INTO stubs(blob, ino, etag) VALUES (?1, ?2, ?3)")?
            .execute(params![b, ino as i64, e])?;
    }
    tx.prepare_cached(
        "UPDATE inodes SET blob = ?2, etag = ?3, md5 = NULL, failures = 0, last_error = NULL,
             dirty = CASE WHEN gen = ?4 AND ?5 THEN 0 ELSE dirty END,
             pending = CASE WHEN gen = ?4 THEN 0 ELSE 1 END
         WHERE ino = ?1",
    )?
    .execute(params![
        ino as i64,
        blob.as_ref().map(|b| b.0.as_str()),
        blob.as_ref().map(|b| b.1.as_str()),
        gen,
        uploaded_data
    ])?;
    Ok(())
}

impl Index {
    /// Drops inode `ino`'s intents on `names`, which nothing ever wrote.
    pub fn forget_intents(&self, ino: u64, names: &[String]) -> IndexResult<()> {
        self.write(|tx| {
            for n in names {
                tx.prepare_cached("DELETE FROM intents WHERE blob = ?1 AND ino = ?2")?
                    .execute(params![n, ino as i64])?;
            }
            Ok(())
        })
    }

    /// Intents no claim settled (of `ino`, or of every inode): (name, inode).
    pub fn open_intents(&self, ino: Option<u64>) -> IndexResult<Vec<(String, u64)>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT blob, ino FROM intents i WHERE (?1 IS NULL OR ino = ?1)
                   AND NOT EXISTS (SELECT 1 FROM inodes WHERE blob = i.blob)
                   AND NOT EXISTS (SELECT 1 FROM stubs WHERE blob = i.blob)
                   AND NOT EXISTS (SELECT 1 FROM trash WHERE blob = i.blob)",
            )?;
            let rows = st.query_map([ino.map(|i| i as i64)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// An intent is settled: the blob it named goes to the trash (`etag`: it exists and is
    /// this index's write) or is forgotten (None: absent, or someone else's now).
    pub fn settle_intent(&self, blob: &str, etag: Option<&str>) -> IndexResult<()> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM intents WHERE blob = ?1")?
                .execute([blob])?;
            if let Some(e) = etag {
                // Not a name an inode claims now: its upload recorded it after the lookup.
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO trash(blob, etag) SELECT ?1, ?2
                     WHERE NOT EXISTS (SELECT 1 FROM inodes WHERE blob = ?1)
                       AND NOT EXISTS (SELECT 1 FROM stubs WHERE blob = ?1)",
                )?
                .execute(params![blob, e])?;
            }
            Ok(())
        })
    }

    /// Blobs waiting to be deleted: (name, ETag).
    pub fn trash(&self, limit: usize) -> IndexResult<Vec<(String, String)>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached("SELECT blob, etag FROM trash ORDER BY blob LIMIT ?1")?;
            let rows = st.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Whether `blob` at `etag` is still in the trash (no one has deleted it since it was
    /// read from there).
    pub fn in_trash(&self, blob: &str, etag: &str) -> IndexResult<bool> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached("SELECT 1 FROM trash WHERE blob = ?1 AND etag = ?2")?;
            Ok(st.exists(params![blob, etag])?)
        })
    }

    /// A trashed blob is gone (or was replaced by a newer version someone else owns).
    pub fn trash_done(&self, blob: &str, etag: &str) -> IndexResult<()> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM trash WHERE blob = ?1 AND etag = ?2")?
                .execute(params![blob, etag])?;
            // A refresh listing taken before the delete must not bring the name back.
            self.watch.deleted_blob(blob);
            Ok(())
        })
    }

    /// Moves a claim of `ino` to another name (evicted to a temporary blob), or drops it
    /// (`to` None) when the inode can rewrite it from local state.
    pub fn move_claim(&self, ino: u64, from: &str, to: Option<(&str, &str)>) -> IndexResult<()> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM stubs WHERE blob = ?1 AND ino = ?2")?
                .execute(params![from, ino as i64])?;
            tx.prepare_cached(
                "UPDATE inodes SET blob = ?3, etag = ?4, pending = 1,
                     dirty = CASE WHEN ?3 IS NULL AND kind = 2 THEN 1 ELSE dirty END
                 WHERE ino = ?1 AND blob = ?2",
            )?
            .execute(params![ino as i64, from, to.map(|t| t.0), to.map(|t| t.1)])?;
            Ok(())
        })
    }

    /// Postpones a pending inode to `due` (it is still being written).
    pub fn defer(&self, ino: u64, due: SystemTime) -> IndexResult<()> {
        self.write(|tx| {
            tx.prepare_cached("UPDATE inodes SET due_ns = ?2 WHERE ino = ?1 AND pending = 1")?
                .execute(params![ino as i64, to_ns(due)])?;
            Ok(())
        })
    }

    /// An upload of `ino` failed: it is retried after a backoff that doubles with each
    /// failure (1 s, 2 s, 4 s, ... up to `max_backoff`). Returns that backoff.
    pub fn upload_failed(
        &self,
        ino: u64,
        error: &str,
        now: SystemTime,
        max_backoff: Duration,
    ) -> IndexResult<Duration> {
        self.write(|tx| {
            let failures: i64 = tx
                .prepare_cached("SELECT failures FROM inodes WHERE ino = ?1")?
                .query_row([ino as i64], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            let backoff = Duration::from_secs(1 << failures.clamp(0, 6)).min(max_backoff);
            tx.prepare_cached(
                "UPDATE inodes SET failures = failures + 1, last_error = ?2, due_ns = ?3
                 WHERE ino = ?1",
            )?
            .execute(params![ino as i64, error, to_ns(now + backoff)])?;
            Ok(backoff)
        })
    }

    /// Local files whose inode the index no longer has or that are no longer local
    /// (for cleaning the cache at mount).
    pub fn local_inodes(&self) -> IndexResult<Vec<u64>> {
        self.inodes_where("SELECT ino FROM inodes WHERE local = 1", [])
    }

    /// Makes every pending inode due now (mount-time recovery, fsyncdir, unmount).
    pub fn all_due_now(&self) -> IndexResult<()> {
        self.write(|tx| {
            tx.execute("UPDATE inodes SET due_ns = 0 WHERE pending = 1", [])?;
            Ok(())
        })
    }
}
