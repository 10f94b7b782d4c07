//! The steps that bring one pending inode's container side up to date. Each is idempotent,
//! so an interrupted upload simply runs again:
//!
//! - a file's data goes to its *anchor* name (the blob it already has if that is still one
//!   of its names, else its first name): uploaded from the local copy when dirty, copied
//!   server-side when only the name changed, or just given new metadata;
//! - its other names (hard links) get zero-length stub blobs (`simfs_hardlink=<id>`);
//! - directories get a marker blob, symlinks a blob holding the target, special files an
//!   empty blob saying what they are;
//! - names no longer needed go to the trash and are deleted, with their ETag, afterwards.
//!
//! A blob in the way that still holds another live file's only data (two files swapped by
//! renames before either was uploaded) is first copied aside to `.simfs-moving/` under the
//! prefix and later moved to its own name, so no order of renames can lose data. Taking a
//! name from another inode needs that inode's lock (`locked`), which `upload` took.

use super::settled;
use super::{WbResult, Writeback, WritebackError};
use crate::blob::format::{blob_name_for, render, Role, KEY_PATH, KEY_WRITER};
use crate::blob::upload::upload_file;
use crate::blob::{BlobError, Expect, Metadata};
use crate::index::journal::{NameRef, PendingInode, Uploaded};
use crate::index::names::Name;
use crate::index::ROOT_INO;
use crate::posix::Kind;
use bytes::Bytes;
use std::time::{Duration, SystemTime};

/// Stub blobs of one hard-linked file written at once.
const STUBS_AT_ONCE: usize = 16;

/// How long a background upload's record waits for another transaction to carry it. While
/// files are written, a create or the next upload's start comes within a few milliseconds;
/// the upload's slot in the window and its locks are held meanwhile.
const RECORD_WITHIN: Duration = Duration::from_millis(20);

/// The record of an upload of `v` (its row stays).
fn uploaded(
    v: &PendingInode,
    blob: Option<(String, String)>,
    stubs: Vec<(String, String)>,
    uploaded_data: bool,
) -> Uploaded {
    Uploaded {
        ino: v.attr.ino,
        gen: v.gen,
        blob,
        stubs,
        uploaded_data,
        remove: false,
    }
}

/// What one upload works with.
struct Ctx<'a> {
    /// Inodes whose locks the upload holds: it may take names from these.
    locked: &'a [u64],
    /// Names this upload recorded an intent on that had none: no earlier attempt wrote them.
    fresh: Vec<String>,
}

impl Writeback {
    pub(super) fn blob_name(&self, rel: &[u8]) -> WbResult<String> {
        Ok(self.blob_name_and_path(rel)?.0)
    }

    /// The blob name for path `rel`, and its `simfs_path` when the path is too long.
    fn blob_name_and_path(&self, rel: &[u8]) -> WbResult<(String, Option<String>)> {
        let rel = std::str::from_utf8(rel)
            .map_err(|_| WritebackError::Invalid(format!("{rel:?} is not UTF-8")))?;
        Ok(blob_name_for(&self.prefix, rel))
    }

    /// `meta`, plus the path a long-path blob stands for and this mount's writer id.
    fn with_path(&self, rel: &[u8], meta: &Metadata) -> WbResult<Metadata> {
        let mut meta = self.stamped(meta);
        if let (_, Some(path)) = self.blob_name_and_path(rel)? {
            meta.insert(KEY_PATH.to_string(), path);
        }
        Ok(meta)
    }

    /// `meta` with this mount's writer id.
    fn stamped(&self, meta: &Metadata) -> Metadata {
        let mut meta = meta.clone();
        meta.insert(KEY_WRITER.to_string(), self.writer.clone());
        meta
    }

    /// Runs `write` expecting `expect` at `name`. When the service answers that the name
    /// holds another version and that version carries this mount's writer id (a write
    /// whose answer was lost, or whose result a crash kept out of the journal), the write is
    /// repeated expecting that version: every step converges instead of failing forever or
    /// raising a conflict with itself. So is a name found empty where the trash's version
    /// was expected (its delete's answer was lost). Someone else's version still fails the
    /// precondition.
    async fn converge<T, F, Fut>(&self, name: &str, expect: Expect, mut write: F) -> WbResult<T>
    where
        F: FnMut(Expect) -> Fut,
        Fut: std::future::Future<Output = WbResult<T>>,
    {
        match write(expect).await {
            Err(e) if e.is_changed() => match self.store.head(name).await {
                Ok(p) if p.metadata.get(KEY_WRITER) == Some(&self.writer) => {
                    tracing::info!("{name}: found this mount's own earlier write; continuing");
                    write(Expect::Etag(p.etag)).await
                }
                // The version expected was one in the trash, on its way out: its delete
                // went through and only the answer was lost. The name is free.
                Err(BlobError::NotFound(_)) if self.only_trashed(name)? => {
                    write(Expect::Absent).await
                }
                Ok(_) | Err(BlobError::NotFound(_)) => Err(e),
                Err(h) => Err(h.into()),
            },
            r => r,
        }
    }

    /// Whether the only claim on `name` is the trash's (its caller holds the name's lock,
    /// so the trash does not delete it meanwhile).
    fn only_trashed(&self, name: &str) -> WbResult<bool> {
        Ok(self.index.claim_on(name)?.is_some_and(|c| c.ino == 0))
    }

    /// The blob names an upload of `p` may write (the aside copies of `make_room` are
    /// unique and need no lock).
    pub(super) fn names_written(&self, p: &PendingInode) -> WbResult<Vec<String>> {
        if p.attr.ino == ROOT_INO || p.names.is_empty() {
            return Ok(Vec::new());
        }
        let paths = match p.attr.kind {
            Kind::File => &p.names[..],
            _ => &p.names[..1],
        };
        paths.iter().map(|n| self.blob_name(&n.path)).collect()
    }

    /// Other live inodes that claim one of `names` (which `ino` must write): its upload
    /// takes those names from them, so they must not upload meanwhile.
    pub(super) fn claim_holders(&self, names: &[String], ino: u64) -> WbResult<Vec<u64>> {
        let mut holders = Vec::new();
        for name in names {
            if let Some(c) = self.index.claim_on(name)? {
                if c.ino != ino && c.ino != 0 && c.live {
                    holders.push(c.ino);
                }
            }
        }
        Ok(holders)
    }

    /// The names an upload of `v` writes for the first time: until its result is recorded,
    /// they are intents (see `index::journal`). None for the root and unlinked inodes.
    pub(super) fn new_names(&self, v: &PendingInode) -> WbResult<Vec<String>> {
        if v.attr.ino == ROOT_INO || v.names.is_empty() {
            return Ok(Vec::new());
        }
        let mut new = Vec::new();
        for n in &v.names {
            let name = self.blob_name(&n.path)?;
            if v.blob.as_ref().is_none_or(|(b, _)| *b != name)
                && !v.stubs.iter().any(|(s, _)| *s == name)
            {
                new.push(name);
            }
        }
        Ok(new)
    }

    /// Brings pending inode `v` up to date; `locked` are the inodes whose locks are held,
    /// `fresh` the names of `new_names(v)` that had no intent before (the caller recorded
    /// the intents).
    pub(super) async fn apply(
        &self,
        locked: &[u64],
        v: &PendingInode,
        fresh: Vec<String>,
    ) -> WbResult<()> {
        let index = &self.index;
        let ino = v.attr.ino;
        if ino == ROOT_INO {
            return Ok(index.record_upload(Duration::ZERO, uploaded(v, None, Vec::new(), false))?);
        }
        if v.names.is_empty() {
            // Unlinked: every claimed name goes to the trash; the row goes once unused.
            let is_open = self.pins.is_open(ino);
            self.forget_stream(ino);
            let u = Uploaded {
                remove: !is_open,
                ..uploaded(v, None, Vec::new(), v.dirty)
            };
            index.record_upload(Duration::ZERO, u)?;
            // A first write that landed and was never recorded goes too.
            self.settle_intents(Some(ino), false).await?;
            if !is_open {
                self.local.remove(ino);
            }
            return Ok(());
        }
        // Until the result is recorded, a refresh listing these names must not take them
        // for others' blobs (the inode may be renamed or unlinked meanwhile).
        let names = v
            .names
            .iter()
            .map(|n| self.blob_name(&n.path))
            .collect::<WbResult<Vec<_>>>()?;
        let _writing = index.writing(names);
        let cx = Ctx { locked, fresh };
        let cx = &cx;
        let a = &v.attr;
        match a.kind {
            Kind::File => self.upload_file(cx, v).await?,
            kind => {
                let name = self.blob_name(&v.names[0].path)?;
                let (role, body) = match kind {
                    Kind::Dir => (Role::Dir, Bytes::new()),
                    Kind::Symlink => (
                        Role::Symlink,
                        Bytes::from(v.target.clone().unwrap_or_default()),
                    ),
                    k => (
                        Role::Special(k.special_name().unwrap_or("fifo"), a.rdev),
                        Bytes::new(),
                    ),
                };
                let meta = self.with_path(
                    &v.names[0].path,
                    &render(role, a.perm, a.uid, a.gid, a.mtime),
                )?;
                let etag = self.put_small(cx, ino, &name, body, &meta).await?;
                let u = uploaded(v, Some((name, etag)), Vec::new(), false);
                index.record_upload(self.record_within(), u)?;
            }
        }
        // A failed earlier attempt whose answer was lost may have written a name the inode
        // has since left (a file fsynced, then renamed): that blob goes now, not at the
        // next mount, which a node that is deallocated never has. The upload is recorded
        // whatever happens here; what cannot be settled now a drain looks at again.
        if v.failures > 0 {
            if let Err(e) = self.settle_intents(Some(ino), false).await {
                tracing::warn!("inode {ino}: settling names an earlier attempt wrote: {e}");
            }
        }
        Ok(())
    }

    /// Writes a marker or symlink blob; one simfs has not seen at the name is replaced
    /// anyway, as these carry no data of their own that could be lost.
    async fn put_small(
        &self,
        cx: &Ctx<'_>,
        ino: u64,
        name: &str,
        body: Bytes,
        meta: &Metadata,
    ) -> WbResult<String> {
        let expect = self.make_room(cx, ino, name).await?;
        match self.store.put(name, body.clone(), meta, &expect).await {
            Err(BlobError::Changed(_)) => {
                let expect = match self.store.head(name).await {
                    Ok(p) => Expect::Etag(p.etag),
                    Err(BlobError::NotFound(_)) => Expect::Absent,
                    Err(e) => return Err(e.into()),
                };
                Ok(self.store.put(name, body, meta, &expect).await?)
            }
            r => Ok(r?),
        }
    }

    /// The blob names of a file's paths, and its *anchor*: the name its data goes to (the
    /// blob it already has if that is still one of its names, else its first name).
    pub(super) fn anchor(&self, v: &PendingInode) -> WbResult<(Vec<String>, String)> {
        let mut paths = Vec::with_capacity(v.names.len());
        for n in &v.names {
            paths.push(self.blob_name(&n.path)?);
        }
        let anchor = match &v.blob {
            Some((b, _)) if paths.contains(b) => b.clone(),
            _ => paths.first().cloned().ok_or_else(|| {
                WritebackError::Invalid(format!("inode {} has no name", v.attr.ino))
            })?,
        };
        Ok((paths, anchor))
    }

    async fn upload_file(&self, cx: &Ctx<'_>, v: &PendingInode) -> WbResult<()> {
        let index = &self.index;
        let a = &v.attr;
        let ino = a.ino;
        let (paths, anchor) = self.anchor(v)?;
        let anchor_at = paths.iter().position(|p| *p == anchor).unwrap_or(0);
        let meta = self.with_path(
            &v.names[anchor_at].path,
            &render(
                Role::File(v.link_id.as_deref()),
                a.perm,
                a.uid,
                a.gid,
                a.mtime,
            ),
        )?;
        // A file written in place whose local copy still holds what its last upload
        // committed sends no data again (see `settled.rs`). The check reads the copy: a
        // file larger than one PUT is not checked while a handle may still be writing it
        // (not flushed since it opened: a database fsyncing as it goes has changed it, and
        // its commit reads the staged blocks again anyway), only from its close's flush on.
        let settled = self.settled.take(ino);
        let unchanged = match (&settled, &v.blob) {
            (Some(c), Some(b)) if v.dirty && v.local => {
                let small = c.len() <= self.opts.upload.single_put_max;
                (small || !self.pins.is_writing(ino)) && c.holds(b, &self.local.path(ino))
            }
            _ => false,
        };
        // The same metadata as well: the blob already is what this upload would make.
        let same = unchanged && settled.as_ref().is_some_and(|c| c.meta == meta);
        // What the blob will hold when no data goes up: the body it already committed.
        let kept = settled.filter(|_| unchanged).map(|c| c.parts);
        let result = if (v.dirty && !unchanged) || v.blob.is_none() {
            self.upload_local(cx, ino, &anchor, &meta, v.local).await
        } else {
            let (old, old_etag) = v.blob.clone().expect("checked above");
            if old == anchor && same {
                // A new ETag would only tell other nodes reading this version that it changed.
                Ok((old_etag, kept))
            } else if old == anchor {
                self.converge(&anchor, Expect::Etag(old_etag), |e| async {
                    let Expect::Etag(etag) = e else {
                        unreachable!("set_metadata always expects a version")
                    };
                    Ok(self.store.set_metadata(&anchor, &meta, &etag).await?)
                })
                .await
                .map(|etag| (etag, kept))
            } else {
                let expect = self.make_room(cx, ino, &anchor).await?;
                let (old, old_etag, to, m) = (&old, &old_etag, &anchor, &meta);
                let copied = self
                    .converge(to, expect, |e| async move {
                        Ok(self.store.copy(old, old_etag, to, m, &e).await?)
                    })
                    .await;
                match copied {
                    // The source is gone or changed: the local copy, if whole, still has it.
                    Err(WritebackError::Blob(BlobError::NotFound(_))) if v.local => {
                        self.upload_local(cx, ino, &anchor, &meta, true).await
                    }
                    r => r.map(|etag| (etag, kept)),
                }
            }
        };
        let (etag, parts) = match result {
            Ok(r) => r,
            Err(e) if e.is_changed() => {
                if !(v.dirty || v.local) {
                    // Only attributes changed here, and the data changed there: theirs wins
                    // and the attribute change is dropped rather than retried forever.
                    let u = uploaded(v, v.blob.clone(), v.stubs.clone(), false);
                    index.record_upload(Duration::ZERO, u)?;
                    return Err(WritebackError::Invalid(format!(
                        "{anchor} was changed in the container by someone else; the local change of its attributes was dropped"
                    )));
                }
                return Err(self.keep_both(v, &anchor, &paths)?);
            }
            Err(e) => return Err(e),
        };
        let (stubs, skipped) = match v.link_id.as_deref().filter(|_| paths.len() > 1) {
            Some(id) => self.put_stubs(cx, v, id, &paths, &anchor).await?,
            None => Default::default(),
        };
        // Names skipped that no earlier attempt wrote leave nothing to look up later.
        if !skipped.is_empty() {
            let fresh: std::collections::HashSet<&String> = cx.fresh.iter().collect();
            let unwritten: Vec<String> =
                skipped.into_iter().filter(|n| fresh.contains(n)).collect();
            if !unwritten.is_empty() {
                index.forget_intents(ino, &unwritten)?;
            }
        }
        if let Some(parts) = parts.filter(|_| unchanged || self.written_in_place(ino)) {
            let blob = anchor.clone();
            let c = settled::Committed {
                blob,
                etag: etag.clone(),
                parts,
                meta: meta.clone(),
            };
            self.settled.keep(ino, c);
        }
        let u = uploaded(v, Some((anchor, etag)), stubs, v.dirty);
        index.record_upload(self.record_within(), u)?;
        Ok(())
    }

    /// How long a finished upload's record may wait for another transaction to take it
    /// along (`index/riders.rs`): not at all while someone waits for a commit (an fsync, a
    /// sync, a close on a `sync` mount), else `RECORD_WITHIN`.
    fn record_within(&self) -> Duration {
        if self.foreground.is_waiting() {
            Duration::ZERO
        } else {
            RECORD_WITHIN
        }
    }

    /// The stub blobs of a hard-linked file's names other than its anchor: those it has are
    /// kept, the rest written, `STUBS_AT_ONCE` at a time (a file may have thousands of
    /// names, and each stub is a round trip). Returns every stub with its ETag, and the
    /// names skipped because they no longer name the file.
    async fn put_stubs(
        &self,
        cx: &Ctx<'_>,
        v: &PendingInode,
        id: &str,
        paths: &[String],
        anchor: &str,
    ) -> WbResult<(Vec<(String, String)>, Vec<String>)> {
        use futures::{StreamExt, TryStreamExt};
        let ino = v.attr.ino;
        let stub_meta = render(Role::Stub(id), 0, 0, 0, v.attr.mtime);
        let have: std::collections::HashMap<&str, &String> =
            v.stubs.iter().map(|(b, e)| (b.as_str(), e)).collect();
        let mut stubs = Vec::with_capacity(paths.len());
        let (mut missing, mut skipped) = (Vec::new(), Vec::new());
        for (p, n) in paths.iter().zip(&v.names).filter(|(p, _)| *p != anchor) {
            match have.get(p.as_str()) {
                Some(e) => stubs.push((p.clone(), (*e).clone())),
                // A name removed since this upload read the inode gets no stub: it would
                // only go to the trash again (the inode is pending again for the change).
                None if self.names_it(ino, n) => missing.push((p, n)),
                None => skipped.push(p.clone()),
            }
        }
        let written: Vec<(String, String)> = futures::stream::iter(missing)
            .map(|(p, n)| {
                let stub_meta = &stub_meta;
                async move {
                    let expect = self.make_room(cx, ino, p).await?;
                    let meta = self.with_path(&n.path, stub_meta)?;
                    let meta = &meta;
                    let e = self
                        .converge(p, expect, |e| async move {
                            Ok(self.store.put(p, Bytes::new(), meta, &e).await?)
                        })
                        .await?;
                    Ok::<_, WritebackError>((p.clone(), e))
                }
            })
            .buffer_unordered(STUBS_AT_ONCE)
            .try_collect()
            .await?;
        stubs.extend(written);
        Ok((stubs, skipped))
    }

    /// Whether `name` still names inode `ino` (an error says yes: writing a stub too many
    /// only costs its deletion later).
    fn names_it(&self, ino: u64, name: &NameRef) -> bool {
        let Ok(n) = Name::new(&name.name) else {
            return true;
        };
        match self.index.lookup(name.parent, &n) {
            Ok(Some(a)) => a.ino == ino,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    async fn upload_local(
        &self,
        cx: &Ctx<'_>,
        ino: u64,
        name: &str,
        meta: &Metadata,
        local: bool,
    ) -> WbResult<(String, Option<settled::Parts>)> {
        if !local {
            return Err(WritebackError::Invalid(format!(
                "inode {ino} has neither a blob nor a local copy"
            )));
        }
        let expect = self.make_room(cx, ino, name).await?;
        let path = self.local.path(ino);
        // With the ETag, the parts of the body committed and their checksums (`settled.rs`),
        // from the attempt that committed.
        self.converge(name, expect, |e| {
            let path = &path;
            async move {
                // Blocks staged while the file was written are reused; a list the service
                // refuses (it dropped them: another commit to the name) falls back to a
                // whole upload, unless the name holds another version (a conflict).
                match self.commit_stream(ino, name, path, meta, &e).await {
                    Some(Ok(committed)) => return Ok(committed),
                    Some(Err(err)) if err.is_changed() => return Err(err.into()),
                    Some(Err(err)) => {
                        tracing::info!(
                            "{name}: the staged blocks were refused ({err}); uploading whole"
                        )
                    }
                    None => {}
                }
                let (etag, parts) =
                    upload_file(self.store.as_ref(), name, path, meta, &e, &self.opts.upload)
                        .await?;
                Ok((etag, Some(parts)))
            }
        })
        .await
    }

    /// What a write to `name` must expect, after moving aside a blob that holds another
    /// live file's only copy.
    async fn make_room(&self, cx: &Ctx<'_>, ino: u64, name: &str) -> WbResult<Expect> {
        let index = &self.index;
        let Some(c) = index.claim_on(name)? else {
            return Ok(Expect::Absent);
        };
        if c.ino == ino || c.ino == 0 || !c.live {
            return Ok(Expect::Etag(c.etag));
        }
        if !cx.locked.contains(&c.ino) {
            // Another upload claimed the name after `upload` checked: try again later.
            return Err(WritebackError::Invalid(format!(
                "{name:?} was claimed by inode {} meanwhile; will retry",
                c.ino
            )));
        }
        if c.stub || c.kind != Kind::File || c.local {
            // The other inode can rewrite this from the index or its local copy.
            index.move_claim(c.ino, name, None)?;
            return Ok(Expect::Etag(c.etag));
        }
        let nanos = crate::posix::to_ns(SystemTime::now());
        let aside = format!("{}.simfs-moving/{}-{nanos}", self.prefix, c.ino);
        let e = self
            .store
            .copy(
                name,
                &c.etag,
                &aside,
                &self.stamped(&Metadata::new()),
                &Expect::Absent,
            )
            .await?;
        index.move_claim(c.ino, name, Some((&aside, &e)))?;
        Ok(Expect::Etag(c.etag))
    }
}
