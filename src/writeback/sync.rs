//! Barriers: `simfs sync [PATH...]` (everything pending under some paths, committed now) and
//! fsync of a directory (the entries pending in it).
//!
//! It takes the pending inodes whose names lie under one of the paths (all of them for the
//! whole mount), uploads them `PARALLEL` at a time whatever their due time, and then
//! completes the pending deletions (all of them: they are one cheap request each, and a
//! deletion no longer knows its path's inode); a whole mount's barrier also settles what lost
//! answers left (`intents.rs`), after the uploads under way that hold it. A file that a
//! handle is still writing (written and not yet closed) is not part of the barrier, since it
//! was not closed before the call: it is reported, not waited for. What fails stays pending
//! and is retried by the background as before; the caller gets each failure with its path.

use super::{WbResult, Writeback};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Uploads at once.
const PARALLEL: usize = 16;

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Inodes committed (or found committed already by the time their turn came).
    pub committed: u64,
    /// Paths that could not be committed, with why.
    pub failed: Vec<(String, String)>,
    /// Paths left out because a handle is still writing them.
    pub still_open: Vec<String>,
}

/// Whether `path` is `under` or below it ("" is the whole mount).
fn is_under(path: &[u8], under: &[u8]) -> bool {
    under.is_empty()
        || path == under
        || (path.len() > under.len() && path.starts_with(under) && path[under.len()] == b'/')
}

impl Writeback {
    /// Commits what is pending now under `paths` (relative to the mount's root; an empty
    /// list or "" for everything), calling `progress(done, total)` as inodes finish.
    pub fn sync_paths(
        &self,
        paths: &[String],
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> WbResult<SyncOutcome> {
        let whole = paths.is_empty() || paths.iter().any(|p| p.is_empty());
        self.index.persist_written()?;
        let mut todo = Vec::new();
        let mut out = SyncOutcome::default();
        for ino in self.index.pending_inodes()? {
            let Some(p) = self.index.pending_inode(ino)? else {
                continue;
            };
            let path = p
                .names
                .first()
                .map(|n| String::from_utf8_lossy(&n.path).into_owned());
            let wanted = match &path {
                // Unlinked: a deletion, which belongs to the whole mount's barrier.
                None => whole,
                Some(_) if whole => true,
                Some(_) => p.names.iter().any(|n| {
                    paths
                        .iter()
                        .any(|under| is_under(&n.path, under.trim_matches('/').as_bytes()))
                }),
            };
            if !wanted {
                continue;
            }
            let path = path.unwrap_or_else(|| format!("(deleted inode {ino})"));
            if self.pins.is_writing(ino) {
                out.still_open.push(path);
            } else {
                todo.push((ino, path));
            }
        }
        out.failed = self.upload_all(&todo, progress);
        out.committed = todo.len() as u64 - out.failed.len() as u64;
        if whole {
            self.settle_all()?;
        } else {
            self.empty_trash(true)?;
        }
        Ok(out)
    }

    /// fsync of directory `dir`: commits the entries pending in it (created, renamed into
    /// it, changed), the directory itself, and the pending deletions (entries removed or
    /// renamed away, wherever: they are one cheap request each). A file still open for
    /// writing is committed as it is now, as fsync of a directory on a local disk would
    /// persist the entry with whatever the file holds.
    pub fn sync_dir(&self, dir: u64) -> WbResult<()> {
        self.index.persist_written()?;
        let todo: Vec<(u64, String)> = self
            .index
            .pending_entries_of(dir)?
            .into_iter()
            .chain(std::iter::once(dir))
            .chain(self.index.pending_unlinked()?)
            .map(|ino| (ino, format!("inode {ino}")))
            .collect();
        let failed = self.upload_all(&todo, &|_, _| {});
        self.empty_trash(true)?;
        match failed.len() {
            0 => Ok(()),
            n => Err(super::WritebackError::Failing(n as u64)),
        }
    }

    /// Uploads `todo` (inode, path for the report) `PARALLEL` at a time, calling
    /// `progress(done, total)`; the paths that failed, with why, sorted.
    fn upload_all(
        &self,
        todo: &[(u64, String)],
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Vec<(String, String)> {
        let total = todo.len() as u64;
        progress(0, total);
        let done = AtomicU64::new(0);
        let failed = Mutex::new(Vec::new());
        let inos: Vec<u64> = todo.iter().map(|(ino, _)| *ino).collect();
        let tried = self.upload_each(&inos, PARALLEL, false, &|i, r, _| {
            if let Err(e) = r {
                let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                f.push((todo[i].1.clone(), e.to_string()));
            }
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
        });
        let mut failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
        // Left untried when the batch gave up on a service it could not reach: not
        // committed, so the barrier fails for them too.
        failed.extend(todo[tried..].iter().map(|(_, path)| {
            (
                path.clone(),
                "not tried: the storage service cannot be reached".to_string(),
            )
        }));
        failed.sort();
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::is_under;

    #[test]
    fn a_path_is_under_itself_and_its_directories_only() {
        assert!(is_under(b"a/b", b""));
        assert!(is_under(b"a/b", b"a"));
        assert!(is_under(b"a/b", b"a/b"));
        assert!(!is_under(b"ab/c", b"a"), "a sibling with a longer name");
        assert!(!is_under(b"a", b"a/b"));
    }
}
