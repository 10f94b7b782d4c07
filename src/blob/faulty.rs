//! A wrapper around any store that counts requests and fails them on demand.
//!
//! Tests use the counters to prove the metadata path makes no request after mount, and the
//! switches to model a service that goes away (every request fails as unreachable) or a
//! blob that changes behind simfs's back.

use super::{BlobError, BlobProps, BlobResult, BlobStore, ListPage, ListQuery};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default, Debug)]
pub struct Counters {
    pub list: AtomicU64,
    pub head: AtomicU64,
    pub get: AtomicU64,
}

impl Counters {
    pub fn total(&self) -> u64 {
        self.list.load(Ordering::SeqCst)
            + self.head.load(Ordering::SeqCst)
            + self.get.load(Ordering::SeqCst)
    }
}

pub struct FaultyStore<S> {
    inner: S,
    pub counters: Arc<Counters>,
    offline: AtomicBool,
    /// Fail every `get_range` whose range starts at this offset (u64::MAX: never).
    fail_get_at: AtomicU64,
}

impl<S: BlobStore> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            counters: Arc::new(Counters::default()),
            offline: AtomicBool::new(false),
            fail_get_at: AtomicU64::new(u64::MAX),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// From now on every request fails as if the service were unreachable.
    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
    }

    /// Makes ranged GETs starting at `offset` fail with a service error.
    pub fn fail_get_at(&self, offset: u64) {
        self.fail_get_at.store(offset, Ordering::SeqCst);
    }

    fn gate(&self) -> BlobResult<()> {
        if self.offline.load(Ordering::SeqCst) {
            Err(BlobError::Unreachable("injected: service offline".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl<S: BlobStore> BlobStore for FaultyStore<S> {
    async fn list(&self, q: &ListQuery) -> BlobResult<ListPage> {
        self.counters.list.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        self.inner.list(q).await
    }

    async fn head(&self, name: &str) -> BlobResult<BlobProps> {
        self.counters.head.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        self.inner.head(name).await
    }

    async fn get_range(&self, name: &str, range: Range<u64>, etag: &str) -> BlobResult<Bytes> {
        self.counters.get.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        if range.start == self.fail_get_at.load(Ordering::SeqCst) {
            return Err(BlobError::Service("injected: ranged GET failed".into()));
        }
        self.inner.get_range(name, range, etag).await
    }

    async fn check_access(&self) -> BlobResult<()> {
        self.gate()?;
        self.inner.check_access().await
    }
}

/// Lets an `Arc<FaultyStore<_>>` be used where a store is expected while the test keeps a
/// handle on the switches.
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
    async fn check_access(&self) -> BlobResult<()> {
        (**self).check_access().await
    }
}
