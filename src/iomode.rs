//! Which way the kernel reads each open file: passthrough, or its own page cache.
//!
//! With FUSE passthrough (Linux 6.9+) the kernel reads a fully cached file straight from
//! its backing file on the cache disk, mmap included, without a round trip to simfs. The
//! kernel's rules shape this module: an inode is in one I/O mode at a time. While any handle
//! of it is in passthrough, every other open of it must be passthrough too, on the same
//! backing id (anything else, direct I/O included, fails the open with EIO); while cached
//! handles are open, no passthrough open is allowed.
//!
//! Readers start passthrough, and so do opens for writing of files written on this node
//! (`fuse.rs` decides which). A later open of an inode in passthrough shares its
//! backing file whatever it is: a reader, or a writer, which then writes the file in place
//! (`fs::in_place` finds its writes). An inode first opened while still downloading, or
//! by a writer that cannot write in place (its file only cached clean, or no passthrough),
//! stays in the page cache mode until its last handle closes.
//!
//! Where it cannot go in place (no passthrough), a write-only handle of a new file (a
//! create) is direct: its writes go to simfs without the kernel copying them into its page
//! cache first. That is a copy and a page allocation less per byte written, and a
//! checkpoint's gigabytes are not held twice (in the FUSE file's pages and the cache
//! file's). Nothing is lost: a write-only handle reads nothing and cannot be mapped. The
//! kernel takes no I/O mode for it; simfs counts it as cached, so no reader starts
//! passthrough while it writes. (Readers open beside it are kept coherent by the
//! kernel and `fuse.rs`; see `direct_beside_others` there.)
//!
//! Writes made in place or direct never pass through the kernel's page cache for the inode,
//! so pages it kept from before may be stale: the first cached open after a passthrough
//! period, or after a direct writer that had readers beside it, tells the kernel to drop
//! them. (A direct writer alone leaves no mark: its file was new, and nothing cached it, so
//! the marks do not grow with every file written.)
//!
//! This is bookkeeping only, generic over the backing handle, so it is tested without a
//! kernel; `fuse.rs` registers the backing files and answers the kernel.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// How one open was answered.
#[derive(Debug)]
pub enum Open<T> {
    /// Through the kernel's page cache for the inode; whether the pages it holds from
    /// earlier opens are still good.
    Cached { keep_cache: bool },
    /// Written past the kernel's page cache (a write-only handle of a new file).
    Direct,
    /// Served by the kernel from this backing file.
    Passthrough(Arc<T>),
}

enum Mode<T> {
    Cached(usize),
    Passthrough { backing: Arc<T>, opens: usize },
}

struct State<T> {
    modes: HashMap<u64, Mode<T>>,
    /// Inodes out of passthrough since their last cached open: their kept pages may be
    /// stale.
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

    /// An open of `ino`. An inode in passthrough shares its backing file; one with cached
    /// handles open stays cached; otherwise `register` may make a backing file (None: not
    /// possible or not worth it, or a writer: use the page cache).
    pub fn open(&self, ino: u64, register: impl FnOnce() -> Option<T>) -> Open<T> {
        let mut state = self.state();
        let State { modes, stale } = &mut *state;
        match modes.get_mut(&ino) {
            Some(Mode::Passthrough { backing, opens }) => {
                *opens += 1;
                return Open::Passthrough(backing.clone());
            }
            Some(Mode::Cached(n)) => {
                *n += 1;
                return Open::Cached { keep_cache: true };
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
                Open::Cached {
                    keep_cache: !stale.remove(&ino),
                }
            }
        }
    }

    /// A write-only open of `ino` that may write direct: it does, unless the inode is in
    /// passthrough, whose backing file every open must share (it then writes in place).
    pub fn open_direct(&self, ino: u64) -> Open<T> {
        let mut state = self.state();
        match state.modes.get_mut(&ino) {
            Some(Mode::Passthrough { backing, opens }) => {
                *opens += 1;
                Open::Passthrough(backing.clone())
            }
            Some(Mode::Cached(n)) => {
                *n += 1;
                Open::Direct
            }
            None => {
                state.modes.insert(ino, Mode::Cached(1));
                Open::Direct
            }
        }
    }

    /// A handle of `ino` opened as `how` is closed; whether it was the inode's last. The last
    /// passthrough handle drops the backing file's registration (`T`'s drop, once the caller
    /// drops `how` too).
    pub fn release(&self, ino: u64, how: &Open<T>) -> bool {
        let mut state = self.state();
        let last = match (state.modes.get_mut(&ino), how) {
            (Some(Mode::Cached(n)), Open::Cached { .. } | Open::Direct) => {
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
            if let Some(Mode::Passthrough { .. }) = state.modes.remove(&ino) {
                state.stale.insert(ino);
            }
        }
        last
    }

    /// A direct writer of `ino` wrote: whether other handles of it are open, whose pages the
    /// caller must then drop. Their reads may race with the write (see `fuse.rs`), so the
    /// first cached open once all are closed drops the pages again. A direct writer alone
    /// leaves nothing behind: its file was new, and it cached nothing.
    pub fn beside_direct_writer(&self, ino: u64) -> bool {
        let mut state = self.state();
        let others = match state.modes.get(&ino) {
            Some(Mode::Cached(n)) => *n > 1,
            Some(Mode::Passthrough { opens, .. }) => *opens > 1,
            None => false,
        };
        if others {
            state.stale.insert(ino);
        }
        others
    }

    /// Whether `ino` has passthrough handles (the tests' view of the bookkeeping).
    #[cfg(test)]
    fn is_passthrough(&self, ino: u64) -> bool {
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
        assert!(matches!(second, Open::Cached { keep_cache: true }));
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
        assert!(matches!(r, Open::Cached { keep_cache: true }));
        m.release(5, &r);
        assert!(!m.is_passthrough(5));
    }

    #[test]
    fn the_first_cached_open_after_passthrough_drops_the_kernels_kept_pages() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let before = m.open(7, || None);
        assert!(matches!(before, Open::Cached { keep_cache: true }));
        assert!(m.release(7, &before), "its last handle");
        // Read in place (and maybe written in place, past the kernel's page cache).
        let pt = m.open(7, register(&live));
        m.release(7, &pt);
        let after = m.open(7, || None);
        assert!(
            matches!(after, Open::Cached { keep_cache: false }),
            "pages kept from before the passthrough period may be stale"
        );
        let next = m.open(7, || None);
        assert!(matches!(next, Open::Cached { keep_cache: true }));
    }

    #[test]
    fn a_direct_writer_keeps_readers_out_of_passthrough_and_pages_read_beside_it_are_dropped() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let writer = m.open_direct(9);
        assert!(matches!(writer, Open::Direct));
        assert!(!m.beside_direct_writer(9), "alone");
        let reader = m.open(9, register(&live));
        assert!(
            matches!(reader, Open::Cached { keep_cache: true }),
            "no passthrough while a writer is open"
        );
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert!(m.beside_direct_writer(9), "a reader beside it");
        assert!(!m.release(9, &reader), "the writer is still open");
        assert!(m.release(9, &writer), "its last handle");
        let after = m.open(9, || None);
        assert!(
            matches!(after, Open::Cached { keep_cache: false }),
            "pages read beside the direct writes may be stale"
        );
        m.release(9, &after);
        assert!(matches!(
            m.open(9, || None),
            Open::Cached { keep_cache: true }
        ));
    }

    #[test]
    fn a_direct_writer_alone_leaves_the_next_open_its_kept_pages() {
        let m: IoModes<Backing> = IoModes::default();
        let writer = m.open_direct(10);
        assert!(!m.beside_direct_writer(10));
        assert!(m.release(10, &writer));
        assert!(matches!(
            m.open(10, || None),
            Open::Cached { keep_cache: true }
        ));
    }

    #[test]
    fn a_write_only_open_of_a_passthrough_inode_shares_its_backing_file() {
        let live = Arc::new(AtomicUsize::new(0));
        let m = IoModes::default();
        let reader = m.open(11, register(&live));
        let writer = m.open_direct(11);
        assert!(
            matches!((&reader, &writer), (Open::Passthrough(x), Open::Passthrough(y)) if Arc::ptr_eq(x, y))
        );
        m.release(11, &writer);
        drop(writer);
        m.release(11, &reader);
        drop(reader);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }
}
