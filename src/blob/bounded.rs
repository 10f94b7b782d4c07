//! A time limit on every request: a store wrapper that turns a request without an answer
//! into `Unreachable` after a deadline.
//!
//! The SDK retries failed requests for up to 30 s, but a service that accepts a connection
//! and never answers (a frozen front end, a black-holed route) would hold a request, and
//! whoever waits for it, forever. Each request gets `base` plus one second per MiB it moves,
//! so a slow but live link still finishes large transfers.

use super::{
    BlobProps, BlobResult, BlobStore, Expect, ListPage, ListQuery, Metadata, ReadError, Sink,
};
use super::{Checksum, Got};
use crate::blob::BlobError;
use async_trait::async_trait;
use bytes::Bytes;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

pub struct Bounded<S> {
    inner: S,
    base: Duration,
}

/// The default deadline of a request that moves no data.
pub const DEFAULT_BASE: Duration = Duration::from_secs(60);

impl<S: BlobStore> Bounded<S> {
    pub fn new(inner: S, base: Duration) -> Bounded<S> {
        Bounded { inner, base }
    }

    fn limit(&self, bytes: u64) -> Duration {
        self.base + Duration::from_secs(bytes >> 20)
    }

    async fn within<T>(
        &self,
        what: &str,
        bytes: u64,
        fut: impl Future<Output = BlobResult<T>>,
    ) -> BlobResult<T> {
        let limit = self.limit(bytes);
        tokio::time::timeout(limit, fut)
            .await
            .unwrap_or_else(|_| Err(no_answer(what, limit)))
    }
}

fn no_answer(what: &str, limit: Duration) -> BlobError {
    BlobError::Unreachable(format!("{what}: no answer within {limit:?}"))
}

#[async_trait]
impl<S: BlobStore> BlobStore for Bounded<S> {
    async fn list(&self, q: &ListQuery) -> BlobResult<ListPage> {
        self.within("list", 0, self.inner.list(q)).await
    }
    async fn head(&self, name: &str) -> BlobResult<BlobProps> {
        self.within(name, 0, self.inner.head(name)).await
    }
    async fn get_range(&self, name: &str, range: Range<u64>, etag: &str) -> BlobResult<Bytes> {
        let n = range.end.saturating_sub(range.start);
        self.within(name, n, self.inner.get_range(name, range, etag))
            .await
    }
    async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &str,
        want: Option<Checksum>,
        sink: &mut Sink<'_>,
    ) -> Result<Got, ReadError> {
        let limit = self.limit(range.end.saturating_sub(range.start));
        tokio::time::timeout(limit, self.inner.read_range(name, range, etag, want, sink))
            .await
            .unwrap_or_else(|_| Err(no_answer(name, limit).into()))
    }
    fn throttled(&self) -> u64 {
        self.inner.throttled()
    }
    async fn check_access(&self) -> BlobResult<()> {
        self.within("the container", 0, self.inner.check_access())
            .await
    }
    async fn put(&self, n: &str, d: Bytes, m: &Metadata, e: &Expect) -> BlobResult<String> {
        let len = d.len() as u64;
        self.within(n, len, self.inner.put(n, d, m, e)).await
    }
    async fn stage_block(&self, name: &str, id: &[u8], data: Bytes) -> BlobResult<()> {
        let len = data.len() as u64;
        self.within(name, len, self.inner.stage_block(name, id, data))
            .await
    }
    async fn commit_blocks(
        &self,
        n: &str,
        ids: &[Vec<u8>],
        m: &Metadata,
        e: &Expect,
    ) -> BlobResult<String> {
        self.within(n, 0, self.inner.commit_blocks(n, ids, m, e))
            .await
    }
    async fn set_metadata(&self, n: &str, m: &Metadata, etag: &str) -> BlobResult<String> {
        self.within(n, 0, self.inner.set_metadata(n, m, etag)).await
    }
    async fn copy(
        &self,
        from: &str,
        from_etag: &str,
        to: &str,
        m: &Metadata,
        e: &Expect,
    ) -> BlobResult<String> {
        self.within(to, 0, self.inner.copy(from, from_etag, to, m, e))
            .await
    }
    async fn delete(&self, name: &str, etag: &str) -> BlobResult<()> {
        self.within(name, 0, self.inner.delete(name, etag)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::faulty::FaultyStore;
    use crate::blob::memory::MemoryStore;

    #[tokio::test]
    async fn a_request_without_an_answer_fails_after_its_deadline() {
        let store = FaultyStore::new(MemoryStore::new());
        store.inner().put("a", "x", &[]);
        store.set_latency(Duration::from_secs(3600));
        let bounded = Bounded::new(store, Duration::from_millis(100));
        let t = std::time::Instant::now();
        let err = bounded.head("a").await.unwrap_err();
        assert!(matches!(err, BlobError::Unreachable(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(30));
    }
}
