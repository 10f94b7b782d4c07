//! Settling intents: names write-back set out to write whose result was never recorded
//! (the daemon was killed between the service's commit and the journal's record, or an
//! upload failed after a first write). Each is looked up in the container: a blob there that
//! this index wrote (its `simfs_writer` is ours) and that no inode claims goes to the trash
//! and is deleted like any other stale name; an absent one, or someone else's, is forgotten.
//! An intent of an inode whose upload runs now is left for later: its request may still be
//! in flight. So is one whose inode still has that name and is pending: its next upload
//! writes the name again and settles it, and one whose name another upload is writing.
//!
//! When they are settled: at mount and at the start of a drain (every inode's); after an
//! inode's upload that follows a failed one (its own: a lost answer may have written a name
//! the file left since, as a file fsynced and then renamed); after the trash finds a
//! trashed name replaced (an intent is hidden while its name sits in the trash, and the
//! version that replaced it may be this mount's lost answer); and at the end of a drain or
//! a whole mount's `simfs sync`, which waits for the uploads that hold an intent's inode or
//! name instead of leaving it: the background's upload after a lost answer records its
//! result first and settles the name it left afterwards, so a barrier that returned on
//! "nothing pending" alone let a fresh node list a blob that was deleted a moment later.

use super::{WbResult, Writeback};
use crate::blob::format::KEY_WRITER;
use crate::blob::BlobError;

impl Writeback {
    /// Settles the open intents of `ino` (its lock held by the caller), or of every inode:
    /// those not uploading now, or all of them once their uploads are done when `wait`.
    pub(super) async fn settle_intents(&self, ino: Option<u64>, wait: bool) -> WbResult<()> {
        for (blob, owner) in self.index.open_intents(ino)? {
            // (An upload takes its inodes' locks before its names', and so does this.)
            let _held = match ino {
                Some(_) => None,
                None => match self.locks.try_lock(&owner) {
                    Some(g) => Some(g),
                    None if wait => Some(self.locks.lock(&owner)),
                    None => continue,
                },
            };
            if self.still_named(owner, &blob)? {
                // Its owner will write it again: that upload settles it (and finds its own
                // blob there). Trashing it now would race that upload.
                continue;
            }
            // Another inode may be writing the name now (a file created there since): what
            // it writes carries this mount's id too, so it is left alone until it is done
            // (and then claimed, which `settle_intent` checks).
            let _name = match self.names.try_lock(&blob) {
                Some(g) => g,
                None if wait => self.names.lock(&blob),
                None => continue,
            };
            let etag = match self.own_version(&blob).await {
                Ok(etag) => etag,
                Err(e) => {
                    tracing::info!(
                        "{blob}: left from an interrupted upload; looked up later ({e})"
                    );
                    continue;
                }
            };
            if etag.is_some() {
                tracing::info!(
                    "{blob}: written by an upload whose result was never recorded; deleting it"
                );
            }
            self.index.settle_intent(&blob, etag.as_deref())?;
        }
        Ok(())
    }

    /// The ETag of the version at `blob` when this index wrote it (its `simfs_writer` is
    /// ours); None when the name is empty or holds someone else's version.
    pub(super) async fn own_version(&self, blob: &str) -> Result<Option<String>, BlobError> {
        match self.store.head(blob).await {
            Ok(p) if p.metadata.get(KEY_WRITER) == Some(&self.writer) => Ok(Some(p.etag)),
            Ok(_) | Err(BlobError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A barrier's last step (a drain, a whole mount's `simfs sync`): every open intent is
    /// settled, after the uploads that hold its inode or name, and the trash is emptied.
    pub(super) fn settle_all(&self) -> WbResult<()> {
        self.rt.block_on(self.settle_intents(None, true))?;
        self.empty_trash(true)?;
        Ok(())
    }

    /// Whether `blob` is the name of one of `ino`'s paths now (it is pending and has it).
    fn still_named(&self, ino: u64, blob: &str) -> WbResult<bool> {
        let Some(p) = self.index.pending_inode(ino)? else {
            return Ok(false);
        };
        for n in &p.names {
            if self.blob_name(&n.path)? == blob {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
