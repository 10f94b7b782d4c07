//! Spare files: a deleted inode's local copy, emptied, becomes a new inode's copy.
//!
//! Why: on ext4 without a journal (a common choice for scratch NVMe, and this project's
//! test machines), allocating an inode skips every inode of its group freed in the last
//! minute or more, checking each one's deletion time; local copies all live in one folder,
//! so one group, and after a workload deletes many files on the mount (`make clean`, a test
//! suite's temporary trees, files replaced by a rename over them) every create scans past
//! all of them. Reusing the inode allocates and frees none. (Deletions elsewhere in the
//! group, such as an old cache directory removed before a mount, cost the same and are not
//! helped.)
//!
//! A copy is reused only when no one else has it open, which the kernel vouches for: a
//! write lease is granted only to the sole open file of an inode. That rules out simfs's own
//! handles and uploads and, what nothing in simfs would see, a mapping a program keeps of a
//! file the kernel served in passthrough (the mapping holds the backing file open after its
//! handle closed; emptying the file would take the data from under it, as unlinking does
//! not). Otherwise the copy is unlinked, as it always was.
//!
//! Spares are emptied before they are named spares, so a crash leaves only empty files in
//! `spare/`; they are taken up again at the next mount. At most `MOST` are kept.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// fcntl's F_SETSIG (Linux, all architectures), which the libc crate does not name.
const F_SETSIG: libc::c_int = 10;

/// Spares kept at most (empty files: an inode each, no data).
const MOST: usize = 8192;

pub(super) struct Spares {
    dir: PathBuf,
    kept: Mutex<Vec<u64>>,
    next: AtomicU64,
    /// `MOST`, smaller in tests.
    most: usize,
}

impl Spares {
    /// The spares in `dir` (created 0700), taking up those a previous mount left.
    pub(super) fn new(dir: &Path) -> std::io::Result<Spares> {
        Self::keeping_at_most(dir, MOST)
    }

    fn keeping_at_most(dir: &Path, most: usize) -> std::io::Result<Spares> {
        crate::cache::private_dir(dir)?;
        let kept: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let next = kept.iter().max().map_or(0, |n| n + 1);
        Ok(Spares {
            dir: dir.to_path_buf(),
            kept: Mutex::new(kept),
            next: AtomicU64::new(next),
            most,
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(n.to_string())
    }

    /// An empty file at `path`, open read-write: a spare moved there, else a new file.
    pub(super) fn make_empty(&self, path: &Path) -> std::io::Result<File> {
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
        };
        let spare = self.kept().pop();
        if let Some(n) = spare {
            if std::fs::rename(self.path(n), path).is_ok() {
                return open(path);
            }
        }
        open(path)
    }

    /// Removes the file at `path`: kept as a spare when no one else has it open, else
    /// unlinked.
    pub(super) fn remove(&self, path: &Path) {
        if self.kept().len() >= self.most || self.keep(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }

    fn keep(&self, path: &Path) -> std::io::Result<()> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let fd = file.as_raw_fd();
        // A lease broken by someone's open signals its holder, SIGIO by default, which
        // would end the daemon: SIGURG, ignored unless handled, instead. Nothing should
        // open the file meanwhile; the lease is held only while the file is emptied.
        // SAFETY: plain fcntl calls on a descriptor this function owns.
        let leased = unsafe {
            libc::fcntl(fd, F_SETSIG, libc::SIGURG) == 0
                && libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) == 0
        };
        if !leased {
            return Err(std::io::Error::last_os_error());
        }
        let emptied = file.set_len(0);
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        emptied?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        std::fs::rename(path, self.path(n))?;
        // `remove` looked at the count without the lock: removals at once can get here
        // together, and the bound holds only if the last word is said under it.
        let mut kept = self.kept();
        if kept.len() >= self.most {
            drop(kept);
            let _ = std::fs::remove_file(self.path(n));
        } else {
            kept.push(n);
        }
        Ok(())
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        self.kept().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    fn written(path: &Path, data: &[u8]) -> u64 {
        let mut f = File::create(path).unwrap();
        f.write_all(data).unwrap();
        f.metadata().unwrap().ino()
    }

    #[test]
    fn a_removed_file_no_one_has_open_becomes_the_next_new_file_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let spares = Spares::new(&dir.path().join("spare")).unwrap();
        let old = dir.path().join("1");
        let disk_ino = written(&old, b"the deleted inode's data");
        spares.remove(&old);
        assert!(!old.exists());
        assert_eq!(spares.count(), 1);
        let new = dir.path().join("2");
        let f = spares.make_empty(&new).unwrap();
        let md = f.metadata().unwrap();
        assert_eq!(
            (md.ino(), md.len()),
            (disk_ino, 0),
            "the same inode, emptied"
        );
        assert_eq!(spares.count(), 0);
    }

    #[test]
    fn a_removed_file_still_open_elsewhere_is_unlinked_and_keeps_its_data_for_its_reader() {
        let dir = tempfile::tempdir().unwrap();
        let spares = Spares::new(&dir.path().join("spare")).unwrap();
        let old = dir.path().join("1");
        written(&old, b"still read");
        let mut reader = File::open(&old).unwrap();
        spares.remove(&old);
        assert!(!old.exists());
        assert_eq!(spares.count(), 0, "not kept while open");
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "still read");
    }

    /// What a program does with a file the kernel served in passthrough: maps it, closes
    /// it, goes on reading the mapping.
    #[test]
    fn a_removed_file_still_mapped_is_not_emptied_under_the_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let spares = Spares::new(&dir.path().join("spare")).unwrap();
        let old = dir.path().join("1");
        written(&old, b"mapped bytes");
        let f = File::open(&old).unwrap();
        // SAFETY: a shared read-only mapping of the file's 12 bytes, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                12,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        drop(f);
        spares.remove(&old);
        assert_eq!(spares.count(), 0, "not kept while mapped");
        // SAFETY: the mapping above, still in place.
        let seen = unsafe { std::slice::from_raw_parts(map as *const u8, 12) }.to_vec();
        // SAFETY: the mapping above, not used after this.
        unsafe { libc::munmap(map, 12) };
        assert_eq!(seen, b"mapped bytes");
    }

    #[test]
    fn spares_left_by_a_previous_mount_are_taken_up_and_numbered_past() {
        let dir = tempfile::tempdir().unwrap();
        let spare_dir = dir.path().join("spare");
        {
            let spares = Spares::new(&spare_dir).unwrap();
            for i in 0..3 {
                let p = dir.path().join(i.to_string());
                written(&p, b"x");
                spares.remove(&p);
            }
        }
        let spares = Spares::new(&spare_dir).unwrap();
        assert_eq!(spares.count(), 3);
        let p = dir.path().join("again");
        written(&p, b"y");
        spares.remove(&p);
        assert_eq!(spares.count(), 4);
        assert_eq!(
            std::fs::read_dir(&spare_dir).unwrap().count(),
            4,
            "a fourth name, not one of the three"
        );
        for i in 0..4 {
            let f = spares
                .make_empty(&dir.path().join(format!("new-{i}")))
                .unwrap();
            assert_eq!(f.metadata().unwrap().len(), 0);
        }
        assert_eq!(std::fs::read_dir(&spare_dir).unwrap().count(), 0);
    }

    /// The cap's check and the spare's keeping are apart: removals at once race between
    /// them. A round shows an overshoot only now and then, so the test runs several.
    #[test]
    fn removals_at_once_keep_no_more_spares_than_the_cap() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let spare_dir = dir.path().join("spare");
            let spares = Spares::keeping_at_most(&spare_dir, 4).unwrap();
            let paths: Vec<PathBuf> = (0..64)
                .map(|i| {
                    let p = dir.path().join(i.to_string());
                    written(&p, b"x");
                    p
                })
                .collect();
            let start = std::sync::Barrier::new(paths.len());
            std::thread::scope(|s| {
                for p in &paths {
                    let (spares, start) = (&spares, &start);
                    s.spawn(move || {
                        start.wait();
                        spares.remove(p);
                    });
                }
            });
            assert!(spares.count() <= 4, "kept {}", spares.count());
            assert_eq!(
                std::fs::read_dir(&spare_dir).unwrap().count(),
                spares.count(),
                "a spare over the cap is unlinked, not left behind"
            );
            assert!(paths.iter().all(|p| !p.exists()), "every copy removed");
        }
    }
}
