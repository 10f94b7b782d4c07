//! The filesystem core's error, and the one place where a failure of any layer becomes an
//! errno. Lower layers report what happened (a refused namespace change, a blob that is
//! gone, a full disk); what POSIX callers see is decided here, visibly.

use crate::blob::BlobError;
use crate::cache::CacheError;
use crate::index::names::NameError;
use crate::index::{IndexError, Refusal};
use crate::writeback::WritebackError;
use std::sync::Arc;

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
    #[error("cache disk: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("operation not supported")]
    Unsupported,
    #[error("file too large")]
    TooBig,
    #[error("the file changed hands while it was opened; try again")]
    Busy,
    #[error(transparent)]
    Writeback(#[from] Arc<WritebackError>),
}

impl From<BlobError> for FsError {
    fn from(e: BlobError) -> Self {
        FsError::Cache(CacheError::Blob(e))
    }
}

fn refusal_errno(r: Refusal) -> i32 {
    match r {
        Refusal::NotFound => libc::ENOENT,
        Refusal::Exists => libc::EEXIST,
        Refusal::NotEmpty => libc::ENOTEMPTY,
        Refusal::NotDir => libc::ENOTDIR,
        Refusal::IsDir => libc::EISDIR,
        Refusal::Invalid => libc::EINVAL,
        Refusal::NotPermitted => libc::EPERM,
        Refusal::TooManyLinks => libc::EMLINK,
    }
}

fn name_errno(e: &NameError) -> i32 {
    match e {
        NameError::TooLong => libc::ENAMETOOLONG,
        NameError::Empty
        | NameError::Dot
        | NameError::BadByte
        | NameError::NotUtf8
        | NameError::Backslash
        | NameError::Reserved => libc::EINVAL,
    }
}

fn io_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn index_errno(e: &IndexError) -> i32 {
    match e {
        IndexError::Refused(r) => refusal_errno(*r),
        // A full cache disk must reach the writer as ENOSPC, not as a generic I/O error.
        e if e.is_disk_full() => libc::ENOSPC,
        IndexError::Io(e) => io_errno(e),
        _ => libc::EIO,
    }
}

fn blob_errno(e: &BlobError) -> i32 {
    match e {
        BlobError::NotFound(_) | BlobError::ContainerNotFound(_) => libc::ENOENT,
        // The blob changed under an open: the kernel's view of the file is stale.
        BlobError::Changed(_) => libc::ESTALE,
        BlobError::Auth(_) => libc::EACCES,
        BlobError::Unreachable(_) | BlobError::Service(_) | BlobError::Invalid(_) => libc::EIO,
    }
}

fn cache_errno(e: &CacheError) -> i32 {
    match e {
        // The index says the file exists: a blob missing when it is read means the service
        // or the container is unwell, and a read must never look like a missing file.
        CacheError::Blob(BlobError::NotFound(_)) => libc::EIO,
        CacheError::Blob(e) => blob_errno(e),
        CacheError::Io(e) => io_errno(e),
        CacheError::Corrupt(_) => libc::EIO,
        CacheError::DiskFull => libc::ENOSPC,
    }
}

/// close, fsync and fsyncdir report every failure to commit as EIO, except a full cache
/// disk (the writer can free room and retry).
fn writeback_errno(e: &WritebackError) -> i32 {
    match e {
        WritebackError::Index(e) if e.is_disk_full() => libc::ENOSPC,
        _ => libc::EIO,
    }
}

impl FsError {
    /// The blob is not the version the index knew (another writer replaced it).
    pub fn is_changed(&self) -> bool {
        matches!(self, FsError::Cache(c) if c.is_changed())
    }

    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotSymlink => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::Name(e) => name_errno(e),
            FsError::Index(e) => index_errno(e),
            FsError::Cache(e) => cache_errno(e),
            FsError::Io(e) => io_errno(e),
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Unsupported => libc::EOPNOTSUPP,
            FsError::TooBig => libc::EFBIG,
            FsError::Busy => libc::EBUSY,
            FsError::Writeback(e) => writeback_errno(e),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
