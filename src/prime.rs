//! Priming the kernel's dentry cache at mount: a bounded, breadth-first listing of the mount.
//!
//! The first `stat` of a path after mount costs one FUSE LOOKUP per path component the
//! kernel does not know (each a wake-up of a FUSE worker and back), while one READDIRPLUS
//! hands the kernel a whole page of entries with their attributes, for each of which it makes
//! a dentry and an inode at once. Listing the directories breadth-first, up to a number of
//! entries, therefore turns the first `stat`, `ls -l`, `find` or `import` of those paths into
//! cache hits, for a small fraction of what looking each one up costs.
//!
//! The daemon lists through its own mount, like any client: path by path, holding a
//! directory open only while it is read, so an unmount is never kept busy; a failure (an
//! unmount under way, a directory removed meanwhile) skips that directory. Each primed entry
//! costs the kernel about 1 KiB of memory, which it may reclaim under pressure: that is why
//! the walk is bounded, and also stops at a time budget.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a priming walk did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Primed {
    pub entries: usize,
    pub dirs: usize,
    pub elapsed: Duration,
    /// Whether the walk stopped at its bound or budget before listing everything.
    pub partial: bool,
}

/// Lists `root` breadth-first until `limit` entries were seen or `budget` has passed.
pub fn prime(root: &Path, limit: usize, budget: Duration) -> Primed {
    let started = Instant::now();
    let mut done = Primed::default();
    let mut queue: VecDeque<PathBuf> = VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        if done.entries >= limit || started.elapsed() >= budget {
            done.partial = true;
            break;
        }
        let Ok(list) = std::fs::read_dir(&dir) else {
            continue;
        };
        done.dirs += 1;
        for e in list.map_while(Result::ok) {
            done.entries += 1;
            // The type comes with the listing: no stat, and symlinks are not followed.
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
            if done.entries >= limit {
                break;
            }
        }
    }
    done.partial |= !queue.is_empty();
    done.elapsed = started.elapsed();
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for p in ["a/b/c", "a/d", "e"] {
            std::fs::create_dir_all(d.path().join(p)).unwrap();
        }
        for f in ["top", "a/one", "a/b/two", "a/b/c/three", "e/four"] {
            std::fs::write(d.path().join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("/", d.path().join("a/root-link")).unwrap();
        d
    }

    #[test]
    fn a_walk_lists_every_directory_once_without_following_links() {
        let d = tree();
        let p = prime(d.path(), usize::MAX, Duration::from_secs(60));
        // root: a, e, top; a: b, d, one, root-link; a/b: c, two; a/b/c: three; e: four.
        assert_eq!((p.entries, p.dirs, p.partial), (11, 6, false));
    }

    #[test]
    fn a_walk_stops_at_its_bound_nearest_directories_first() {
        let d = tree();
        let p = prime(d.path(), 3, Duration::from_secs(60));
        assert_eq!((p.entries, p.dirs, p.partial), (3, 1, true));
        let p = prime(d.path(), 100, Duration::ZERO);
        assert!(p.partial && p.dirs == 0, "{p:?}");
    }
}
