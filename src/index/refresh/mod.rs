//! Applying a fresh listing to the live index: what others changed in the container since
//! the index was built becomes visible, and nothing local is lost.
//!
//! A refresh lists the container (or a subtree) into a side index with the ordinary builder,
//! so every naming rule (shadowing, markers, hard links, hidden names) is the one a mount
//! applies; `diff.rs` then walks both trees by path, merging each directory's entries in
//! name order, and `apply.rs` changes only the rows that differ. An unchanged container costs
//! reads and no writes; memory holds one stack of directories and the list of changes.
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
use super::{Finding, Index, IndexResult, Refusal, ROOT_INO};
use crate::blob::BlobRef;
use apply::Apply;
use diff::diff;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

mod apply;
mod diff;

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
                // The scope's directory may have gone since the comparison.
                if row_of(tx, start.0)?.is_none_or(|r| r.kind != DIR || r.nlink == 0) {
                    return Ok(Applied::default());
                }
                let apply = Apply::new(
                    (tx, f),
                    seen.unwrap_or_default(),
                    &self.watch,
                    is_open,
                    keep_open,
                );
                let out = apply.run(&changes)?;
                if let Some(new) = &findings {
                    replace_findings(tx, new)?;
                }
                Ok(out)
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
