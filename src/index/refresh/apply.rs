//! Making a refresh's changes in the writer's transaction, each checked again first: a
//! local change made since the comparison wins (see the parent module's paragraph on what
//! is left alone and why). Updates, additions and removals keep hard links, stubs and
//! cached copies consistent; directories whose entries changed get their link count
//! recounted at the end.

use super::diff::Change;
use super::{child, entries, read_row, row_of, Applied, Row, Seen, Watch, COLS, DIR, FILE};
use crate::index::{IndexError, IndexResult};
use crate::posix::to_ns;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeSet, HashSet};
use std::time::SystemTime;

/// The changes of one refresh being made in the writer's transaction.
pub(super) struct Apply<'a> {
    tx: &'a Connection,
    fresh: &'a Connection,
    seen: Seen,
    watch: &'a Watch,
    is_open: &'a dyn Fn(u64) -> bool,
    /// Whether a file that is open gets a new inode for its new version (else in place).
    keep_open: bool,
    now: i64,
    out: Applied,
    /// Directories whose entries changed (their link count is recounted at the end).
    dirs: BTreeSet<u64>,
    updated: HashSet<u64>,
}

impl<'a> Apply<'a> {
    /// The changes about to be made in `tx`, from the listing's index `fresh`; `is_open`
    /// says whether a handle has an inode open.
    pub(super) fn new(
        (tx, fresh): (&'a Connection, &'a Connection),
        seen: Seen,
        watch: &'a Watch,
        is_open: &'a dyn Fn(u64) -> bool,
        keep_open: bool,
    ) -> Self {
        Apply {
            tx,
            fresh,
            seen,
            watch,
            is_open,
            keep_open,
            now: to_ns(SystemTime::now()),
            out: Applied::default(),
            dirs: BTreeSet::new(),
            updated: HashSet::new(),
        }
    }

    /// Makes `changes`, each checked again first; what was applied.
    pub(super) fn run(mut self, changes: &[Change]) -> IndexResult<Applied> {
        for c in changes {
            match c {
                Change::Update {
                    parent,
                    name,
                    ino,
                    fresh,
                } => self.update(*parent, name, *ino, fresh)?,
                Change::Add {
                    parent,
                    name,
                    fresh,
                } => self.add(*parent, name, *fresh)?,
                Change::Remove { parent, name, ino } => {
                    self.remove(*parent, name, *ino)?;
                }
            }
        }
        self.recount_dirs()?;
        Ok(self.out)
    }

    /// Whether the container's version may replace the local state of `r`.
    fn may_change(&self, r: &Row) -> bool {
        let open_local = r.local && (self.is_open)(r.ino);
        !(r.pending || r.dirty || open_local || self.seen.inodes.contains(&r.ino))
    }

    /// Whether this index deleted `blob` and the container may still show it.
    fn deleted_here(&self, blob: &str) -> IndexResult<bool> {
        if self.seen.deleted.contains(blob) {
            return Ok(true);
        }
        let mut st = self
            .tx
            .prepare_cached("SELECT 1 FROM trash WHERE blob = ?1")?;
        Ok(st.query_row([blob], |_| Ok(())).optional()?.is_some())
    }

    /// Whether `blob` is this node's own doing, not yet settled: deleted here, claimed by an
    /// inode here (which then has it under another name, or none), or being written. Such a
    /// blob in the listing is not a new entry.
    fn ours_unsettled(&self, blob: &str) -> IndexResult<bool> {
        if self.deleted_here(blob)? || self.watch.is_writing(blob) {
            return Ok(true);
        }
        let mut st = self.tx.prepare_cached(
            "SELECT 1 FROM inodes WHERE blob = ?1 UNION ALL SELECT 1 FROM stubs WHERE blob = ?1
             LIMIT 1",
        )?;
        Ok(st.query_row([blob], |_| Ok(())).optional()?.is_some())
    }

    /// The hard-linked inode of this index that the fresh node `f` is one more name of.
    fn known_link(&self, f: &Row) -> IndexResult<Option<i64>> {
        let (Some(id), true) = (&f.link_id, f.kind != DIR) else {
            return Ok(None);
        };
        Ok(self
            .tx
            .prepare_cached("SELECT ino FROM inodes WHERE link_id = ?1 AND nlink > 0 LIMIT 1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }

    /// Whether inserting the fresh node `fresh` would show anything: a blob that is not this
    /// node's own unsettled doing, or, for a directory the listing only implies, such a blob
    /// somewhere below it.
    fn would_show(&self, fresh: u64) -> IndexResult<bool> {
        let Some(f) = row_of(self.fresh, fresh)? else {
            return Ok(false);
        };
        match &f.blob {
            Some(b) if self.deleted_here(b)? => Ok(false),
            Some(_) if self.known_link(&f)?.is_some() => Ok(true),
            Some(b) => Ok(!self.ours_unsettled(b)?),
            None if f.kind == DIR => {
                for (_, c) in entries(self.fresh, fresh)? {
                    if self.would_show(c)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            None => Ok(true),
        }
    }

    fn entry_changed(&mut self, parent: u64, name: &[u8]) {
        self.out.names.push((parent, name.to_vec()));
        self.dirs.insert(parent);
    }

    /// Makes `ino`'s extra hard-link names (stubs) those of the fresh inode.
    fn copy_stubs(&self, ino: u64, fresh: u64) -> IndexResult<()> {
        self.tx
            .prepare_cached("DELETE FROM stubs WHERE ino = ?1")?
            .execute([ino as i64])?;
        let mut st = self
            .fresh
            .prepare_cached("SELECT blob, etag FROM stubs WHERE ino = ?1")?;
        let stubs = st
            .query_map([fresh as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        for (blob, etag) in stubs {
            self.tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO stubs(blob, ino, etag) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![blob, ino as i64, etag])?;
        }
        Ok(())
    }

    fn update(&mut self, parent: u64, name: &[u8], ino: u64, f: &Row) -> IndexResult<()> {
        let Some(l) = row_of(self.tx, ino)? else {
            return Ok(());
        };
        if l.kind != f.kind || l.nlink == 0 || !self.updated.insert(ino) {
            return Ok(());
        }
        if !self.may_change(&l) {
            self.out.kept_local += 1;
            return Ok(());
        }
        tracing::trace!(
            "refresh: inode {ino} {:?}: local {:?} container {:?}",
            String::from_utf8_lossy(name),
            (&l.blob, &l.etag, l.perm, l.mtime_ns, l.size, l.uid, l.gid),
            (&f.blob, &f.etag, f.perm, f.mtime_ns, f.size, f.uid, f.gid)
        );
        let new_data = !l.same_version(f);
        if l.kind == FILE && new_data && l.nlink == 1 && self.keep_open && (self.is_open)(ino) {
            // Open handles keep the version they opened, page cache included: the new
            // version is a new inode under the same name, as after a rename over the file.
            if self.remove(parent, name, ino)? {
                self.insert(parent, name, f.ino)?;
                // Counted as what it is to the user: one changed file.
                self.out.removed -= 1;
                self.out.added = self.out.added.saturating_sub(1);
                self.out.changed += 1;
            }
            return Ok(());
        }
        self.tx
            .prepare_cached(
                "UPDATE inodes SET perm = ?2, uid = ?3, gid = ?4, size = ?5, mtime_ns = ?6,
                     ctime_ns = ?7, blob = ?8, etag = ?9, md5 = ?10, target = ?11,
                     link_id = ?12, rdev = ?13, local = 0
                 WHERE ino = ?1",
            )?
            .execute(params![
                ino as i64, f.perm, f.uid, f.gid, f.size, f.mtime_ns, self.now, f.blob, f.etag,
                f.md5, f.target, f.link_id, f.rdev
            ])?;
        if l.link_id.is_some() || f.link_id.is_some() {
            self.copy_stubs(ino, f.ino)?;
        }
        if l.local {
            self.out.unlocal.push(ino);
        }
        if l.kind == FILE && new_data {
            self.out.stale.extend(l.blob_ref().map(|b| (ino, b)));
        }
        self.out.inodes.push(ino);
        self.out.changed += 1;
        Ok(())
    }

    fn add(&mut self, parent: u64, name: &[u8], fresh: u64) -> IndexResult<()> {
        let live_dir = row_of(self.tx, parent)?.is_some_and(|p| p.kind == DIR && p.nlink > 0);
        if !live_dir {
            return Ok(());
        }
        if self.seen.inodes.contains(&parent) || child(self.tx, parent, name)?.is_some() {
            self.out.kept_local += 1;
            return Ok(());
        }
        self.insert(parent, name, fresh)
    }

    /// Copies the fresh node `fresh` (and all below it) in as `parent/name`.
    fn insert(&mut self, parent: u64, name: &[u8], fresh: u64) -> IndexResult<()> {
        let f = row_of(self.fresh, fresh)?
            .ok_or_else(|| IndexError::Corrupt(format!("fresh listing lacks inode {fresh}")))?;
        if !self.would_show(fresh)? {
            self.out.kept_local += 1;
            return Ok(());
        }
        let dentry = "INSERT INTO dentries(parent, name, ino) VALUES (?1, ?2, ?3)";
        // One more name of a hard-linked inode this index has already.
        if let Some(ino) = self.known_link(&f)? {
            self.tx
                .prepare_cached(dentry)?
                .execute(params![parent as i64, name, ino])?;
            self.tx
                .prepare_cached(
                    "UPDATE inodes SET nlink = nlink + 1, ctime_ns = ?2 WHERE ino = ?1",
                )?
                .execute(params![ino, self.now])?;
            self.copy_stubs(ino as u64, fresh)?;
            self.out.inodes.push(ino as u64);
            self.entry_changed(parent, name);
            self.out.added += 1;
            return Ok(());
        }
        self.tx
            .prepare_cached(
                "INSERT INTO inodes(kind, perm, uid, gid, size, mtime_ns, ctime_ns, nlink, blob,
                                    etag, md5, target, link_id, rdev)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                f.kind,
                f.perm,
                f.uid,
                f.gid,
                f.size,
                f.mtime_ns,
                self.now,
                if f.kind == DIR { 2 } else { 1 },
                f.blob,
                f.etag,
                f.md5,
                f.target,
                f.link_id,
                f.rdev
            ])?;
        let ino = self.tx.last_insert_rowid() as u64;
        self.tx
            .prepare_cached(dentry)?
            .execute(params![parent as i64, name, ino as i64])?;
        self.copy_stubs(ino, fresh)?;
        self.entry_changed(parent, name);
        self.out.added += 1;
        if f.kind == DIR {
            for (n, c) in entries(self.fresh, fresh)? {
                self.insert(ino, &n, c)?;
            }
        }
        Ok(())
    }

    /// Removes `parent/name` (inode `ino`) and what lies below it, except what changed
    /// locally; returns whether the entry went.
    fn remove(&mut self, parent: u64, name: &[u8], ino: u64) -> IndexResult<bool> {
        let Some(l) = child(self.tx, parent, name)?.filter(|l| l.ino == ino) else {
            return Ok(false);
        };
        if !self.may_change(&l) {
            self.out.kept_local += 1;
            return Ok(false);
        }
        if l.kind == DIR {
            let mut all = true;
            for (n, c) in entries(self.tx, ino)? {
                all &= self.remove(ino, &n, c)?;
            }
            if !all {
                return Ok(false);
            }
        }
        self.tx
            .prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")?
            .execute(params![parent as i64, name])?;
        self.entry_changed(parent, name);
        self.out.removed += 1;
        self.out.inodes.push(ino);
        if l.nlink > 1 && l.kind != DIR {
            // Another name of a hard-linked inode remains: it keeps the group's blobs.
            self.tx
                .prepare_cached(
                    "UPDATE inodes SET nlink = nlink - 1, ctime_ns = ?2 WHERE ino = ?1",
                )?
                .execute(params![ino as i64, self.now])?;
            let group: Option<Row> = match &l.link_id {
                Some(id) => {
                    let mut st = self.fresh.prepare_cached(&format!(
                        "SELECT {COLS} FROM inodes i WHERE i.link_id = ?1 LIMIT 1"
                    ))?;
                    st.query_row([id], |r| read_row(r, 0)).optional()?
                }
                None => None,
            };
            if let Some(f) = group {
                self.tx
                    .prepare_cached("UPDATE inodes SET blob = ?2, etag = ?3 WHERE ino = ?1")?
                    .execute(params![ino as i64, f.blob, f.etag])?;
                self.copy_stubs(ino, f.ino)?;
            }
            return Ok(true);
        }
        self.tx
            .prepare_cached("DELETE FROM stubs WHERE ino = ?1")?
            .execute([ino as i64])?;
        if (self.is_open)(ino) {
            // Open handles keep reading the version they opened; the row goes with the
            // last close, as after a local unlink.
            self.tx
                .prepare_cached(
                    "UPDATE inodes SET nlink = 0, blob = NULL, etag = NULL, ctime_ns = ?2
                     WHERE ino = ?1",
                )?
                .execute(params![ino as i64, self.now])?;
        } else {
            self.tx
                .prepare_cached("DELETE FROM inodes WHERE ino = ?1")?
                .execute([ino as i64])?;
            if l.local {
                self.out.unlocal.push(ino);
            }
        }
        if l.kind == FILE {
            self.out.stale.extend(l.blob_ref().map(|b| (ino, b)));
        }
        Ok(true)
    }

    /// Recounts the link count (2 + subdirectories) of every directory whose entries changed.
    fn recount_dirs(&mut self) -> IndexResult<()> {
        for &d in &self.dirs {
            self.tx
                .prepare_cached(
                    "UPDATE inodes SET nlink = 2 + (SELECT count(*) FROM dentries d
                         JOIN inodes c ON c.ino = d.ino WHERE d.parent = ?1 AND c.kind = ?2),
                         ctime_ns = ?3
                     WHERE ino = ?1 AND kind = ?2 AND nlink > 0",
                )?
                .execute(params![d as i64, DIR, self.now])?;
            self.out.inodes.push(d);
        }
        Ok(())
    }
}
