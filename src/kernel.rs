//! Telling the kernel to forget what it cached of the mount: entries, attributes, pages.
//!
//! One `Kernel` handle is given, when each is built, to everything that changes what the
//! kernel may hold behind its back: the FUSE adapter (the pages of a file passthrough serves
//! from now on), write-back (an entry a conflict renamed) and the refresh (what others
//! changed in the container). Tests and tools pass `Kernel::none()` or a recorder of their
//! own (`Kernel::new`); the code that notifies is the same either way.
//!
//! fuser makes the notification channel with the session, and the session needs the FUSE
//! adapter first (its INIT handshake runs in `Session::new`). So a mount's handle is made
//! before everything else (`Kernel::for_session`) and its link is connected once, by
//! `mount::session`, when the channel exists. Nothing is sent before that, and nothing needs
//! to be: until the session serves, the kernel has cached nothing of the mount.

use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

/// The kernel's caches, as simfs invalidates them.
pub trait KernelCache: Send + Sync {
    /// Forget the dentry `parent/name` (and a negative one).
    fn inval_entry(&self, parent: u64, name: &[u8]);
    /// Forget `ino`'s attributes and cached pages (for a directory: its cached listing). It
    /// may wait for reads in flight on the inode: call it off the FUSE threads.
    fn inval_inode(&self, ino: u64);
}

/// The handle every notifier holds; cheap to clone.
#[derive(Clone)]
pub struct Kernel(Arc<dyn KernelCache>);

impl Kernel {
    /// Notifications go to `k`.
    pub fn new(k: impl KernelCache + 'static) -> Kernel {
        Kernel(Arc::new(k))
    }

    /// No kernel: a filesystem driven without a mount.
    pub fn none() -> Kernel {
        Kernel::new(Nothing)
    }

    /// The handle of a mount whose FUSE session does not exist yet, and the link that
    /// connects it to the session's channel.
    pub fn for_session() -> (Kernel, KernelLink) {
        let slot = Arc::new(Session::default());
        (Kernel(slot.clone()), KernelLink(slot))
    }

    pub fn inval_entry(&self, parent: u64, name: &[u8]) {
        self.0.inval_entry(parent, name)
    }

    pub fn inval_inode(&self, ino: u64) {
        self.0.inval_inode(ino)
    }
}

struct Nothing;

impl KernelCache for Nothing {
    fn inval_entry(&self, _: u64, _: &[u8]) {}
    fn inval_inode(&self, _: u64) {}
}

/// A mount's notifications, through its session's channel once connected.
#[derive(Default)]
struct Session(Mutex<Option<fuser::Notifier>>);

impl Session {
    fn notifier(&self) -> Option<fuser::Notifier> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl KernelCache for Session {
    fn inval_entry(&self, parent: u64, name: &[u8]) {
        let Some(n) = self.notifier() else { return };
        let name = std::ffi::OsStr::from_bytes(name);
        // ENOENT: the kernel does not know the name, which is what was wanted.
        if let Err(e) = n.inval_entry(fuser::INodeNo(parent), name) {
            tracing::trace!("invalidating {name:?} in {parent}: {e}");
        }
    }

    fn inval_inode(&self, ino: u64) {
        let Some(n) = self.notifier() else { return };
        if let Err(e) = n.inval_inode(fuser::INodeNo(ino), 0, -1) {
            tracing::trace!("invalidating inode {ino}: {e}");
        }
    }
}

/// Connects a mount's `Kernel` to its FUSE session.
pub struct KernelLink(Arc<Session>);

impl KernelLink {
    /// From now on notifications reach the kernel through `notifier`.
    pub fn connect(self, notifier: fuser::Notifier) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = Some(notifier);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Told(Mutex<Vec<(u64, Vec<u8>)>>);

    impl KernelCache for Arc<Told> {
        fn inval_entry(&self, parent: u64, name: &[u8]) {
            self.0.lock().unwrap().push((parent, name.to_vec()));
        }
        fn inval_inode(&self, ino: u64) {
            self.0.lock().unwrap().push((ino, Vec::new()));
        }
    }

    #[test]
    fn every_clone_of_a_handle_reaches_the_same_kernel() {
        let told = Arc::new(Told::default());
        let k = Kernel::new(told.clone());
        let k2 = k.clone();
        k.inval_entry(1, b"a");
        k2.inval_inode(7);
        assert_eq!(
            *told.0.lock().unwrap(),
            vec![(1, b"a".to_vec()), (7, Vec::new())]
        );
    }
}
