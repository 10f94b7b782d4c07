//! Which way the kernel reads each open file: passthrough, or its own page cache.
//!
//! With FUSE passthrough (Linux 6.9+) the kernel reads a fully cached file straight from
//! its backing file on the cache disk, mmap included, without a round trip to simfs. The
//! kernel's rules shape this module: an inode is in one I/O mode at a time. While any handle
//! of it is in passthrough, every other open of it must be passthrough too, on the same
//! backing id (anything else, direct I/O included, fails the open with EIO); while cached
//! handles are open, no passthrough open is allowed.
//!
//! Writes must reach simfs (it uploads them), so a writer can never join a passthrough
//! inode: `fuse.rs` uses passthrough only on read-only mounts, where every open is a read.
//! There, a later open of an inode in passthrough shares its backing file, whatever the state
//! of its cached copy; an inode first opened while still downloading stays in the page cache
//! mode until its last handle closes.
//!
//! This is bookkeeping only, generic over the backing handle, so it is tested without a
//! kernel; `fuse.rs` registers the backing files and answers the kernel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How one open was answered.
#[derive(Debug)]
pub enum Open<T> {
    /// Through the kernel's page cache for the inode.
    Cached,
    /// Served by the kernel from this backing file.
    Passthrough(Arc<T>),
}

enum Mode<T> {
    Cached(usize),
    Passthrough { backing: Arc<T>, opens: usize },
}

pub struct IoModes<T> {
    modes: Mutex<HashMap<u64, Mode<T>>>,
}

impl<T> Default for IoModes<T> {
    fn default() -> Self {
        IoModes {
            modes: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> IoModes<T> {
    fn modes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Mode<T>>> {
        self.modes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An open of `ino` on a read-only mount. An inode in passthrough shares its backing
    /// file; one with cached handles open stays cached; otherwise `register` may make a
    /// backing file (None: not possible or not worth it, use the page cache).
    pub fn open(&self, ino: u64, register: impl FnOnce() -> Option<T>) -> Open<T> {
        let mut modes = self.modes();
        match modes.get_mut(&ino) {
            Some(Mode::Passthrough { backing, opens }) => {
                *opens += 1;
                return Open::Passthrough(backing.clone());
            }
            Some(Mode::Cached(n)) => {
                *n += 1;
                return Open::Cached;
            }
            None => {}
        }
        match register() {
            Some(t) => {
                let backing = Arc::new(t);
                modes.insert(
                    ino,
                    Mode::Passthrough {
                        backing: backing.clone(),
                        opens: 1,
                    },
                );
                Open::Passthrough(backing)
            }
            None => {
                modes.insert(ino, Mode::Cached(1));
                Open::Cached
            }
        }
    }

    /// A handle of `ino` opened as `how` is closed. The last passthrough handle drops the
    /// backing file's registration (`T`'s drop, once the caller drops `how` too).
    pub fn release(&self, ino: u64, how: &Open<T>) {
        let mut modes = self.modes();
        let last = match (modes.get_mut(&ino), how) {
            (Some(Mode::Cached(n)), Open::Cached) => {
                *n -= 1;
                *n == 0
            }
            (Some(Mode::Passthrough { opens, .. }), Open::Passthrough(_)) => {
                *opens -= 1;
                *opens == 0
            }
            _ => false,
        };
        if last {
            modes.remove(&ino);
        }
    }

    /// Whether `ino` has passthrough handles.
    pub fn is_passthrough(&self, ino: u64) -> bool {
        matches!(self.modes().get(&ino), Some(Mode::Passthrough { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A backing registration that counts how many are alive.
    struct Backing(Arc<AtomicUsize>);
    impl Drop for Backing {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn register(live: &Arc<AtomicUsize>) -> impl FnOnce() -> Option<Backing> + '_ {
        move || {
            live.fetch_add(1, Ordering::SeqCst);
            Some(Backing(live.clone()))
        }
    }

    #[test]
    fn every_open_of_a_passthrough_inode_shares_its_backing_file_until_the_last_close() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let a = m.open(1, register(&live));
        // A later open that could not register (say, the copy is downloading again) must
        // still be passthrough on the same backing id, or the kernel fails it.
        let b = m.open(1, || None);
        assert!(
            matches!((&a, &b), (Open::Passthrough(x), Open::Passthrough(y)) if Arc::ptr_eq(x, y))
        );
        assert_eq!(live.load(Ordering::SeqCst), 1, "one backing id per inode");
        m.release(1, &a);
        drop(a);
        assert_eq!(live.load(Ordering::SeqCst), 1);
        m.release(1, &b);
        drop(b);
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert!(!m.is_passthrough(1));
    }

    #[test]
    fn no_passthrough_while_cached_handles_are_open() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let first = m.open(3, || None);
        let second = m.open(3, register(&live));
        assert!(matches!(second, Open::Cached));
        assert_eq!(live.load(Ordering::SeqCst), 0, "no backing file registered");
        m.release(3, &first);
        m.release(3, &second);
        // Once they are closed, an open may be passthrough again.
        assert!(matches!(m.open(3, register(&live)), Open::Passthrough(_)));
    }

    #[test]
    fn a_failed_registration_falls_back_to_the_page_cache() {
        let m: IoModes<Backing> = IoModes::default();
        let r = m.open(5, || None);
        assert!(matches!(r, Open::Cached));
        m.release(5, &r);
        assert!(!m.is_passthrough(5));
    }
}
