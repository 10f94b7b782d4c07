//! Namespace and attribute changes, each one SQLite transaction.
//!
//! Every function checks the POSIX preconditions (EEXIST, ENOTEMPTY, EISDIR, ...) and makes
//! the change in the same transaction, so concurrent callers can never both succeed where
//! one should fail, and marks every inode whose container side must change as `pending`
//! (see `journal.rs`). A pending inode keeps its first due time: a burst of changes is
//! uploaded once, a little after it began, instead of once per change.
//!
//! An unlinked inode keeps its row (nlink 0) until write-back has deleted its blobs and the
//! last open handle is gone, so `fstat` on an open, unlinked file still works.

use super::names::Name;
use super::{attr_of, entry_of, Index, IndexResult, Refusal, ROOT_INO};
use crate::posix::{to_ns, Attr, AttrChanges, Kind, RenameMode};
use rusqlite::{params, OptionalExtension, Transaction};
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// A new inode's identity.
#[derive(Clone, Debug)]
pub struct NewNode<'a> {
    pub kind: Kind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Symlink target.
    pub target: Option<&'a [u8]>,
    /// Device number of a character or block device.
    pub rdev: u32,
}

/// A directory that can take entries: live and a directory.
fn dir(tx: &Transaction<'_>, ino: u64) -> IndexResult<Attr> {
    match attr_of(tx, ino)? {
        Some(a) if a.kind == Kind::Dir && a.nlink > 0 => Ok(a),
        Some(a) if a.kind == Kind::Dir => Err(Refusal::NotFound.into()),
        Some(_) => Err(Refusal::NotDir.into()),
        None => Err(Refusal::NotFound.into()),
    }
}

/// Marks `ino` as differing from the container, keeping an earlier due time.
fn mark(tx: &Transaction<'_>, ino: u64, due: SystemTime) -> IndexResult<()> {
    tx.prepare_cached(
        "UPDATE inodes SET gen = gen + 1,
             due_ns = CASE WHEN pending = 1 THEN min(due_ns, ?2) ELSE ?2 END, pending = 1
         WHERE ino = ?1",
    )?
    .execute(params![ino as i64, to_ns(due)])?;
    Ok(())
}

/// A directory's entries changed: new mtime and ctime, persisted with the directory marker.
fn touch_dir(tx: &Transaction<'_>, ino: u64, now: SystemTime, due: SystemTime) -> IndexResult<()> {
    tx.prepare_cached("UPDATE inodes SET mtime_ns = ?2, ctime_ns = ?2 WHERE ino = ?1")?
        .execute(params![ino as i64, to_ns(now)])?;
    if ino != ROOT_INO {
        mark(tx, ino, due)?;
    }
    Ok(())
}

fn add_nlink(tx: &Transaction<'_>, ino: u64, delta: i64) -> IndexResult<()> {
    tx.prepare_cached("UPDATE inodes SET nlink = max(nlink + ?2, 0) WHERE ino = ?1")?
        .execute(params![ino as i64, delta])?;
    Ok(())
}

fn set_ctime(tx: &Transaction<'_>, ino: u64, now: SystemTime) -> IndexResult<()> {
    tx.prepare_cached("UPDATE inodes SET ctime_ns = ?2 WHERE ino = ?1")?
        .execute(params![ino as i64, to_ns(now)])?;
    Ok(())
}

fn is_empty_dir(tx: &Transaction<'_>, ino: u64) -> IndexResult<bool> {
    let mut st = tx.prepare_cached("SELECT 1 FROM dentries WHERE parent = ?1 LIMIT 1")?;
    Ok(st.query_row([ino as i64], |_| Ok(())).optional()?.is_none())
}

/// Marks `ino` and everything below it that exists in the container: their blob names all
/// change with the path. Pending entries below get a new generation too: one whose upload
/// is in flight is writing the old path, and that result must not count as up to date.
/// (Never-uploaded directories implied by others' blobs stay as they are: they have no
/// blob of their own to move.)
fn mark_subtree(tx: &Transaction<'_>, ino: u64, due: SystemTime) -> IndexResult<()> {
    tx.prepare_cached(
        "WITH RECURSIVE sub(ino) AS (
             SELECT ?1 UNION SELECT d.ino FROM dentries d JOIN sub ON d.parent = sub.ino)
         UPDATE inodes SET gen = gen + 1,
             due_ns = CASE WHEN pending = 1 THEN min(due_ns, ?2) ELSE ?2 END, pending = 1
         WHERE ino IN sub
           AND (ino = ?1 OR blob IS NOT NULL OR pending = 1 OR ino IN (SELECT ino FROM stubs))",
    )?
    .execute(params![ino as i64, to_ns(due)])?;
    Ok(())
}

/// `a` got a new path: its ctime changes, and it and everything below it are marked as
/// `mark_subtree` says. Only a directory has anything below it: any other inode is one row,
/// updated by one statement (a rename's statements are most of its cost; pip renames each
/// compiled module into place).
fn moved(tx: &Transaction<'_>, a: &Attr, now: SystemTime, due: SystemTime) -> IndexResult<()> {
    if a.kind == Kind::Dir {
        set_ctime(tx, a.ino, now)?;
        return mark_subtree(tx, a.ino, due);
    }
    tx.prepare_cached(
        "UPDATE inodes SET ctime_ns = ?2, gen = gen + 1,
             due_ns = CASE WHEN pending = 1 THEN min(due_ns, ?3) ELSE ?3 END, pending = 1
         WHERE ino = ?1",
    )?
    .execute(params![a.ino as i64, to_ns(now), to_ns(due)])?;
    Ok(())
}

/// Whether `ino` is `ancestor` or lies below it.
fn is_within(tx: &Transaction<'_>, mut ino: u64, ancestor: u64) -> IndexResult<bool> {
    let mut st = tx.prepare_cached("SELECT parent FROM dentries WHERE ino = ?1 LIMIT 1")?;
    for _ in 0..4096 {
        if ino == ancestor {
            return Ok(true);
        }
        if ino == ROOT_INO {
            return Ok(false);
        }
        match st
            .query_row([ino as i64], |r| r.get::<_, i64>(0))
            .optional()?
        {
            Some(p) => ino = p as u64,
            None => return Ok(false),
        }
    }
    Err(super::IndexError::Corrupt(format!(
        "directory loop above {ino}"
    )))
}

/// Removes the entry `parent/name` of inode `a`; returns the inode's attributes after.
fn drop_entry(
    tx: &Transaction<'_>,
    parent: u64,
    name: &Name,
    a: &Attr,
    now: SystemTime,
    due: SystemTime,
) -> IndexResult<()> {
    tx.prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")?
        .execute(params![parent as i64, name.as_bytes()])?;
    if a.kind == Kind::Dir {
        tx.prepare_cached("UPDATE inodes SET nlink = 0 WHERE ino = ?1")?
            .execute([a.ino as i64])?;
        add_nlink(tx, parent, -1)?;
    } else {
        add_nlink(tx, a.ino, -1)?;
    }
    set_ctime(tx, a.ino, now)?;
    mark(tx, a.ino, due)?;
    Ok(())
}

fn new_link_id(ino: u64, now: SystemTime) -> String {
    let h = Sha256::digest(format!("{ino}\n{}\n{}", to_ns(now), std::process::id()).as_bytes());
    hex::encode(&h[..12])
}

impl Index {
    /// Creates `parent/name` as a new inode (file, directory or symlink), calling
    /// `inserted` with it before the transaction commits: what that sets up is in place
    /// before anyone else (the write-back's query of what is due) can see the inode.
    pub fn create(
        &self,
        parent: u64,
        name: &Name,
        node: &NewNode<'_>,
        now: SystemTime,
        due: SystemTime,
        inserted: impl FnOnce(u64),
    ) -> IndexResult<Attr> {
        let _gate = self.written.gate();
        let attr = self.write_gated(|tx| {
            dir(tx, parent)?;
            if entry_of(tx, parent, name)?.is_some() {
                return Err(Refusal::Exists.into());
            }
            let (nlink, size, local) = match node.kind {
                Kind::Dir => (2, 0, 0),
                Kind::File => (1, 0, 1),
                Kind::Symlink => (1, node.target.map_or(0, |t| t.len()) as i64, 0),
                _ => (1, 0, 0),
            };
            tx.prepare_cached(
                "INSERT INTO inodes(kind, perm, uid, gid, size, mtime_ns, ctime_ns, nlink, target,
                                    local, dirty, pending, due_ns, gen, rdev)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9, ?9, 1, ?10, 1, ?11)",
            )?
            .execute(params![
                super::kind_code(node.kind),
                node.perm,
                node.uid,
                node.gid,
                size,
                to_ns(now),
                nlink,
                node.target,
                local,
                to_ns(due),
                node.rdev,
            ])?;
            let ino = tx.last_insert_rowid() as u64;
            tx.prepare_cached("INSERT INTO dentries(parent, name, ino) VALUES (?1, ?2, ?3)")?
                .execute(params![parent as i64, name.as_bytes(), ino as i64])?;
            if node.kind == Kind::Dir {
                add_nlink(tx, parent, 1)?;
            }
            touch_dir(tx, parent, now, due)?;
            let a = attr_of(tx, ino)?.ok_or(Refusal::NotFound)?;
            inserted(ino);
            Ok(a)
        })?;
        if node.kind == Kind::File {
            // The new row is dirty, pending and due, as a first write's transaction would
            // leave it, so its first writes can go to memory too (`written.rs`): a file
            // created and written costs one transaction fewer. The entry goes with the next
            // transaction if no write came before it; the first write then commits as usual.
            self.written.insert(attr.ino, attr.size, attr.mtime);
        }
        Ok(attr)
    }

    /// Adds the name `parent/name` to the existing inode `ino` (a hard link).
    pub fn link(
        &self,
        ino: u64,
        parent: u64,
        name: &Name,
        now: SystemTime,
        due: SystemTime,
    ) -> IndexResult<Attr> {
        self.write(|tx| {
            // In the order Linux checks: the new name, then what the old one is.
            let a = attr_of(tx, ino)?.ok_or(Refusal::NotFound)?;
            dir(tx, parent)?;
            if entry_of(tx, parent, name)?.is_some() {
                return Err(Refusal::Exists.into());
            }
            if a.kind == Kind::Dir {
                return Err(Refusal::NotPermitted.into());
            }
            if a.nlink == 0 {
                return Err(Refusal::NotFound.into());
            }
            tx.prepare_cached("INSERT INTO dentries(parent, name, ino) VALUES (?1, ?2, ?3)")?
                .execute(params![parent as i64, name.as_bytes(), ino as i64])?;
            add_nlink(tx, ino, 1)?;
            tx.prepare_cached("UPDATE inodes SET link_id = ?2 WHERE ino = ?1 AND link_id IS NULL")?
                .execute(params![ino as i64, new_link_id(ino, now)])?;
            set_ctime(tx, ino, now)?;
            mark(tx, ino, due)?;
            touch_dir(tx, parent, now, due)?;
            attr_of(tx, ino)?.ok_or(Refusal::NotFound.into())
        })
    }

    /// Removes the non-directory entry `parent/name`; returns the inode's attributes after.
    pub fn unlink(
        &self,
        parent: u64,
        name: &Name,
        now: SystemTime,
        due: SystemTime,
    ) -> IndexResult<Attr> {
        self.write(|tx| {
            dir(tx, parent)?;
            let a = entry_of(tx, parent, name)?.ok_or(Refusal::NotFound)?;
            if a.kind == Kind::Dir {
                return Err(Refusal::IsDir.into());
            }
            drop_entry(tx, parent, name, &a, now, due)?;
            touch_dir(tx, parent, now, due)?;
            attr_of(tx, a.ino)?.ok_or(Refusal::NotFound.into())
        })
    }

    /// Removes the empty directory `parent/name`; returns its inode number.
    pub fn rmdir(
        &self,
        parent: u64,
        name: &Name,
        now: SystemTime,
        due: SystemTime,
    ) -> IndexResult<u64> {
        self.write(|tx| {
            dir(tx, parent)?;
            let a = entry_of(tx, parent, name)?.ok_or(Refusal::NotFound)?;
            if a.kind != Kind::Dir {
                return Err(Refusal::NotDir.into());
            }
            if !is_empty_dir(tx, a.ino)? {
                return Err(Refusal::NotEmpty.into());
            }
            drop_entry(tx, parent, name, &a, now, due)?;
            touch_dir(tx, parent, now, due)?;
            Ok(a.ino)
        })
    }

    /// Renames `parent/name` to `newparent/newname`; returns the inode a replace unlinked.
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &self,
        parent: u64,
        name: &Name,
        newparent: u64,
        newname: &Name,
        mode: RenameMode,
        now: SystemTime,
        due: SystemTime,
    ) -> IndexResult<Option<u64>> {
        self.write(|tx| {
            dir(tx, parent)?;
            dir(tx, newparent)?;
            let src = entry_of(tx, parent, name)?.ok_or(Refusal::NotFound)?;
            let dst = entry_of(tx, newparent, newname)?;
            if src.kind == Kind::Dir && is_within(tx, newparent, src.ino)? {
                return Err(Refusal::Invalid.into());
            }
            let mut replaced = None;
            match (mode, &dst) {
                (RenameMode::Exchange, None) => return Err(Refusal::NotFound.into()),
                (RenameMode::Exchange, Some(d)) => {
                    if d.kind == Kind::Dir && is_within(tx, parent, d.ino)? {
                        return Err(Refusal::Invalid.into());
                    }
                    let set = "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2";
                    tx.prepare_cached(set)?.execute(params![
                        parent as i64,
                        name.as_bytes(),
                        d.ino as i64
                    ])?;
                    tx.prepare_cached(set)?.execute(params![
                        newparent as i64,
                        newname.as_bytes(),
                        src.ino as i64
                    ])?;
                    if parent != newparent {
                        let delta = |a: &Attr| (a.kind == Kind::Dir) as i64;
                        add_nlink(tx, parent, delta(d) - delta(&src))?;
                        add_nlink(tx, newparent, delta(&src) - delta(d))?;
                    }
                    for a in [&src, d] {
                        moved(tx, a, now, due)?;
                    }
                    touch_dir(tx, parent, now, due)?;
                    touch_dir(tx, newparent, now, due)?;
                    return Ok(None);
                }
                (_, Some(d)) if d.ino == src.ino => return Ok(None),
                (RenameMode::NoReplace, Some(_)) => return Err(Refusal::Exists.into()),
                (RenameMode::Replace, Some(d)) => {
                    match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                        (true, false) => return Err(Refusal::NotDir.into()),
                        (false, true) => return Err(Refusal::IsDir.into()),
                        (true, true) if !is_empty_dir(tx, d.ino)? => {
                            return Err(Refusal::NotEmpty.into())
                        }
                        _ => {}
                    }
                    drop_entry(tx, newparent, newname, d, now, due)?;
                    replaced = Some(d.ino);
                }
                (_, None) => {}
            }
            tx.prepare_cached(
                "UPDATE dentries SET parent = ?3, name = ?4 WHERE parent = ?1 AND name = ?2",
            )?
            .execute(params![
                parent as i64,
                name.as_bytes(),
                newparent as i64,
                newname.as_bytes()
            ])?;
            if src.kind == Kind::Dir && parent != newparent {
                add_nlink(tx, parent, -1)?;
                add_nlink(tx, newparent, 1)?;
            }
            moved(tx, &src, now, due)?;
            touch_dir(tx, parent, now, due)?;
            if newparent != parent {
                touch_dir(tx, newparent, now, due)?;
            }
            Ok(replaced)
        })
    }

    /// Applies a setattr; a size change marks the data dirty (the local copy already has it).
    pub fn setattr(
        &self,
        ino: u64,
        c: &AttrChanges,
        now: SystemTime,
        due: SystemTime,
    ) -> IndexResult<Attr> {
        self.write(|tx| {
            let a = attr_of(tx, ino)?.ok_or(Refusal::NotFound)?;
            tx.prepare_cached(
                "UPDATE inodes SET perm = coalesce(?2, perm), uid = coalesce(?3, uid),
                     gid = coalesce(?4, gid), size = coalesce(?5, size),
                     mtime_ns = coalesce(?6, mtime_ns), ctime_ns = ?7,
                     atime_ns = coalesce(?8, atime_ns)
                 WHERE ino = ?1",
            )?
            .execute(params![
                ino as i64,
                c.perm.map(|p| p & 0o7777),
                c.uid,
                c.gid,
                c.size.map(|s| s as i64),
                c.mtime.map(|t| to_ns(t.resolve(now))),
                to_ns(c.ctime.unwrap_or(now)),
                c.atime.map(|t| to_ns(t.resolve(now))),
            ])?;
            if c.size.is_some() {
                tx.prepare_cached("UPDATE inodes SET dirty = 1, local = 1 WHERE ino = ?1")?
                    .execute([ino as i64])?;
            }
            if ino != ROOT_INO && a.nlink > 0 {
                mark(tx, ino, due)?;
            }
            attr_of(tx, ino)?.ok_or(Refusal::NotFound.into())
        })
    }

    /// Records a write to the local copy ending at `end`: the first since the inode was
    /// last recorded marks it dirty in a transaction (a crash must not forget it), later
    /// ones only update memory (see `written.rs`).
    pub fn wrote(&self, ino: u64, end: u64, now: SystemTime, due: SystemTime) -> IndexResult<()> {
        if self.written.update(ino, end, now) {
            return Ok(());
        }
        let _gate = self.written.gate();
        if self.written.update(ino, end, now) {
            return Ok(());
        }
        let size = self.write_gated(|tx| {
            tx.prepare_cached(
                "UPDATE inodes SET size = max(size, ?2), mtime_ns = ?3, ctime_ns = ?3,
                     dirty = 1, local = 1
                 WHERE ino = ?1",
            )?
            .execute(params![ino as i64, end as i64, to_ns(now)])?;
            mark(tx, ino, due)?;
            Ok(attr_of(tx, ino)?.map(|a| a.size))
        })?;
        if let Some(size) = size {
            self.written.insert(ino, size, now);
        }
        Ok(())
    }

    /// Persists the data writes held in memory (the write-back's timer, and before an
    /// inode's upload reads it).
    pub fn persist_written(&self) -> IndexResult<()> {
        if !self.has_written() {
            return Ok(());
        }
        self.write(|_| Ok(()))
    }

    /// Whether data writes are held in memory, waiting for `persist_written` (an entry
    /// that took none, a new file's before its first write, has nothing to persist).
    pub fn has_written(&self) -> bool {
        self.written.any_writes()
    }

    /// Marks `ino` pending (the last handle of an unlinked inode closed: it can go now).
    /// Drops the row of `ino` if it has no name left (and nothing to upload).
    pub fn forget_unlinked(&self, ino: u64) -> IndexResult<()> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM inodes WHERE ino = ?1 AND nlink = 0 AND pending = 0")?
                .execute([ino as i64])?;
            tx.prepare_cached(
                "DELETE FROM stubs WHERE ino = ?1 AND ino NOT IN (SELECT ino FROM inodes)",
            )?
            .execute([ino as i64])?;
            Ok(())
        })
    }

    pub fn mark_pending(&self, ino: u64, due: SystemTime) -> IndexResult<()> {
        self.write(|tx| mark(tx, ino, due))
    }

    /// The inode's data now lives in its local file (hydrated for writing).
    pub fn set_local(&self, ino: u64) -> IndexResult<()> {
        self.write(|tx| {
            tx.prepare_cached("UPDATE inodes SET local = 1 WHERE ino = ?1")?
                .execute([ino as i64])?;
            Ok(())
        })
    }

    /// Whether the inode's data lives in its local file.
    pub fn is_local(&self, ino: u64) -> IndexResult<bool> {
        self.with_warm_conn(|c| {
            let mut st = c.prepare_cached("SELECT local FROM inodes WHERE ino = ?1")?;
            Ok(st
                .query_row([ino as i64], |r| r.get::<_, bool>(0))
                .optional()?
                .unwrap_or(false))
        })
    }
}
