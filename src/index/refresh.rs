//! Applying a fresh listing to the live index: what others changed in the container since
//! the index was built becomes visible, and nothing local is lost.
//!
//! A refresh lists the container (or a subtree) into a side index with the ordinary builder,
//! so every naming rule (shadowing, markers, hard links, hidden names) is the one a mount
//! applies; this module then walks both trees by path, merging each directory's entries in
//! name order, and changes only the rows that differ. An unchanged container costs reads and
//! no writes; memory holds one stack of directories and the list of changes.
//!
//! Local changes win. An inode that is pending or dirty is left alone, and so is anything a
//! transaction touched after the refresh began (`Watch`): the listing may predate it. A name
//! the listing has and the index lacks is not added to a directory touched meanwhile (a local
//! unlink may have deleted it after the listing saw it), nor when its blob is this node's own
//! doing not yet settled: waiting in, or just out of, the trash; claimed by an inode here
//! (renamed or unlinked here before write-back moved or deleted the blob); or being written
//! by write-back right now (its result not yet recorded). A directory the listing only
//! implies (no marker blob) is added only when something below it is: `rm -rf` of an uploaded
//! tree must not bring its directories back, empty, while the deletions are on their way.
//! What is skipped is picked up by the next refresh. A local copy (`local`) that is clean
//! gives way to the container's new version unless a handle has it open.
//!
//! The comparison runs on read connections; the changes are made in one transaction that
//! checks each of them again, so a local change made between the two still wins. The caller
//! gets back what to tell the kernel and which cached copies no longer match their blob.

use super::names::Name;
use super::{Finding, Index, IndexError, IndexResult, Refusal, ROOT_INO};
use crate::blob::BlobRef;
use crate::posix::to_ns;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

const DIR: i64 = 1;
const FILE: i64 = 2;

#[derive(Default)]
struct Seen {
    inodes: HashSet<u64>,
    /// Blobs whose deletion completed (left the trash).
    deleted: HashSet<String>,
}

/// What changed locally while a refresh was under way, and which blobs write-back is
/// writing.
#[derive(Default)]
pub(super) struct Watch {
    seen: Arc<Mutex<Option<Seen>>>,
    /// Blob names being written, with how many writers each.
    writing: Mutex<HashMap<String, usize>>,
}

/// Blob names write-back is writing; they stop counting as such when this is dropped,
/// which must be after the write's result is recorded in the index.
pub struct Writing<'a> {
    watch: &'a Watch,
    names: Vec<String>,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut w = self.watch.writing();
        for n in &self.names {
            if let Some(c) = w.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    w.remove(n);
                }
            }
        }
    }
}

impl Watch {
    fn writing(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_writing(&self, blob: &str) -> bool {
        self.writing().contains_key(blob)
    }

    /// What records an `inodes` row the writer connection inserts, updates or deletes (its
    /// update hook calls it).
    pub(super) fn recorder(&self) -> impl Fn(u64) + Send + 'static {
        let seen = self.seen.clone();
        move |ino| {
            if let Some(s) = seen.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                s.inodes.insert(ino);
            }
        }
    }

    fn with(&self, f: impl FnOnce(&mut Option<Seen>)) {
        f(&mut self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn deleted_blob(&self, blob: &str) {
        self.with(|s| {
            if let Some(s) = s {
                s.deleted.insert(blob.to_string());
            }
        })
    }
}

/// Recording of local changes for one refresh; it stops when dropped.
pub struct Watching<'a>(&'a Watch);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.with(|s| *s = None);
    }
}

/// The part of the tree a fresh listing covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything below this directory (names from the root; empty for the root).
    Dir(Vec<Name>),
    /// The entry `name` of this directory, and everything below it.
    Entry(Vec<Name>, Name),
}

impl Scope {
    /// The names to list, relative to the mount's prefix.
    pub fn listing_prefix(&self) -> String {
        let join = |p: &[Name]| {
            p.iter()
                .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join("/")
        };
        match self {
            Scope::Dir(p) if p.is_empty() => String::new(),
            Scope::Dir(p) => format!("{}/", join(p)),
            Scope::Entry(p, n) if p.is_empty() => join(std::slice::from_ref(n)),
            Scope::Entry(p, n) => format!("{}/{}", join(p), join(std::slice::from_ref(n))),
        }
    }

    fn dir(&self) -> &[Name] {
        match self {
            Scope::Dir(p) | Scope::Entry(p, _) => p,
        }
    }
}

/// What a refresh changed, and what the caller must do about it after the commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
    /// Remote changes not applied because the local side changed (next refresh retries).
    pub kept_local: u64,
    /// Names whose entry changed: (directory, name), for the kernel's dentry cache.
    pub names: Vec<(u64, Vec<u8>)>,
    /// Inodes whose attributes or data changed, directories whose entries changed included.
    pub inodes: Vec<u64>,
    /// Cached copies of versions the container no longer has.
    pub stale: Vec<(u64, BlobRef)>,
    /// Inodes whose local copy is no longer theirs (the container's newer version won).
    pub unlocal: Vec<u64>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.added + self.changed + self.removed == 0
    }
}

#[derive(Clone, Debug)]
struct Row {
    ino: u64,
    kind: i64,
    perm: i64,
    uid: i64,
    gid: i64,
    size: i64,
    mtime_ns: i64,
    blob: Option<String>,
    etag: Option<String>,
    md5: Option<Vec<u8>>,
    target: Option<Vec<u8>>,
    link_id: Option<String>,
    rdev: i64,
    pending: bool,
    dirty: bool,
    local: bool,
    nlink: i64,
}

const COLS: &str = "i.ino, i.kind, i.perm, i.uid, i.gid, i.size, i.mtime_ns, i.blob, i.etag,
     i.md5, i.target, i.link_id, i.rdev, i.pending, i.dirty, i.local, i.nlink";

fn read_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Row> {
    Ok(Row {
        ino: r.get::<_, i64>(at)? as u64,
        kind: r.get(at + 1)?,
        perm: r.get(at + 2)?,
        uid: r.get(at + 3)?,
        gid: r.get(at + 4)?,
        size: r.get(at + 5)?,
        mtime_ns: r.get(at + 6)?,
        blob: r.get(at + 7)?,
        etag: r.get(at + 8)?,
        md5: r.get(at + 9)?,
        target: r.get(at + 10)?,
        link_id: r.get(at + 11)?,
        rdev: r.get(at + 12)?,
        pending: r.get(at + 13)?,
        dirty: r.get(at + 14)?,
        local: r.get(at + 15)?,
        nlink: r.get(at + 16)?,
    })
}

impl Row {
    /// Whether the container's side of this node differs from `fresh`'s. The MD5 is not
    /// compared (an upload records none) and a directory's size means nothing.
    fn differs(&self, f: &Row) -> bool {
        self.kind != f.kind
            || self.perm != f.perm
            || self.uid != f.uid
            || self.gid != f.gid
            || self.mtime_ns != f.mtime_ns
            || !self.same_version(f)
            || self.target != f.target
            || self.rdev != f.rdev
            || (self.kind != DIR && self.size != f.size)
    }

    /// The same blob at the same ETag. Indexes written before ETags were kept unquoted
    /// hold uploads' ETags in quotes; a listing never quotes them.
    fn same_version(&self, f: &Row) -> bool {
        let unquoted = |e: &Option<String>| e.as_deref().map(|e| e.trim_matches('"').to_string());
        self.blob == f.blob && unquoted(&self.etag) == unquoted(&f.etag)
    }

    fn blob_ref(&self) -> Option<BlobRef> {
        Some(BlobRef {
            name: self.blob.clone()?,
            etag: self.etag.clone().unwrap_or_default(),
            size: self.size.max(0) as u64,
            content_md5: self.md5.clone(),
        })
    }
}

fn row_of(c: &Connection, ino: u64) -> IndexResult<Option<Row>> {
    let mut st = c.prepare_cached(&format!("SELECT {COLS} FROM inodes i WHERE i.ino = ?1"))?;
    Ok(st.query_row([ino as i64], |r| read_row(r, 0)).optional()?)
}

fn child(c: &Connection, parent: u64, name: &[u8]) -> IndexResult<Option<Row>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS} FROM dentries d JOIN inodes i ON i.ino = d.ino
         WHERE d.parent = ?1 AND d.name = ?2"
    ))?;
    Ok(st
        .query_row(params![parent as i64, name], |r| read_row(r, 0))
        .optional()?)
}

/// The names and inodes of directory `dir`.
fn entries(c: &Connection, dir: u64) -> IndexResult<Vec<(Vec<u8>, u64)>> {
    let mut st = c.prepare_cached("SELECT name, ino FROM dentries WHERE parent = ?1")?;
    let rows = st.query_map([dir as i64], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The directory at `path` below the root, if there is one.
fn resolve_dir(c: &Connection, path: &[Name]) -> IndexResult<Option<u64>> {
    let mut ino = ROOT_INO;
    for n in path {
        match child(c, ino, n.as_bytes())? {
            Some(r) if r.kind == DIR => ino = r.ino,
            _ => return Ok(None),
        }
    }
    Ok(Some(ino))
}

enum Change {
    Update {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
        fresh: Row,
    },
    Add {
        parent: u64,
        name: Vec<u8>,
        fresh: u64,
    },
    Remove {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
    },
}

/// Compares one name on both sides; directories on both sides go on `dirs` to descend.
fn diff_entry(
    parent: u64,
    name: Vec<u8>,
    l: Option<Row>,
    f: Option<Row>,
    dirs: &mut Vec<(u64, Option<u64>)>,
    out: &mut Vec<Change>,
) {
    match (l, f) {
        (Some(l), Some(f)) if l.kind == f.kind => {
            if l.kind == DIR {
                dirs.push((l.ino, Some(f.ino)));
            }
            if l.differs(&f) {
                out.push(Change::Update {
                    parent,
                    name,
                    ino: l.ino,
                    fresh: f,
                });
            }
        }
        (Some(l), Some(f)) => {
            out.push(Change::Remove {
                parent,
                name: name.clone(),
                ino: l.ino,
            });
            out.push(Change::Add {
                parent,
                name,
                fresh: f.ino,
            });
        }
        (Some(l), None) => out.push(Change::Remove {
            parent,
            name,
            ino: l.ino,
        }),
        (None, Some(f)) => out.push(Change::Add {
            parent,
            name,
            fresh: f.ino,
        }),
        (None, None) => {}
    }
}

/// The changes that make the live tree under `start` look like the fresh one. Each
/// directory's entries are merged from two name-ordered queries, one row at a time.
fn diff(
    live: &Connection,
    fresh: &Connection,
    scope: &Scope,
    (ldir, fdir): (u64, Option<u64>),
) -> IndexResult<Vec<Change>> {
    let mut out = Vec::new();
    let mut dirs = Vec::new();
    match scope {
        Scope::Dir(_) => dirs.push((ldir, fdir)),
        Scope::Entry(_, name) => {
            let n = name.as_bytes();
            let f = match fdir {
                Some(fd) => child(fresh, fd, n)?,
                None => None,
            };
            diff_entry(
                ldir,
                n.to_vec(),
                child(live, ldir, n)?,
                f,
                &mut dirs,
                &mut out,
            );
        }
    }
    let sql = format!(
        "SELECT d.name, {COLS} FROM dentries d JOIN inodes i ON i.ino = d.ino
         WHERE d.parent = ?1 ORDER BY d.name"
    );
    while let Some((ld, fd)) = dirs.pop() {
        let mut lst = live.prepare(&sql)?;
        let mut fst = fresh.prepare(&sql)?;
        let read = |r: &rusqlite::Row<'_>| Ok((r.get::<_, Vec<u8>>(0)?, read_row(r, 1)?));
        let mut lrows = lst.query_map([ld as i64], read)?.peekable();
        let mut frows = fst
            .query_map([fd.map(|f| f as i64).unwrap_or(-1)], read)?
            .peekable();
        loop {
            let order = match (lrows.peek(), frows.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(Ok((a, _))), Some(Ok((b, _)))) => a.cmp(b),
                // An error is taken (and returned) below.
                (Some(Err(_)), _) => std::cmp::Ordering::Less,
                (_, Some(Err(_))) => std::cmp::Ordering::Greater,
            };
            let (name, l, f) = match order {
                std::cmp::Ordering::Less => {
                    let (n, l) = lrows.next().expect("peeked")?;
                    (n, Some(l), None)
                }
                std::cmp::Ordering::Greater => {
                    let (n, f) = frows.next().expect("peeked")?;
                    (n, None, Some(f))
                }
                std::cmp::Ordering::Equal => {
                    let (n, l) = lrows.next().expect("peeked")?;
                    let (_, f) = frows.next().expect("peeked")?;
                    (n, Some(l), Some(f))
                }
            };
            diff_entry(ld, name, l, f, &mut dirs, &mut out);
        }
    }
    Ok(out)
}

/// The changes of one refresh being made in the writer's transaction.
struct Apply<'a> {
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

impl Apply<'_> {
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

impl Index {
    /// Marks `names` as being written by write-back until the guard is dropped: a refresh
    /// meanwhile does not add them as others' blobs (see the module paragraph).
    pub fn writing(&self, names: Vec<String>) -> Writing<'_> {
        let mut w = self.watch.writing();
        for n in &names {
            *w.entry(n.clone()).or_default() += 1;
        }
        drop(w);
        Writing {
            watch: &self.watch,
            names,
        }
    }

    /// Starts recording local changes for a refresh whose listing begins now.
    pub fn watch_changes(&self) -> Watching<'_> {
        self.watch.with(|s| *s = Some(Seen::default()));
        Watching(&self.watch)
    }

    /// The scope that covers `path` (names from the root): the directory itself when the
    /// index has one there; otherwise the entry below its deepest existing directory that
    /// starts the path (the rest is new, or no longer a directory).
    pub fn scope_for(&self, path: &[Name]) -> IndexResult<Scope> {
        self.with_conn(|c| {
            let mut ino = ROOT_INO;
            for (i, n) in path.iter().enumerate() {
                match child(c, ino, n.as_bytes())? {
                    Some(r) if r.kind == DIR => ino = r.ino,
                    Some(_) if i + 1 < path.len() => return Err(Refusal::NotDir.into()),
                    _ => return Ok(Scope::Entry(path[..i].to_vec(), n.clone())),
                }
            }
            Ok(Scope::Dir(path.to_vec()))
        })
    }

    /// The symlink target this index holds for blob `name` at `etag`.
    pub fn known_target(&self, name: &str, etag: &str) -> Option<Vec<u8>> {
        self.with_conn(|c| {
            let mut st = c.prepare_cached(
                "SELECT target FROM inodes WHERE blob = ?1 AND etag = ?2 AND target IS NOT NULL",
            )?;
            Ok(st.query_row([name, etag], |r| r.get(0)).optional()?)
        })
        .ok()
        .flatten()
    }

    /// Makes `scope` of this index match `fresh` (a complete index of that scope's listing),
    /// except where the local side changed. `is_open` says whether a handle has an inode
    /// open; with `keep_open`, a file that is open and has a new version in the container
    /// becomes a new inode (its handles keep the old one), else it is updated in place. The
    /// whole change is one transaction.
    pub fn refresh_from(
        &self,
        fresh: &Index,
        scope: &Scope,
        is_open: &dyn Fn(u64) -> bool,
        keep_open: bool,
    ) -> IndexResult<Applied> {
        let (start, changes) = self.with_conn(|live| {
            fresh.with_conn(|f| {
                let ldir = resolve_dir(live, scope.dir())?.ok_or(Refusal::NotFound)?;
                let start = (ldir, resolve_dir(f, scope.dir())?);
                Ok((start, diff(live, f, scope, start)?))
            })
        })?;
        let findings = match scope {
            Scope::Dir(p) if p.is_empty() => {
                let (old, new) = (self.findings()?, fresh.findings()?);
                (old != new).then_some(new)
            }
            _ => None,
        };
        if changes.is_empty() && findings.is_none() {
            return Ok(Applied::default());
        }
        fresh.with_conn(|f| {
            self.write(|tx| {
                let seen = self
                    .watch
                    .seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                let mut a = Apply {
                    tx,
                    fresh: f,
                    seen: seen.unwrap_or_default(),
                    watch: &self.watch,
                    is_open,
                    keep_open,
                    now: to_ns(SystemTime::now()),
                    out: Applied::default(),
                    dirs: BTreeSet::new(),
                    updated: HashSet::new(),
                };
                // The scope's directory may have gone since the comparison.
                if row_of(tx, start.0)?.is_none_or(|r| r.kind != DIR || r.nlink == 0) {
                    return Ok(a.out);
                }
                for c in &changes {
                    match c {
                        Change::Update {
                            parent,
                            name,
                            ino,
                            fresh,
                        } => a.update(*parent, name, *ino, fresh)?,
                        Change::Add {
                            parent,
                            name,
                            fresh,
                        } => a.add(*parent, name, *fresh)?,
                        Change::Remove { parent, name, ino } => {
                            a.remove(*parent, name, *ino)?;
                        }
                    }
                }
                a.recount_dirs()?;
                if let Some(new) = &findings {
                    replace_findings(tx, new)?;
                }
                Ok(a.out)
            })
        })
    }
}

fn replace_findings(tx: &Connection, new: &[Finding]) -> IndexResult<()> {
    tx.execute("DELETE FROM findings", [])?;
    let mut st =
        tx.prepare_cached("INSERT INTO findings(blob, hidden, reason) VALUES (?1, ?2, ?3)")?;
    for f in new {
        st.execute(params![f.blob, f.hidden, f.reason])?;
    }
    Ok(())
}
