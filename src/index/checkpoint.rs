//! Checkpoints of the index's write-ahead log, off the threads that commit.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold, on
//! whichever thread made it: a FUSE request (a create, a rename) then paid for copying
//! the log into the database file and for two fsyncs, while its caller waited. Here the
//! writer connection's automatic checkpoint is only a safety net far above the usual
//! size, and a thread of its own checkpoints after every `EVERY` commits. Its checkpoints
//! are PASSIVE: they never wait for a reader or the writer, and copy what they can; the
//! log restarts from its beginning once a checkpoint has copied all of it.
//!
//! The thread holds its own connection and ends when the index (the sender) is dropped.

use crossbeam::channel::{bounded, Sender, TrySendError};
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Commits between two checkpoints (a few pages each: about 1,000 log pages, SQLite's own
/// default threshold).
const EVERY: u32 = 256;
/// The writer's own automatic checkpoint, in log pages (40 MiB): reached only when the
/// checkpoint thread cannot keep up or could not start.
pub(super) const SAFETY_NET_PAGES: u32 = 10_000;

#[derive(Default)]
pub(super) struct Checkpointer {
    nudge: Mutex<Option<Sender<()>>>,
    commits: AtomicU32,
}

impl Checkpointer {
    /// Starts the thread for the database at `path` (once; later calls do nothing).
    pub(super) fn start(&self, path: PathBuf) {
        let mut nudge = self.nudge.lock().unwrap_or_else(|p| p.into_inner());
        if nudge.is_some() {
            return;
        }
        let (tx, rx) = bounded::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("simfs-checkpoint".into())
            .spawn(move || {
                let conn = match Connection::open(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("index checkpoints stay on the writer: {e}");
                        return;
                    }
                };
                let _ = conn.busy_timeout(Duration::from_secs(1));
                let _ = conn.pragma_update(None, "synchronous", "NORMAL");
                while rx.recv().is_ok() {
                    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    });
                    match done {
                        Ok((log, copied)) => tracing::trace!("checkpoint: {copied} of {log}"),
                        Err(e) => tracing::debug!("index checkpoint: {e}"),
                    }
                }
            });
        match spawned {
            Ok(_) => *nudge = Some(tx),
            Err(e) => tracing::warn!("index checkpoints stay on the writer: {e}"),
        }
    }

    /// The writer committed: every `EVERY` commits, the thread checkpoints.
    pub(super) fn committed(&self) {
        if self.commits.fetch_add(1, Ordering::Relaxed) % EVERY != EVERY - 1 {
            return;
        }
        let nudge = self.nudge.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = nudge.as_ref() {
            // Full means a checkpoint is already asked for.
            if let Err(TrySendError::Disconnected(_)) = tx.try_send(()) {
                tracing::debug!("the index checkpoint thread has ended");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::memo::tests::{empty_index, file};
    use std::time::{Duration, Instant, SystemTime};

    #[test]
    fn the_writer_checkpoints_only_as_a_safety_net() {
        let dir = tempfile::tempdir().unwrap();
        let index = empty_index(dir.path());
        let pages: u32 = index
            .write(|tx| Ok(tx.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(pages, super::SAFETY_NET_PAGES);
    }

    #[test]
    fn commits_past_the_threshold_reach_the_database_file_through_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let index = empty_index(dir.path());
        let db = dir.path().join("index.db");
        let size = || std::fs::metadata(&db).unwrap().len();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let before = size();
        // Far below the writer's own threshold: only the thread copies these.
        for i in 0..2 * super::EVERY {
            file(&index, &format!("file-{i:05}"), at);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while size() <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            size() > before,
            "{} commits left the database file at {before} bytes",
            2 * super::EVERY
        );
    }
}
