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
//!   `a` is hidden — decided by the index builder, which sees both.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

pub const NAME_MAX: usize = 255;

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
    fn name_rejects_slash_and_nul() {
        assert_eq!(Name::new(b"a/b"), Err(NameError::BadByte));
        assert_eq!(Name::new(b"a\0b"), Err(NameError::BadByte));
        assert_eq!(Name::new(b".."), Err(NameError::Dot));
        assert_eq!(Name::new(&[b'x'; 256]), Err(NameError::TooLong));
    }
}
