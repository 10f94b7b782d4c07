//! The filesystem core's error: every failure a FUSE reply can carry, with its errno.

use crate::blob::BlobError;
use crate::cache::CacheError;
use crate::index::names::NameError;
use crate::index::IndexError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("not a symlink")]
    NotSymlink,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    #[error("invalid name: {0}")]
    Name(#[from] NameError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("local read: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("operation not supported")]
    Unsupported,
    #[error("file too large")]
    TooBig,
    #[error("upload failed: {0}")]
    Upload(String),
    #[error(transparent)]
    Writeback(std::sync::Arc<crate::writeback::WritebackError>),
}

impl From<BlobError> for FsError {
    fn from(e: BlobError) -> Self {
        FsError::Cache(CacheError::Blob(e))
    }
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::Name(e) => e.errno(),
            FsError::Index(e) => e.errno(),
            FsError::Cache(e) => e.errno(),
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Unsupported => libc::EOPNOTSUPP,
            FsError::TooBig => libc::EFBIG,
            FsError::Upload(_) => libc::EIO,
            FsError::Writeback(e) => e.errno(),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
