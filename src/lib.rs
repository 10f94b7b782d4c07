//! simfs: an Azure Blob container as a POSIX filesystem, with all metadata in a local SQLite
//! index and file data hydrated whole into a local cache.
//!
//! The modules form a stack; each uses only those below it:
//!
//! 1. Value types and small pieces every layer shares: `posix` (kinds, attributes, times,
//!    rename modes), `locks` (per-inode and per-name locks), `pins` (open handles per inode),
//!    `kernel` (the handle that tells the kernel to forget cached entries, attributes and
//!    pages), `metrics` (the process's counters and levels, and the `/metrics` endpoint).
//! 2. `blob`: the container behind the `BlobStore` trait (Azure, and in tests an in-memory
//!    and a failure-injecting store), authentication, the SDK pipeline's policies (metrics,
//!    rate limits), uploads and the persisted POSIX format.
//! 3. `index` (the SQLite namespace, name rules and the write-back journal) and `cache` (clean
//!    copies of blobs on the local disk: fills, their verification, LRU, eviction, free
//!    space, prefetch), side by side, each over `blob`.
//! 4. `local`: the local copies of files being written, over `cache` (a first write takes the
//!    clean copy over).
//! 5. `writeback` (makes the container match the index: per-inode uploads, conflicts, the
//!    trash, intents, the background scheduler) and `refresh` (brings others' changes in), each over
//!    the index, the copies and the pins, telling `kernel` what changed.
//! 6. `fs`: POSIX semantics over all of the above, without FUSE; the one place errors
//!    become errnos. `iomode`: which open files the kernel reads in passthrough.
//! 7. `fuse`: a thin adapter from `fuser` to `fs`; `control`: the control socket's server
//!    side, speaking `protocol` (the typed requests, events and status files that the daemon
//!    and the `simfs` commands share).
//! 8. `mount`: wiring from a plain `MountConfig` to a serving mount; `prime`: the kernel's
//!    dentry cache filled at mount.
//!
//! The command line (argument parsing, credentials, the mount helper, daemonising, status,
//! the benchmark driver) is the `simfs` binary's, under `src/bin/simfs/`. Tests of the core
//! through its public API are in `fuse-tests/core/`, real mounts in `fuse-tests/`.

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
pub mod metrics;
pub mod mount;
pub mod pins;
pub mod posix;
pub mod prime;
pub mod protocol;
pub mod refresh;
pub mod writeback;
