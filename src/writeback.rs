//! Write-back: makes the container match the index, pending inode by pending inode.
//!
//! The index says what each inode should look like (its names, attributes, local data); the
//! container is brought there by idempotent steps, so an interrupted sync simply runs again:
//!
//! - a file's data goes to its *anchor* name (the blob it already has if that is still one
//!   of its names, else its first name): uploaded from the local copy when dirty, copied
//!   server-side when only the name changed, or just given new metadata;
//! - its other names (hard links) get zero-length stub blobs (`simfs_hardlink=<id>`);
//! - directories get a marker blob, symlinks a blob holding the target, special files an
//!   empty blob saying what they are;
//! - names no longer needed go to the trash and are deleted, with their ETag, afterwards.
//!
//! Every write names the ETag simfs last saw at the target (see `index::journal`). A name
//! simfs has never seen holding a blob is a conflict: the local file is renamed to
//! `<name>.conflict-<time>` and uploaded there, the other writer's blob stays where it is,
//! and the close or fsync that found it fails with EIO. Nothing is overwritten unseen and
//! nothing is dropped.
//!
//! A blob in the way that still holds another live file's only data (two files swapped by
//! renames before either was synced) is first copied aside to `.simfs-moving/` under the
//! prefix and later moved to its own name, so no order of renames can lose data.
//!
//! Syncs of different inodes run side by side (one lock per inode keeps close, fsync and
//! the background from syncing the same inode twice at once). Only a sync that must take a
//! name from another inode runs alone, so that the other inode's sync cannot act on the
//! name it is losing.

use crate::blob::format::{blob_name_for, render, Role, KEY_PATH};
use crate::blob::upload::{upload_file, UploadError, UploadOptions};
use crate::blob::{BlobError, BlobStore, Expect, Metadata};
use crate::cache::Cache;
use crate::index::journal::SyncView;
use crate::index::names::Name;
use crate::index::write::RenameMode;
use crate::index::{Index, IndexError, Kind, ROOT_INO};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("uploading: {0}")]
    Upload(#[from] UploadError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(
        "{blob} was changed in the container by someone else; the local version was kept as {kept}"
    )]
    Conflict { blob: String, kept: String },
    #[error("{0}")]
    Invalid(String),
    /// Internal: the sync must be retried with every other sync excluded.
    #[error("the sync needs to run alone")]
    NeedsExclusive,
}

/// What one sync works with.
struct Ctx<'a> {
    index: &'a Index,
    cache: &'a Cache,
    /// No other sync runs (taking names from other inodes is allowed).
    exclusive: bool,
}

impl WritebackError {
    /// fsync and close report every failure to commit as EIO, except a full cache disk.
    pub fn errno(&self) -> i32 {
        match self {
            WritebackError::Index(e) if e.errno() == libc::ENOSPC => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}

type WbResult<T> = Result<T, WritebackError>;

#[derive(Clone, Debug)]
pub struct WritebackOptions {
    /// How long a change waits before the background uploads it (bursts coalesce).
    pub delay: Duration,
    /// Longest wait between retries of a failing sync.
    pub max_backoff: Duration,
    pub upload: UploadOptions,
}

impl Default for WritebackOptions {
    fn default() -> Self {
        WritebackOptions {
            delay: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            upload: UploadOptions::default(),
        }
    }
}

pub struct Writeback {
    store: Arc<dyn BlobStore>,
    rt: tokio::runtime::Handle,
    /// Blob name prefix of the mount root ("" or ending in '/').
    prefix: String,
    pub opts: WritebackOptions,
    /// One sync at a time per inode (close, fsync and the background may race).
    locks: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// Syncs run side by side under the read side; one that must take a name from another
    /// inode runs alone under the write side.
    exclusive: std::sync::RwLock<()>,
    /// Tells the kernel a directory entry changed behind its back (a conflict rename).
    invalidate: std::sync::OnceLock<Invalidator>,
}

/// Drops the kernel's cached entry `name` in directory `parent`.
pub type Invalidator = Box<dyn Fn(u64, &[u8]) + Send + Sync>;

fn quiet_delete(r: Result<(), BlobError>) -> Result<(), BlobError> {
    match r {
        // Gone already, or replaced by a version that is not ours to delete.
        Ok(()) | Err(BlobError::NotFound(_)) | Err(BlobError::PreconditionFailed(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Writeback {
    pub fn new(
        store: Arc<dyn BlobStore>,
        rt: tokio::runtime::Handle,
        prefix: String,
        opts: WritebackOptions,
    ) -> Writeback {
        Writeback {
            store,
            rt,
            prefix,
            opts,
            locks: Mutex::new(HashMap::new()),
            exclusive: std::sync::RwLock::new(()),
            invalidate: std::sync::OnceLock::new(),
        }
    }

    /// Sets how to tell the kernel about entries renamed by write-back (once, at mount).
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidate.set(f);
    }

    /// The blob name prefix of the mount root.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn lock_for(&self, ino: u64) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap();
        if locks.len() > 4096 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(ino).or_default().clone()
    }

    fn blob_name(&self, rel: &[u8]) -> WbResult<String> {
        Ok(self.blob_name_and_path(rel)?.0)
    }

    /// The blob name for path `rel`, and its `simfs_path` when the path is too long.
    fn blob_name_and_path(&self, rel: &[u8]) -> WbResult<(String, Option<String>)> {
        let rel = std::str::from_utf8(rel)
            .map_err(|_| WritebackError::Invalid(format!("{rel:?} is not UTF-8")))?;
        Ok(blob_name_for(&self.prefix, rel))
    }

    /// `meta`, plus the path a long-path blob stands for.
    fn with_path(&self, rel: &[u8], meta: &Metadata) -> WbResult<Metadata> {
        let mut meta = meta.clone();
        if let (_, Some(path)) = self.blob_name_and_path(rel)? {
            meta.insert(KEY_PATH.to_string(), path);
        }
        Ok(meta)
    }

    /// Brings inode `ino` up to date in the container if it is pending. `is_open` says
    /// whether something still has it open (an unlinked open file keeps its row).
    pub fn sync_inode(
        &self,
        index: &Index,
        cache: &Cache,
        ino: u64,
        is_open: bool,
    ) -> WbResult<()> {
        let lock = self.lock_for(ino);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut cx = Ctx {
            index,
            cache,
            exclusive: false,
        };
        let result = {
            let _shared = self.exclusive.read().unwrap_or_else(|p| p.into_inner());
            match index.sync_view(ino)? {
                Some(view) => self.rt.block_on(self.apply(&cx, &view, is_open)),
                None => return Ok(()),
            }
        };
        let result = match result {
            Err(WritebackError::NeedsExclusive) => {
                let _alone = self.exclusive.write().unwrap_or_else(|p| p.into_inner());
                cx.exclusive = true;
                match index.sync_view(ino)? {
                    Some(view) => self.rt.block_on(self.apply(&cx, &view, is_open)),
                    None => return Ok(()),
                }
            }
            r => r,
        };
        if let Err(e) = &result {
            let failures = index
                .failing()?
                .iter()
                .find(|f| f.ino == ino)
                .map_or(0, |f| f.attempts);
            let backoff = Duration::from_secs(1 << failures.min(6)).min(self.opts.max_backoff);
            tracing::warn!("uploading inode {ino} failed (retry in {backoff:?}): {e}");
            index.sync_failed(ino, &e.to_string(), SystemTime::now() + backoff)?;
        }
        result
    }

    /// Deletes what is in the trash, 16 at a time (each delete stands alone: every name in
    /// the trash is unclaimed); returns how many failed (they stay for later).
    pub fn empty_trash(&self, index: &Index) -> WbResult<usize> {
        use futures::StreamExt;
        loop {
            let batch = index.trash(256)?;
            if batch.is_empty() {
                return Ok(0);
            }
            let results: Vec<_> = self.rt.block_on(
                futures::stream::iter(batch.into_iter().map(|(blob, etag)| async move {
                    let r = quiet_delete(self.store.delete(&blob, &etag).await);
                    (blob, etag, r)
                }))
                .buffer_unordered(16)
                .collect(),
            );
            let mut failed = 0;
            for (blob, etag, r) in results {
                match r {
                    Ok(()) => index.trash_done(&blob, &etag)?,
                    Err(e) => {
                        tracing::warn!("deleting {blob:?} failed (will retry): {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                return Ok(failed);
            }
        }
    }

    async fn apply(&self, cx: &Ctx<'_>, v: &SyncView, is_open: bool) -> WbResult<()> {
        let (index, cache) = (cx.index, cx.cache);
        let ino = v.attr.ino;
        if ino == ROOT_INO {
            return Ok(index.record_sync(ino, v.gen, None, &[], false, false)?);
        }
        if v.names.is_empty() {
            // Unlinked: every claimed name goes to the trash; the row goes once unused.
            index.record_sync(ino, v.gen, None, &[], v.dirty, !is_open)?;
            if !is_open {
                cache.remove_local(ino);
            }
            return Ok(());
        }
        if !cx.exclusive {
            // Taking a name from another live inode (renames that swapped names) must not
            // race with that inode's own sync: such a sync runs alone, decided before any
            // write so a redo starts from a clean slate.
            let targets = match v.attr.kind {
                Kind::File => &v.names[..],
                _ => &v.names[..1],
            };
            for n in targets {
                let name = self.blob_name(&n.path)?;
                if index
                    .claim_on(&name)?
                    .is_some_and(|c| c.ino != ino && c.ino != 0 && c.live)
                {
                    return Err(WritebackError::NeedsExclusive);
                }
            }
        }
        let a = &v.attr;
        match a.kind {
            Kind::File => self.sync_file(cx, v).await?,
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
                index.record_sync(ino, v.gen, Some(&(name, etag)), &[], false, false)?;
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
            Err(BlobError::PreconditionFailed(_)) => {
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

    async fn sync_file(&self, cx: &Ctx<'_>, v: &SyncView) -> WbResult<()> {
        let index = cx.index;
        let a = &v.attr;
        let ino = a.ino;
        let mut paths = Vec::with_capacity(v.names.len());
        for n in &v.names {
            paths.push(self.blob_name(&n.path)?);
        }
        let anchor = match &v.blob {
            Some((b, _)) if paths.contains(b) => b.clone(),
            _ => paths[0].clone(),
        };
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
        let result = if v.dirty || v.blob.is_none() {
            self.upload_local(cx, ino, &anchor, &meta, v.local).await
        } else {
            let (old, old_etag) = v.blob.clone().expect("checked above");
            if old == anchor {
                self.store
                    .set_metadata(&anchor, &meta, &old_etag)
                    .await
                    .map_err(WritebackError::from)
            } else {
                let expect = self.make_room(cx, ino, &anchor).await?;
                match self
                    .store
                    .copy(&old, &old_etag, &anchor, &meta, &expect)
                    .await
                {
                    // The source is gone or changed: the local copy, if whole, still has it.
                    Err(BlobError::NotFound(_)) if v.local => {
                        self.upload_local(cx, ino, &anchor, &meta, true).await
                    }
                    r => r.map_err(WritebackError::from),
                }
            }
        };
        let etag = match result {
            Ok(e) => e,
            Err(WritebackError::Blob(BlobError::PreconditionFailed(_)))
            | Err(WritebackError::Upload(UploadError::Blob(BlobError::PreconditionFailed(_)))) => {
                if !(v.dirty || v.local) {
                    // Only attributes changed here, and the data changed there: theirs wins
                    // and the attribute change is dropped rather than retried forever.
                    index.record_sync(ino, v.gen, v.blob.as_ref(), &v.stubs, false, false)?;
                    return Err(WritebackError::Invalid(format!(
                        "{anchor} was changed in the container by someone else; the local change of its attributes was dropped"
                    )));
                }
                return Err(self.keep_both(index, v, &anchor, &paths)?);
            }
            Err(e) => return Err(e),
        };
        let mut stubs = Vec::new();
        if let Some(id) = v.link_id.as_deref().filter(|_| paths.len() > 1) {
            let stub_meta = render(Role::Stub(id), 0, 0, 0, a.mtime);
            for (p, n) in paths.iter().zip(&v.names).filter(|(p, _)| **p != anchor) {
                if let Some(s) = v.stubs.iter().find(|s| &s.0 == p) {
                    stubs.push(s.clone());
                    continue;
                }
                let expect = self.make_room(cx, ino, p).await?;
                let stub_meta = self.with_path(&n.path, &stub_meta)?;
                let e = self.store.put(p, Bytes::new(), &stub_meta, &expect).await?;
                stubs.push((p.clone(), e));
            }
        }
        index.record_sync(ino, v.gen, Some(&(anchor, etag)), &stubs, v.dirty, false)?;
        Ok(())
    }

    async fn upload_local(
        &self,
        cx: &Ctx<'_>,
        ino: u64,
        name: &str,
        meta: &Metadata,
        local: bool,
    ) -> WbResult<String> {
        if !local {
            return Err(WritebackError::Invalid(format!(
                "inode {ino} has neither a blob nor a local copy"
            )));
        }
        let expect = self.make_room(cx, ino, name).await?;
        Ok(upload_file(
            self.store.as_ref(),
            name,
            &cx.cache.local_path(ino),
            meta,
            &expect,
            &self.opts.upload,
        )
        .await?)
    }

    /// What a write to `name` must expect, after moving aside a blob that holds another
    /// live file's only copy.
    async fn make_room(&self, cx: &Ctx<'_>, ino: u64, name: &str) -> WbResult<Expect> {
        let index = cx.index;
        let Some(c) = index.claim_on(name)? else {
            return Ok(Expect::Absent);
        };
        if c.ino == ino || c.ino == 0 || !c.live {
            return Ok(Expect::Etag(c.etag));
        }
        if !cx.exclusive {
            // A concurrent sync claimed the name after `apply` checked: try again later.
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
        let nanos = crate::index::to_ns(SystemTime::now());
        let aside = format!("{}.simfs-moving/{}-{nanos}", self.prefix, c.ino);
        let e = self
            .store
            .copy(name, &c.etag, &aside, &Metadata::new(), &Expect::Absent)
            .await?;
        index.move_claim(c.ino, name, Some((&aside, &e)))?;
        Ok(Expect::Etag(c.etag))
    }

    /// The conflict rule: the local file takes a new name and is uploaded there later.
    fn keep_both(
        &self,
        index: &Index,
        v: &SyncView,
        anchor: &str,
        paths: &[String],
    ) -> WbResult<WritebackError> {
        let i = paths.iter().position(|p| p == anchor).unwrap_or(0);
        let entry = &v.names[i];
        let stamp = time::OffsetDateTime::now_utc();
        let mut new_name = entry.name.clone();
        new_name.extend_from_slice(
            format!(
                ".conflict-{:04}{:02}{:02}T{:02}{:02}{:02}",
                stamp.year(),
                stamp.month() as u8,
                stamp.day(),
                stamp.hour(),
                stamp.minute(),
                stamp.second()
            )
            .as_bytes(),
        );
        let (from, to) = (Name::new(&entry.name), Name::new(&new_name));
        let (Ok(from), Ok(to)) = (from, to) else {
            return Ok(WritebackError::Invalid(format!(
                "{anchor} changed in the container; no conflict name fits"
            )));
        };
        let now = SystemTime::now();
        index.rename(
            entry.parent,
            &from,
            entry.parent,
            &to,
            RenameMode::NoReplace,
            now,
            now,
        )?;
        if let Some(f) = self.invalidate.get() {
            f(entry.parent, from.as_bytes());
        }
        let kept = format!(
            "{}{}",
            &anchor[..anchor.len() - from.as_bytes().len()],
            to.as_os_str().to_string_lossy()
        );
        tracing::warn!(
            "conflict: {anchor} was changed by someone else; the local version is kept as {kept}"
        );
        Ok(WritebackError::Conflict {
            blob: anchor.to_string(),
            kept,
        })
    }
}
