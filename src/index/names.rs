//! Names: the one place a path segment is validated, and the rules for odd blob names.
//!
//! A `Name` is a valid POSIX directory entry name: non-empty, not `.` or `..`, no `/` or NUL,
//! at most 255 bytes. Blob names are split on `/` into `Name`s; what cannot be split is
//! hidden with a reason that `simfs check` reports:
//!
//! - empty segments (`a//b`, a leading `/`), `.` and `..` segments, segments over 255 bytes:
//!   hidden, because no POSIX path can name them faithfully;
//! - a trailing `/` (`a/b/`): a zero-length blob is a directory marker for `a/b`, a non-empty
//!   one is hidden (its data has no name);
//! - a name that is both a blob and a prefix (`a` and `a/b`): the directory wins and the blob
//!   `a` is hidden — decided by the index builder, which sees both;
//! - `.simfs/` below the mount's prefix is simfs's own (index snapshots): hidden from every
//!   listing (`is_reserved`).
//!
//! A name a POSIX caller gives to a *new* entry must also be storable as itself
//! (`Name::for_new_entry`): UTF-8 (blob names are), no backslash (the Blob service reads it as
//! `/`), and not `.simfs` at the mount's root (it would vanish into the hidden directory).

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

pub const NAME_MAX: usize = 255;

/// The directory below a mount's prefix that simfs keeps for itself.
pub const RESERVED: &str = ".simfs";

/// Whether `rel` (a blob name relative to the mount's prefix) is inside simfs's own directory.
pub fn is_reserved(rel: &str) -> bool {
    rel.strip_prefix(RESERVED)
        .is_some_and(|rest| rest.starts_with('/'))
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty path segment")]
    Empty,
    #[error("'.' or '..' segment")]
    Dot,
    #[error("segment longer than 255 bytes")]
    TooLong,
    #[error("contains '/' or NUL")]
    BadByte,
    #[error("names must be UTF-8 to be stored as blob names")]
    NotUtf8,
    #[error("names may not hold a backslash: the Blob service turns it into '/'")]
    Backslash,
    #[error("'.simfs' at the mount's root is reserved for simfs's index snapshots")]
    Reserved,
}

impl Name {
    pub fn new(bytes: &[u8]) -> Result<Name, NameError> {
        match bytes {
            [] => Err(NameError::Empty),
            b"." | b".." => Err(NameError::Dot),
            b if b.len() > NAME_MAX => Err(NameError::TooLong),
            b if b.iter().any(|&c| c == b'/' || c == 0) => Err(NameError::BadByte),
            b => Ok(Name(b.to_vec())),
        }
    }

    pub fn from_os(s: &OsStr) -> Result<Name, NameError> {
        Name::new(s.as_bytes())
    }

    /// The name of an entry a caller creates (or renames or links to) in a directory (the
    /// mount's root when `in_root`): valid, and storable in a blob name as itself.
    pub fn for_new_entry(in_root: bool, s: &OsStr) -> Result<Name, NameError> {
        let n = Name::from_os(s)?;
        let Ok(text) = std::str::from_utf8(n.as_bytes()) else {
            return Err(NameError::NotUtf8);
        };
        if text.contains('\\') {
            return Err(NameError::Backslash);
        }
        if in_root && text == RESERVED {
            return Err(NameError::Reserved);
        }
        Ok(n)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A blob name (relative to the mount prefix) as a path.
#[derive(Debug, PartialEq, Eq)]
pub struct BlobPath {
    pub segments: Vec<Name>,
    /// The name ended in `/` (a directory marker in ADLS style).
    pub trailing_slash: bool,
}

/// Splits a blob name relative to the mount prefix into path segments.
pub fn split_blob_name(rel: &str) -> Result<BlobPath, NameError> {
    let (body, trailing_slash) = match rel.strip_suffix('/') {
        Some(b) => (b, true),
        None => (rel, false),
    };
    let segments = body
        .split('/')
        .map(|s| Name::new(s.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BlobPath {
        segments,
        trailing_slash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_plain_names() {
        let p = split_blob_name("a/b/c.txt").unwrap();
        assert_eq!(p.segments.len(), 3);
        assert!(!p.trailing_slash);
        assert_eq!(p.segments[2].as_bytes(), b"c.txt");
    }

    #[test]
    fn refuses_names_no_posix_path_can_hold() {
        assert_eq!(split_blob_name("a//b"), Err(NameError::Empty));
        assert_eq!(split_blob_name("/a"), Err(NameError::Empty));
        assert_eq!(split_blob_name("a/./b"), Err(NameError::Dot));
        assert_eq!(split_blob_name("a/../b"), Err(NameError::Dot));
        assert_eq!(split_blob_name(""), Err(NameError::Empty));
        let long = format!("d/{}", "x".repeat(256));
        assert_eq!(split_blob_name(&long), Err(NameError::TooLong));
        assert!(split_blob_name(&format!("d/{}", "x".repeat(255))).is_ok());
    }

    #[test]
    fn trailing_slash_is_noted() {
        let p = split_blob_name("a/b/").unwrap();
        assert!(p.trailing_slash);
        assert_eq!(p.segments.len(), 2);
        assert_eq!(split_blob_name("a//"), Err(NameError::Empty));
    }

    #[test]
    fn a_new_entry_name_must_be_storable_as_itself() {
        let new = |root, s: &[u8]| Name::for_new_entry(root, OsStr::from_bytes(s));
        assert_eq!(new(false, b"caf\xe9"), Err(NameError::NotUtf8));
        assert_eq!(new(false, b"a\\b"), Err(NameError::Backslash));
        assert_eq!(new(true, b".simfs"), Err(NameError::Reserved));
        assert_eq!(new(false, b"a/b"), Err(NameError::BadByte));
        assert!(new(false, b".simfs").is_ok(), "only the root's is reserved");
        assert!(new(true, "café".as_bytes()).is_ok());
    }

    #[test]
    fn only_what_is_below_the_reserved_directory_is_reserved() {
        assert!(is_reserved(".simfs/index/snapshot.db.gz"));
        assert!(!is_reserved(".simfs"));
        assert!(!is_reserved(".simfsx/a"));
        assert!(!is_reserved("a/.simfs/b"));
    }

    #[test]
    fn name_rejects_slash_and_nul() {
        assert_eq!(Name::new(b"a/b"), Err(NameError::BadByte));
        assert_eq!(Name::new(b"a\0b"), Err(NameError::BadByte));
        assert_eq!(Name::new(b".."), Err(NameError::Dot));
        assert_eq!(Name::new(&[b'x'; 256]), Err(NameError::TooLong));
    }
}
