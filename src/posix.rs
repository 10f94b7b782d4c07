//! POSIX value types shared by every layer: file kinds, attributes, times and the forms of
//! rename and setattr. This module is the bottom of the stack: it depends on nothing else in
//! simfs, so the blob store, the index, the cache and the filesystem core all speak the same
//! types without depending on one another.
//!
//! Times are `SystemTime`; where they are stored or compared as integers they are
//! nanoseconds since the epoch (`to_ns`/`from_ns`), negative before it, saturating far
//! outside the range any container can hold.

use std::time::{Duration, SystemTime};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// Special files: kept in the index and persisted as empty blobs with `simfs_type`.
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    /// The `simfs_type` value of a special file.
    pub fn special_name(self) -> Option<&'static str> {
        match self {
            Kind::Fifo => Some("fifo"),
            Kind::Socket => Some("socket"),
            Kind::CharDevice => Some("char"),
            Kind::BlockDevice => Some("block"),
            _ => None,
        }
    }

    pub fn from_special_name(v: &str) -> Option<Kind> {
        [
            Kind::Fifo,
            Kind::Socket,
            Kind::CharDevice,
            Kind::BlockDevice,
        ]
        .into_iter()
        .find(|k| k.special_name() == Some(v))
    }
}

/// Attributes of one inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits, setuid/setgid/sticky included.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub nlink: u32,
    /// Device number of a character or block device.
    pub rdev: u32,
}

/// A time a setattr sets: the caller's clock reading, or "now" as the filesystem sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

impl SetTime {
    pub fn resolve(self, now: SystemTime) -> SystemTime {
        match self {
            SetTime::Now => now,
            SetTime::At(t) => t,
        }
    }
}

/// What a setattr changes; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttrChanges {
    /// Permission bits (the file type bits are ignored).
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// New size of a regular file (its local copy is resized by the caller).
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<SystemTime>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

/// Nanoseconds since the epoch (negative before it), saturating.
pub fn to_ns(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

pub fn from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanoseconds_round_trip_on_both_sides_of_the_epoch() {
        for ns in [0, 1, -1, 1_700_000_000_123_456_789, -86_400_000_000_000] {
            assert_eq!(to_ns(from_ns(ns)), ns);
        }
    }

    #[test]
    fn special_kinds_round_trip_through_their_persisted_names() {
        for k in [
            Kind::Fifo,
            Kind::Socket,
            Kind::CharDevice,
            Kind::BlockDevice,
        ] {
            assert_eq!(Kind::from_special_name(k.special_name().unwrap()), Some(k));
        }
        assert_eq!(Kind::File.special_name(), None);
        assert_eq!(Kind::from_special_name("dir"), None);
    }
}
