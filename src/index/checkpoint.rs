//! The log copied back into the index file by a thread of its own.
//!
//! SQLite checkpoints in the commit that takes the log past its threshold: that commit
//! syncs the log, copies its pages into the index file and syncs that too, while it still
//! holds the writer. During a `pip install` into the mount this came some 16 times, and
//! each time a create or a rename on a FUSE thread waited about 20 ms for it, with every
//! other writer queued behind it. Here a thread runs a passive checkpoint every 250 ms
//! while commits come, on a connection of its own: it never takes the writer's lock, so
//! commits go on meanwhile, and it does the copying and the syncing.
//!
//! The writer keeps its own checkpoint at the threshold, for what only it can do: a
//! passive checkpoint under a steady stream of commits never catches up with the writer,
//! and the log starts over only after a checkpoint that copied all of it. Without the
//! writer's, the log grew to 34 MiB during one pip, and reading pages from a long log cost
//! the daemon more CPU. With the thread ahead of it, the writer's finds little left to do.
//! The thread's errors are only logged: the writer's checkpoint still runs.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the thread looks for new commits to copy back.
const PERIOD: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Shared {
    commits: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The index's checkpoint thread, started by its first commit and stopped with the index.
#[derive(Default)]
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: OnceLock<JoinHandle<()>>,
}

impl Checkpointer {
    /// A transaction committed on the index at `path`.
    pub(super) fn committed(&self, path: &Path) {
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.thread.get_or_init(|| {
            let (shared, path) = (self.shared.clone(), path.to_path_buf());
            std::thread::Builder::new()
                .name("simfs-checkpoint".into())
                .spawn(move || run(&shared, &path))
                .expect("spawning the index's checkpoint thread")
        });
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, path: &Path) {
    let mut conn = None;
    let mut done = 0;
    loop {
        let stop = shared.stop.lock().unwrap_or_else(|p| p.into_inner());
        let (stop, _) = shared
            .wake
            .wait_timeout_while(stop, PERIOD, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        if *stop {
            return;
        }
        drop(stop);
        let commits = shared.commits.load(Ordering::Relaxed);
        if commits == done {
            continue;
        }
        done = commits;
        if let Err(e) = checkpoint(&mut conn, path) {
            tracing::debug!("checkpoint of {}: {e}", path.display());
            conn = None;
        }
    }
}

fn checkpoint(conn: &mut Option<rusqlite::Connection>, path: &Path) -> rusqlite::Result<()> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(rusqlite::Connection::open_with_flags_and_vfs(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            super::vfs::name(),
        )?),
    };
    c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::super::memo::tests::{file, fresh_index};
    use super::super::Index;
    use std::path::Path;
    use std::time::{Duration, Instant, SystemTime};

    /// Half the writer's own checkpoint threshold: a log this long is the thread's to copy.
    const HALF: u64 = (super::super::CHECKPOINT_BYTES / 2) as u64;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map_or(0, |m| m.len())
    }

    /// Creates files until the log at `log` holds `HALF`; how many.
    fn grow_log(index: &Index, log: &Path, at: SystemTime) -> usize {
        let mut i = 0;
        while size(log) < HALF {
            file(index, &format!("a-file-with-a-long-name-{i:06}"), at);
            i += 1;
        }
        i
    }

    /// New pages live in the log until a checkpoint copies them into the index file; the
    /// writer's own checkpoint waits for a log twice the size written here, so only the
    /// thread can have made the file grow.
    #[test]
    fn commits_are_copied_back_into_the_index_file_by_the_checkpoint_thread() {
        let (dir, index, at) = fresh_index();
        let db = dir.path().join("index.db");
        let log = dir.path().join("index.db-wal");
        let before = size(&db);
        let i = grow_log(&index, &log, at);
        let t = Instant::now();
        while size(&db) <= before && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            size(&db) > before,
            "the index file stayed at {} bytes after {i} creates",
            size(&db)
        );
    }

    /// Once copied back, the log starts over at the next commit, cut back to that commit
    /// (`journal_size_limit`): new frames are appended, never written into old blocks that
    /// would have to be read from the disk first.
    #[test]
    fn a_log_that_starts_over_is_cut_back_rather_than_overwritten() {
        let (dir, index, at) = fresh_index();
        let log = dir.path().join("index.db-wal");
        let mut i = grow_log(&index, &log, at);
        let t = Instant::now();
        while size(&log) >= HALF / 4 && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
            file(&index, &format!("one-more-{i:06}"), at);
            i += 1;
        }
        assert!(
            size(&log) < HALF / 4,
            "the log stayed at {} bytes after it was copied back",
            size(&log)
        );
    }
}
