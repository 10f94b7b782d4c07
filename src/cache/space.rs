//! Free space on the cache disk, known without a `statvfs` per write.
//!
//! Writers must stop at a reserve (1% of the disk, 1 to 256 MiB) so the index can always
//! record a deletion and a full disk can be freed from the mount. Asking the kernel on every
//! `write(2)` costs a syscall each; instead the free figure is read at most every
//! `REFRESH`, and what is handed out in between is subtracted. A request that the estimate
//! cannot cover is checked against a fresh reading before it is refused, so ENOSPC is never
//! the estimate's mistake.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const REFRESH: Duration = Duration::from_millis(200);

pub struct Space {
    dir: PathBuf,
    state: Mutex<Option<(Instant, u64, u64)>>,
}

fn raw_statvfs(dir: &Path) -> std::io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Total bytes of the filesystem that holds `path`, or would hold it once created (its
/// nearest existing ancestor): what a cache size given as a share of the disk is of.
pub fn disk_size(path: &Path) -> std::io::Result<u64> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let st = raw_statvfs(existing)?;
    Ok(st.f_blocks * st.f_frsize)
}

/// Free bytes on the filesystem that holds `path`, as an unprivileged writer sees them
/// (the writers' reserve included).
pub fn available(path: &Path) -> std::io::Result<u64> {
    let st = raw_statvfs(path)?;
    Ok(st.f_bavail * st.f_frsize)
}

/// Free bytes and free inodes on the filesystem of `dir`, less the writers' reserve.
fn statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = raw_statvfs(dir)?;
    let total = st.f_blocks * st.f_frsize;
    let reserve = (total / 100).clamp(1 << 20, 256 << 20);
    Ok((
        (st.f_bavail * st.f_frsize).saturating_sub(reserve),
        st.f_favail,
    ))
}

impl Space {
    pub fn new(dir: &Path) -> Space {
        Space {
            dir: dir.to_path_buf(),
            state: Mutex::new(None),
        }
    }

    /// Free bytes and inodes (estimated; at most `REFRESH` old).
    pub fn free(&self) -> std::io::Result<(u64, u64)> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *st {
            Some((at, bytes, inodes)) if at.elapsed() < REFRESH => Ok((bytes, inodes)),
            _ => {
                let (bytes, inodes) = statvfs(&self.dir)?;
                *st = Some((Instant::now(), bytes, inodes));
                Ok((bytes, inodes))
            }
        }
    }

    /// Forgets the estimate: the next question reads the disk (after files were deleted).
    pub fn forget(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Takes `bytes` from the free space, or refuses (false) when even a fresh reading
    /// cannot cover them.
    pub fn take(&self, bytes: u64) -> std::io::Result<bool> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, free, _)) = st.as_mut() {
            if at.elapsed() < REFRESH && *free >= bytes {
                *free -= bytes;
                return Ok(true);
            }
        }
        let (free, inodes) = statvfs(&self.dir)?;
        let ok = free >= bytes;
        *st = Some((Instant::now(), free - if ok { bytes } else { 0 }, inodes));
        Ok(ok)
    }
}
