//! Which way the kernel reads each open file: passthrough, its own page cache, or direct.
//!
//! With FUSE passthrough (Linux 6.9+) the kernel reads a fully cached file straight from
//! its backing file on the cache disk, mmap included, without a round trip to simfs. The
//! kernel's rules shape this module: an inode is in one io mode at a time, so while any
//! handle of it is passthrough, every other open must be too or use direct I/O (a cached
//! open then fails with EIO), and while cached handles are open no passthrough open is
//! allowed; all passthrough handles of an inode share one backing id. Writes never go
//! through passthrough (simfs must see them to upload them): a writer that arrives while
//! readers are on passthrough gets direct I/O, and because its writes bypass the inode's page
//! cache, the next cached open of that inode drops the page cache instead of keeping it.
//!
//! This is bookkeeping only, generic over the backing handle, so it is tested without a
//! kernel; `fuse.rs` registers the backing files and answers the kernel.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// How one open was answered.
#[derive(Debug)]
pub enum Open<T> {
    /// Through the kernel's page cache for the inode; `keep_cache` says whether pages
    /// cached before this open are still valid.
    Cached { keep_cache: bool },
    /// Served by the kernel from this backing file.
    Passthrough(Arc<T>),
    /// Direct I/O: every read and write reaches simfs.
    Direct,
}

enum Mode<T> {
    Cached(usize),
    Passthrough { backing: Arc<T>, opens: usize },
}

struct State<T> {
    modes: HashMap<u64, Mode<T>>,
    /// Inodes written through direct I/O since their page cache was last dropped.
    stale: HashSet<u64>,
}

pub struct IoModes<T> {
    state: Mutex<State<T>>,
}

impl<T> Default for IoModes<T> {
    fn default() -> Self {
        IoModes {
            state: Mutex::new(State {
                modes: HashMap::new(),
                stale: HashSet::new(),
            }),
        }
    }
}

impl<T> IoModes<T> {
    fn state(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read-only open of a fully cached file: passthrough unless cached handles are open;
    /// `register` makes the backing file (None: passthrough is not possible, use the cache).
    pub fn open_read(&self, ino: u64, register: impl FnOnce() -> Option<T>) -> Open<T> {
        let mut st = self.state();
        match st.modes.get_mut(&ino) {
            Some(Mode::Passthrough { backing, opens }) => {
                *opens += 1;
                return Open::Passthrough(backing.clone());
            }
            Some(Mode::Cached(_)) => return Self::cached(&mut st, ino),
            None => {}
        }
        match register() {
            Some(t) => {
                let backing = Arc::new(t);
                st.modes.insert(
                    ino,
                    Mode::Passthrough {
                        backing: backing.clone(),
                        opens: 1,
                    },
                );
                Open::Passthrough(backing)
            }
            None => Self::cached(&mut st, ino),
        }
    }

    /// Any other open (for writing, or of a file still downloading or written locally).
    pub fn open_other(&self, ino: u64) -> Open<T> {
        let mut st = self.state();
        if let Some(Mode::Passthrough { .. }) = st.modes.get(&ino) {
            st.stale.insert(ino);
            return Open::Direct;
        }
        Self::cached(&mut st, ino)
    }

    fn cached(st: &mut State<T>, ino: u64) -> Open<T> {
        match st.modes.entry(ino).or_insert(Mode::Cached(0)) {
            Mode::Cached(n) => *n += 1,
            Mode::Passthrough { .. } => unreachable!("checked by the callers"),
        }
        Open::Cached {
            keep_cache: !st.stale.remove(&ino),
        }
    }

    /// The handle `how` of `ino` is closed. The last passthrough handle drops the backing
    /// file's registration (`T`'s drop).
    pub fn release(&self, ino: u64, how: &Open<T>) {
        let mut st = self.state();
        let last = match (st.modes.get_mut(&ino), how) {
            (Some(Mode::Cached(n)), Open::Cached { .. }) => {
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
            st.modes.remove(&ino);
        }
    }

    /// Whether `ino` has passthrough handles (tests).
    pub fn is_passthrough(&self, ino: u64) -> bool {
        matches!(self.state().modes.get(&ino), Some(Mode::Passthrough { .. }))
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
    fn readers_share_one_backing_file_released_with_the_last() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let a = m.open_read(1, register(&live));
        let b = m.open_read(1, register(&live));
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
    fn a_writer_beside_passthrough_readers_goes_direct_and_stales_the_page_cache() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let r = m.open_read(7, register(&live));
        let w = m.open_other(7);
        assert!(matches!(w, Open::Direct));
        m.release(7, &w);
        m.release(7, &r);
        // The next cached open must not keep pages from before the direct writes.
        let c = m.open_other(7);
        assert!(matches!(c, Open::Cached { keep_cache: false }));
        let c2 = m.open_other(7);
        assert!(matches!(c2, Open::Cached { keep_cache: true }));
    }

    #[test]
    fn no_passthrough_while_cached_handles_are_open() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let w = m.open_other(3);
        let r = m.open_read(3, register(&live));
        assert!(matches!(r, Open::Cached { keep_cache: true }));
        assert_eq!(live.load(Ordering::SeqCst), 0, "no backing file registered");
        m.release(3, &w);
        m.release(3, &r);
        // Once they are closed, a reader gets passthrough again.
        assert!(matches!(
            m.open_read(3, register(&live)),
            Open::Passthrough(_)
        ));
    }

    #[test]
    fn a_failed_registration_falls_back_to_the_cache() {
        let m: IoModes<Backing> = IoModes::default();
        let r = m.open_read(5, || None);
        assert!(matches!(r, Open::Cached { keep_cache: true }));
        m.release(5, &r);
        assert!(!m.is_passthrough(5));
    }
}
