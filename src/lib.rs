//! simfs: an Azure Blob container as a POSIX filesystem, with all metadata in a local SQLite
//! index and file data hydrated whole into a local cache.
//!
//! The modules form a stack; each uses only those below it:
//!
//! 1. `posix`: value types every layer shares (kinds, attributes, times, rename modes);
//!    `locks`: per-inode locks.
//! 2. `blob`: the container behind the `BlobStore` trait (Azure, and in tests an in-memory
//!    and a failure-injecting store), authentication and the persisted POSIX format.
//! 3. `index` (the SQLite namespace and write-back journal) and `cache` (file data on the
//!    local disk, open-file pins, free space), side by side, each over `blob`.
//! 4. `writeback`: makes the container match the index: per-inode uploads, conflicts, the
//!    trash and the background scheduler.
//! 5. `fs`: POSIX semantics over all of the above, without FUSE; the one place errors
//!    become errnos.
//! 6. `fuse`: a thin adapter from `fuser` to `fs`.
//! 7. `mount`: wiring from a plain `MountConfig` to a serving mount; `prime`: the kernel's
//!    dentry cache filled at mount.
//!
//! The command line (argument parsing, credentials, the mount helper, daemonising, status,
//! the benchmark driver) is the `simfs` binary's, under `src/bin/simfs/`.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod blob;
pub mod cache;
pub mod control;
pub mod fs;
pub mod fuse;
pub mod index;
pub mod iomode;
pub mod kernel;
pub mod local;
pub mod locks;
pub mod mount;
pub mod pins;
pub mod posix;
pub mod prime;
pub mod protocol;
pub mod refresh;
pub mod writeback;
