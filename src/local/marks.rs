//! Marks on local copies written in place, past the journal (`fs::in_place`), which a crash
//! leaves for mount-time recovery to find.
//!
//! A mark is an extended attribute of the copy itself (`user.simfs.in-place`): one syscall
//! to set and one to remove, on the descriptor simfs already holds. A marker file beside the
//! copy (`<ino>.in-place`) made and deleted an inode for every file written in place, which
//! ext4 pays for (see `spares`) and which cost more than the WRITE requests that writing in
//! place saves a small file. A cache disk without user extended attributes (tmpfs before
//! Linux 6.6) gets the marker file; recovery looks for both, so a cache directory left by
//! either way (or by an older simfs) is recovered.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The extended attribute that marks a copy written in place.
const MARK: &CStr = c"user.simfs.in-place";

pub(super) struct Marks {
    dir: PathBuf,
    /// The cache disk refused the mark as an extended attribute: marker files instead.
    files: AtomicBool,
}

impl Marks {
    /// Marks of the copies in `dir`.
    pub(super) fn new(dir: &Path) -> Marks {
        Marks {
            dir: dir.to_path_buf(),
            files: AtomicBool::new(false),
        }
    }

    /// The marker file for `ino`, where the cache disk has no user extended attributes.
    fn marker(&self, ino: u64) -> PathBuf {
        self.dir.join(format!("{ino}.in-place"))
    }

    /// Marks copy `ino`, open as `copy`.
    pub(super) fn mark(&self, ino: u64, copy: &File) -> std::io::Result<()> {
        if !self.files.load(Ordering::Relaxed) {
            // SAFETY: a valid descriptor, a NUL-terminated name and a one-byte value.
            let r = unsafe {
                libc::fsetxattr(copy.as_raw_fd(), MARK.as_ptr(), c"1".as_ptr().cast(), 1, 0)
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
            tracing::info!(
                "the cache disk keeps no user extended attributes: copies written in place are marked by a file beside them"
            );
            self.files.store(true, Ordering::Relaxed);
        }
        File::create(self.marker(ino)).map(drop)
    }

    /// Removes the mark of copy `ino`, open as `copy`.
    pub(super) fn unmark(&self, ino: u64, copy: &File) {
        if self.files.load(Ordering::Relaxed) {
            let _ = std::fs::remove_file(self.marker(ino));
        } else {
            // SAFETY: a valid descriptor and a NUL-terminated name.
            unsafe { libc::fremovexattr(copy.as_raw_fd(), MARK.as_ptr()) };
        }
    }

    /// Whether copy `ino`, at `path`, is marked, either way.
    pub(super) fn marked(&self, ino: u64, path: &Path) -> bool {
        self.marker(ino).exists()
            || c_path(path).is_some_and(|p| {
                // SAFETY: NUL-terminated path and name; a null buffer of size 0 asks the size.
                unsafe { libc::getxattr(p.as_ptr(), MARK.as_ptr(), std::ptr::null_mut(), 0) >= 0 }
            })
    }

    /// Removes the mark of copy `ino`, at `path`, either way.
    pub(super) fn clear(&self, ino: u64, path: &Path) {
        let _ = std::fs::remove_file(self.marker(ino));
        if let Some(p) = c_path(path) {
            // SAFETY: NUL-terminated path and name.
            unsafe { libc::removexattr(p.as_ptr(), MARK.as_ptr()) };
        }
    }
}

fn c_path(p: &Path) -> Option<CString> {
    CString::new(p.as_os_str().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(dir: &Path, ino: u64) -> (PathBuf, File) {
        let path = dir.join(ino.to_string());
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, f)
    }

    #[test]
    fn a_mark_stays_on_the_copy_until_removed_and_leaves_no_file_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let marks = Marks::new(dir.path());
        let (path, f) = copy(dir.path(), 7);
        assert!(!marks.marked(7, &path));
        marks.mark(7, &f).unwrap();
        assert!(marks.marked(7, &path), "a crash now leaves it for recovery");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no marker file"
        );
        // Kept across a rename, as when a clean copy is moved into place.
        let moved = dir.path().join("8");
        std::fs::rename(&path, &moved).unwrap();
        assert!(marks.marked(8, &moved));
        marks.unmark(8, &f);
        assert!(!marks.marked(8, &moved));
        marks.mark(8, &f).unwrap();
        marks.clear(8, &moved);
        assert!(!marks.marked(8, &moved), "recovery cleared it");
    }

    #[test]
    fn a_marker_file_left_beside_a_copy_counts_as_a_mark_and_is_cleared_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let marks = Marks::new(dir.path());
        let (path, f) = copy(dir.path(), 3);
        // A cache disk without user extended attributes, or an older simfs.
        marks.files.store(true, Ordering::Relaxed);
        marks.mark(3, &f).unwrap();
        assert!(dir.path().join("3.in-place").exists());
        let after_restart = Marks::new(dir.path());
        assert!(after_restart.marked(3, &path));
        after_restart.clear(3, &path);
        assert!(!after_restart.marked(3, &path));
        assert!(!dir.path().join("3.in-place").exists());
    }
}
