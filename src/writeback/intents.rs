//! Settling intents: names write-back set out to write whose result was never recorded
//! (the daemon was killed between the service's commit and the journal's record, or an
//! upload failed after a first write). Each is looked up in the container: a blob there that
//! this index wrote (its `simfs_writer` is ours) and that no inode claims goes to the trash
//! and is deleted like any other stale name; an absent one, or someone else's, is forgotten.
//! An intent of an inode whose upload runs now is left for later: its request may still be
//! in flight. So is one whose inode still has that name and is pending: its next upload
//! writes the name again and settles it.

use super::{WbResult, Writeback};
use crate::blob::format::KEY_WRITER;
use crate::blob::BlobError;

impl Writeback {
    /// Settles the open intents of `ino` (its lock held by the caller), or of every inode
    /// not uploading now.
    pub(super) async fn settle_intents(&self, ino: Option<u64>) -> WbResult<()> {
        for (blob, owner) in self.index.open_intents(ino)? {
            let _held = match ino {
                Some(_) => None,
                None => match self.locks.try_lock(&owner) {
                    Some(g) => Some(g),
                    None => continue,
                },
            };
            if self.still_named(owner, &blob)? {
                // Its owner will write it again: that upload settles it (and finds its own
                // blob there). Trashing it now would race that upload.
                continue;
            }
            let etag = match self.store.head(&blob).await {
                Ok(p) if p.metadata.get(KEY_WRITER) == Some(&self.writer) => Some(p.etag),
                Ok(_) | Err(BlobError::NotFound(_)) => None,
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
