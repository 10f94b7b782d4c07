//! The container, seen through one narrow trait.
//!
//! `BlobStore` is everything simfs asks of Azure Blob Storage: a page of a flat listing (with
//! metadata), a HEAD, a ranged GET guarded by an ETag, and the writes: a whole-blob PUT,
//! staged blocks and their commit, a metadata update, a server-side copy and a delete. Every
//! write names what it expects to find at the name (`Expect`), so simfs overwrites only a blob
//! version it has seen and never silently replaces someone else's. The Azure implementation lives in
//! `azure.rs`; `memory.rs` is a complete in-process store for unit tests and `faulty.rs` wraps
//! any store to count requests and inject failures (both only in tests, or with the
//! `test-util` feature that the crate's own tests and benches turn on). Keeping the trait this small is what lets
//! the filesystem core be tested without a network.
//!
//! Errors carry their meaning (`NotFound`, `Changed`, `Auth`, ...) rather than HTTP
//! codes so callers can map them to errnos without knowing which store produced them.

pub mod auth;
pub mod azure;
pub mod bounded;
#[cfg(any(test, feature = "test-util"))]
pub mod faulty;
pub mod format;
pub mod limits;
pub mod listing;
#[cfg(any(test, feature = "test-util"))]
pub mod memory;
mod policies;
pub mod sas;
pub mod upload;

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

/// Properties of one blob as the listing or a HEAD reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobProps {
    /// Full blob name within the container (not stripped of the mount prefix).
    pub name: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: SystemTime,
    /// Raw Content-MD5 bytes when the service has one (whole-blob uploads only).
    pub content_md5: Option<Vec<u8>>,
    /// Metadata with keys lower-cased: Azure keys are case-insensitive.
    pub metadata: BTreeMap<String, String>,
}

/// One version of one blob, as the index records it: what a download asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    pub name: String,
    pub etag: String,
    pub size: u64,
    pub content_md5: Option<Vec<u8>>,
}

/// One page of a flat, name-ordered listing.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub blobs: Vec<BlobProps>,
    /// Opaque continuation; `None` when the listing under the query is complete.
    pub next_marker: Option<String>,
}

/// A listing request: names under `prefix`, at or after `start_from`, resuming at `marker`.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub prefix: String,
    pub start_from: Option<String>,
    pub marker: Option<String>,
    pub max_results: Option<u32>,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum BlobError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("the container does not exist: {0}")]
    ContainerNotFound(String),
    /// The one way "the blob is not the version expected" (HTTP 412) is told, from every
    /// layer: match it by type (`is_changed` on the errors that wrap it), never by errno.
    #[error("the blob changed since it was indexed (ETag mismatch): {0}")]
    Changed(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("the storage service cannot be reached: {0}")]
    Unreachable(String),
    #[error("the storage service answered with an error: {0}")]
    Service(String),
    #[error("the service returned inconsistent data: {0}")]
    Invalid(String),
}

impl BlobError {
    /// The blob is not the version the request expected.
    pub fn is_changed(&self) -> bool {
        matches!(self, BlobError::Changed(_))
    }

    /// The service pushes back: unreachable or timing out, busy or throttling (HTTP 500,
    /// 503, 429). Whoever sends many requests at once should send fewer for a while.
    pub fn is_pushback(&self) -> bool {
        match self {
            BlobError::Unreachable(_) => true,
            BlobError::Service(m) => ["HTTP 500", "HTTP 503", "HTTP 429"]
                .iter()
                .any(|c| m.contains(c)),
            _ => false,
        }
    }
}

pub type BlobResult<T> = Result<T, BlobError>;

/// A checksum the service computes for a ranged answer of at most 4 MiB, when asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    Md5,
    Crc64,
}

/// What a `read_range` delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Got {
    pub bytes: u64,
    /// The service's checksum of the range, when asked for and given: MD5's 16 bytes, or
    /// CRC64's 8 (little-endian, as `x-ms-content-crc64` carries it).
    pub sum: Option<Vec<u8>>,
}

/// Where `read_range` delivers: (offset from the range's start, bytes).
pub type Sink<'a> = dyn FnMut(u64, Bytes) -> std::io::Result<()> + Send + 'a;

/// Why a `read_range` stopped: the store failed, or the sink did (a full cache disk).
#[derive(Debug)]
pub enum ReadError {
    Blob(BlobError),
    Sink(std::io::Error),
}

impl From<BlobError> for ReadError {
    fn from(e: BlobError) -> Self {
        ReadError::Blob(e)
    }
}

/// Blob metadata as simfs writes it (lower-case keys).
pub type Metadata = BTreeMap<String, String>;

/// What a write expects to find at its target name; the service refuses the write with
/// `Changed` otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No blob at the name (a new file).
    Absent,
    /// Exactly this version (the one simfs last saw or wrote).
    Etag(String),
}

/// What simfs needs from a container. Implementations must be cheap to share across threads.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// A page of blobs ordered by name. Honouring `start_from` is an optimisation the listing
    /// relies on for parallelism; a store that ignores it must still return correct pages.
    async fn list(&self, query: &ListQuery) -> BlobResult<ListPage>;

    /// Properties and metadata of one blob.
    async fn head(&self, name: &str) -> BlobResult<BlobProps>;

    /// Bytes `range` of blob `name`, failing with `Changed` when its ETag is no
    /// longer `etag`.
    async fn get_range(&self, name: &str, range: Range<u64>, etag: &str) -> BlobResult<Bytes>;

    /// Bytes `range` of blob `name` (as `get_range`), handed to `sink` piece by piece as
    /// they arrive, each with its offset from the range's start: a caller that lands them
    /// in a file needs no buffer of the range, and the Azure store passes on the frames its
    /// HTTP client received without copying them into one. A retried answer starts again
    /// at offset 0. Returns how many bytes the sink took. The default fetches the range
    /// whole and hands it on in one piece.
    ///
    /// With `want`, the service is asked to checksum its answer (see `Checksum`); it may
    /// not (an emulator, a range over 4 MiB): `Got::sum` then stays None.
    async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &str,
        want: Option<Checksum>,
        sink: &mut Sink<'_>,
    ) -> Result<Got, ReadError> {
        let _ = want;
        let data = self.get_range(name, range, etag).await?;
        let bytes = data.len() as u64;
        sink(0, data).map_err(ReadError::Sink)?;
        Ok(Got { bytes, sum: None })
    }

    /// How many answers so far said the service is throttling (503 ServerBusy, 429, 500
    /// OperationTimedOut), retried or not: callers that run many requests at once lower
    /// their number while it grows.
    fn throttled(&self) -> u64 {
        0
    }

    /// Confirms the container exists and the credentials can list it.
    async fn check_access(&self) -> BlobResult<()>;

    /// Writes `data` as the whole blob `name` with `metadata`; returns the new ETag.
    async fn put(
        &self,
        name: &str,
        data: Bytes,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String>;

    /// Stages one block of a future `commit_blocks`; ids of one blob have equal lengths.
    async fn stage_block(&self, name: &str, id: &[u8], data: Bytes) -> BlobResult<()>;

    /// Commits staged blocks, in order, as the blob's content; returns the new ETag.
    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[Vec<u8>],
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String>;

    /// Replaces the metadata of version `etag` of `name`; returns the new ETag.
    async fn set_metadata(&self, name: &str, metadata: &Metadata, etag: &str)
        -> BlobResult<String>;

    /// Server-side copy of version `from_etag` of `from` to `to` with `metadata`, complete
    /// when this returns; returns the new blob's ETag.
    async fn copy(
        &self,
        from: &str,
        from_etag: &str,
        to: &str,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String>;

    /// Deletes version `etag` of `name`.
    async fn delete(&self, name: &str, etag: &str) -> BlobResult<()>;
}

/// Lower-cases metadata keys: Azure treats them case-insensitively, simfs reads them so.
pub fn normalize_metadata<I, K, V>(pairs: I) -> BTreeMap<String, String>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: Into<String>,
{
    pairs
        .into_iter()
        .map(|(k, v)| (k.as_ref().to_ascii_lowercase(), v.into()))
        .collect()
}

/// A shared store is a store (tests keep an `Arc` to inspect what a mount did).
#[async_trait]
impl<S: BlobStore> BlobStore for Arc<S> {
    async fn list(&self, q: &ListQuery) -> BlobResult<ListPage> {
        (**self).list(q).await
    }
    async fn head(&self, name: &str) -> BlobResult<BlobProps> {
        (**self).head(name).await
    }
    async fn get_range(&self, name: &str, range: Range<u64>, etag: &str) -> BlobResult<Bytes> {
        (**self).get_range(name, range, etag).await
    }
    async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &str,
        want: Option<Checksum>,
        sink: &mut Sink<'_>,
    ) -> Result<Got, ReadError> {
        (**self).read_range(name, range, etag, want, sink).await
    }
    fn throttled(&self) -> u64 {
        (**self).throttled()
    }
    async fn check_access(&self) -> BlobResult<()> {
        (**self).check_access().await
    }
    async fn put(&self, n: &str, d: Bytes, m: &Metadata, e: &Expect) -> BlobResult<String> {
        (**self).put(n, d, m, e).await
    }
    async fn stage_block(&self, name: &str, id: &[u8], data: Bytes) -> BlobResult<()> {
        (**self).stage_block(name, id, data).await
    }
    async fn commit_blocks(
        &self,
        n: &str,
        ids: &[Vec<u8>],
        m: &Metadata,
        e: &Expect,
    ) -> BlobResult<String> {
        (**self).commit_blocks(n, ids, m, e).await
    }
    async fn set_metadata(&self, n: &str, m: &Metadata, etag: &str) -> BlobResult<String> {
        (**self).set_metadata(n, m, etag).await
    }
    async fn copy(
        &self,
        from: &str,
        from_etag: &str,
        to: &str,
        m: &Metadata,
        e: &Expect,
    ) -> BlobResult<String> {
        (**self).copy(from, from_etag, to, m, e).await
    }
    async fn delete(&self, name: &str, etag: &str) -> BlobResult<()> {
        (**self).delete(name, etag).await
    }
}
