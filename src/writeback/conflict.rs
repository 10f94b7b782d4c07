//! When someone else changed a blob, and the trash.
//!
//! The conflict rule: a local file whose blob was replaced by another writer takes a new
//! name, `<name>.conflict-<time>`, and is uploaded there; the other writer's blob stays. The
//! kernel is told the old entry changed (it would otherwise keep showing the local file
//! under the old name).
//!
//! The trash holds blob names no inode needs any more, each with the ETag simfs last saw;
//! deleting with that ETag never removes a version someone else wrote since.

use super::{WbResult, Writeback, WritebackError};
use crate::blob::BlobError;
use crate::index::journal::PendingInode;
use crate::index::names::Name;
use crate::posix::RenameMode;
use std::time::SystemTime;

/// A trashed version's delete is done when it is gone, already or now, or replaced by
/// another version (not this one to delete); true in that last case.
fn quiet_delete(r: Result<(), BlobError>) -> Result<bool, BlobError> {
    match r {
        Ok(()) | Err(BlobError::NotFound(_)) => Ok(false),
        Err(BlobError::Changed(_)) => Ok(true),
        Err(e) => Err(e),
    }
}

impl Writeback {
    /// Deletes what is in the trash, 16 at a time (each delete stands alone: every name in
    /// the trash is unclaimed); returns how many failed or were skipped (they stay for
    /// later). A name being written is skipped, or waited for with `wait`.
    pub(super) fn empty_trash(&self, wait: bool) -> WbResult<usize> {
        use futures::StreamExt;
        loop {
            let batch = self.index.trash(256)?;
            if batch.is_empty() {
                return Ok(0);
            }
            // A name an upload is writing right now is left for a later round: that upload
            // may be expecting exactly the version this would delete. A name someone else
            // emptied while this waited for it (the background and a barrier at once) is
            // no longer in the trash: deleting it again would cost a request for a 412.
            let mut busy = 0;
            let batch: Vec<_> = batch
                .into_iter()
                .filter_map(|(blob, etag)| {
                    let g = match self.names.try_lock(&blob) {
                        Some(g) => g,
                        None if wait => self.names.lock(&blob),
                        None => {
                            busy += 1;
                            return None;
                        }
                    };
                    match self.index.in_trash(&blob, &etag) {
                        Ok(false) => None,
                        _ => Some((blob, etag, g)),
                    }
                })
                .collect();
            let down = &super::scheduler::Down::new(self.opts.give_up_after);
            let results: Vec<_> = self.rt.block_on(
                futures::stream::iter(batch.into_iter().map(|(blob, etag, g)| async move {
                    if down.given_up() {
                        return (blob, etag, None, g);
                    }
                    let mut r: WbResult<bool> =
                        quiet_delete(self.store.delete(&blob, &etag).await).map_err(Into::into);
                    if let Ok(true) = r {
                        if let Err(e) = self.delete_own_replacement(&blob).await {
                            r = Err(e);
                        }
                    }
                    down.ended(&r);
                    (blob, etag, Some(r), g)
                }))
                .buffer_unordered(16)
                .collect(),
            );
            let (mut failed, mut replaced_any) = (0, false);
            for (blob, etag, r, _name_lock) in results {
                match r {
                    Some(Ok(replaced)) => {
                        self.index.trash_done(&blob, &etag)?;
                        replaced_any |= replaced;
                    }
                    Some(Err(e)) => {
                        tracing::warn!("deleting {blob:?} failed (will retry): {e}");
                        failed += 1;
                    }
                    // Not tried: the service cannot be reached.
                    None => failed += 1,
                }
            }
            if replaced_any {
                // The version that replaced a trashed one may be this mount's own, written
                // by an upload whose answer was lost (its intent was hidden while the name
                // sat in the trash): settled now, it goes to the trash under its own ETag
                // and this loop deletes it, rather than waiting for the next mount.
                self.rt.block_on(self.settle_intents(None, false))?;
            }
            if failed + busy > 0 {
                return Ok(failed + busy);
            }
        }
    }

    /// A trashed version of `blob` (its name lock held) was replaced. By someone else, whose
    /// version stays; or by this mount, in a write whose answer was lost (a file rewritten,
    /// then renamed or removed before its retry: the trash has the version simfs knew, not
    /// the one the service committed). That version goes too unless an inode claims it now.
    async fn delete_own_replacement(&self, blob: &str) -> WbResult<()> {
        let Some(etag) = self.own_version(blob).await? else {
            return Ok(());
        };
        if self.index.claim_on(blob)?.is_some_and(|c| c.ino != 0) {
            return Ok(());
        }
        tracing::info!("{blob}: written by an upload whose answer was lost; deleting it");
        quiet_delete(self.store.delete(blob, &etag).await)?;
        Ok(())
    }

    /// The conflict rule: the local file takes a new name and is uploaded there later.
    pub(super) fn keep_both(
        &self,
        v: &PendingInode,
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
        self.index.rename(
            entry.parent,
            &from,
            entry.parent,
            &to,
            RenameMode::NoReplace,
            now,
            now,
        )?;
        // Both names: the kernel may hold a negative entry for the new one.
        self.kernel.inval_entry(entry.parent, from.as_bytes());
        self.kernel.inval_entry(entry.parent, to.as_bytes());
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
