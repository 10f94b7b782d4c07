//! simfs: an Azure Blob container as a POSIX filesystem, with all metadata in a local SQLite
//! index and file data hydrated whole into a local cache.
//!
//! Data flows one way: `config` turns the command line into a `Config`; `blob` reaches the
//! container; `index` holds the namespace; `cache` holds file data; `fs` gives them POSIX
//! meaning; `fuse` hands `fs` to the kernel; `mount` wires them together.

pub mod bench;
pub mod blob;
pub mod cache;
pub mod config;
pub mod fs;
pub mod fuse;
pub mod index;
pub mod mount;
pub mod options;
pub mod status;
pub mod writeback;
