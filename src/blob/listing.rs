//! Listing a whole container (or prefix) quickly: a parallel split by directory.
//!
//! Azure lists 5,000 names per request in name order, so a sequential listing of a large
//! container is a chain of round trips. simfs splits the name space as it goes: when a page
//! ends inside a directory `P/d/`, a new task takes `P/d/` from the page's last name onwards
//! (with `startFrom`) and the current task skips past it to `P/d0` (`'0'` is the byte after
//! `'/'`). Every name under `P` with a segment `d` lies in `[P/d/, P/d0)`, so the two tasks
//! cover the rest exactly once, and big directories fan out recursively.
//!
//! A service that ignores `startFrom` still gets a correct listing: names below the task's
//! lower bound are dropped and the task follows markers instead, splitting only on pages that
//! end inside its own range, so no name is reported twice.

use super::{BlobError, BlobProps, BlobStore, ListQuery};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};

/// Counts what a listing has found so far, for progress lines.
#[derive(Default, Debug)]
pub struct ListProgress {
    pub blobs: AtomicU64,
    pub requests: AtomicU64,
}

/// Lists every blob under `prefix` with `concurrency` requests in flight at most, sending
/// pages to the returned channel. The channel closes when the listing is done; an error is
/// sent in place of a page and ends the listing.
pub fn list_all(
    store: Arc<dyn BlobStore>,
    prefix: String,
    concurrency: usize,
    progress: Arc<ListProgress>,
) -> mpsc::Receiver<Result<Vec<BlobProps>, BlobError>> {
    // Pages wait here while the index writer catches up: a bound on memory (5,000 blobs each).
    let (tx, rx) = mpsc::channel(8);
    let ctx = Arc::new(Ctx {
        store,
        permits: Semaphore::new(concurrency.max(1)),
        progress,
    });
    tokio::spawn(scan(ctx, tx, prefix, None));
    rx
}

struct Ctx {
    store: Arc<dyn BlobStore>,
    permits: Semaphore,
    progress: Arc<ListProgress>,
}

type Tx = mpsc::Sender<Result<Vec<BlobProps>, BlobError>>;

/// Lists names under `prefix` that are >= `lower` (all of them when `lower` is None).
/// `lower` itself is skipped when `skip_lower` (the spawning task already reported it).
fn scan(
    ctx: Arc<Ctx>,
    tx: Tx,
    prefix: String,
    start: Option<(String, bool)>,
) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        let (mut lower, mut skip_exact) = match start {
            Some((l, skip)) => (Some(l.clone()), skip.then_some(l)),
            None => (None, None),
        };
        let mut marker: Option<String> = None;
        loop {
            let query = ListQuery {
                prefix: prefix.clone(),
                start_from: lower.clone(),
                marker: marker.clone(),
                max_results: None,
            };
            let page = {
                let _permit = ctx.permits.acquire().await.expect("semaphore never closed");
                ctx.progress.requests.fetch_add(1, Ordering::Relaxed);
                ctx.store.list(&query).await
            };
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let last = page.blobs.last().map(|b| b.name.clone());
            let blobs: Vec<BlobProps> = page
                .blobs
                .into_iter()
                .filter(|b| b.name.starts_with(&prefix))
                .filter(|b| lower.as_ref().is_none_or(|l| b.name >= *l))
                .filter(|b| skip_exact.as_ref() != Some(&b.name))
                .collect();
            ctx.progress
                .blobs
                .fetch_add(blobs.len() as u64, Ordering::Relaxed);
            if !blobs.is_empty() && tx.send(Ok(blobs)).await.is_err() {
                return; // receiver gone: the caller gave up
            }
            let Some(next) = page.next_marker else { return };
            let Some(last) = last else {
                marker = Some(next);
                continue;
            };
            let in_range = lower.as_ref().is_none_or(|l| last >= *l);
            match in_range.then(|| split_point(&prefix, &last)).flatten() {
                Some((dir, resume)) => {
                    tokio::spawn(scan(ctx.clone(), tx.clone(), dir, Some((last, true))));
                    lower = Some(resume);
                    skip_exact = None;
                    marker = None;
                }
                None => marker = Some(next),
            }
        }
    })
}

/// For a page that ended at `last` under `prefix`: the directory `last` lies in (`P/d/`) and
/// the first name after that directory (`P/d0`), or None when `last` is a direct child.
fn split_point(prefix: &str, last: &str) -> Option<(String, String)> {
    let rest = last.strip_prefix(prefix)?;
    let slash = rest.find('/')?;
    let seg = &rest[..slash];
    Some((format!("{prefix}{seg}/"), format!("{prefix}{seg}0")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::faulty::FaultyStore;
    use crate::blob::memory::MemoryStore;
    use crate::blob::{BlobResult, Expect, ListPage, Metadata};
    use async_trait::async_trait;
    use bytes::Bytes;
    use std::ops::Range;

    /// Collects a whole listing.
    async fn collect_all(
        store: Arc<dyn BlobStore>,
        prefix: &str,
        concurrency: usize,
    ) -> Result<Vec<BlobProps>, BlobError> {
        let mut rx = list_all(store, prefix.to_string(), concurrency, Default::default());
        let mut out = Vec::new();
        while let Some(page) = rx.recv().await {
            out.extend(page?);
        }
        Ok(out)
    }

    fn seeded(page: usize) -> MemoryStore {
        let s = MemoryStore::with_page_size(page);
        for d in 0..7 {
            for f in 0..23 {
                s.put(&format!("data/d{d}/sub/f{f:03}"), "x", &[]);
            }
            s.put(&format!("data/d{d}.txt"), "y", &[]);
        }
        s.put("data/d1/sub", "file shadowed by dir", &[]);
        s.put("top", "z", &[]);
        s.put("a//b", "odd", &[]);
        s
    }

    fn names(mut v: Vec<BlobProps>) -> Vec<String> {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.into_iter().map(|b| b.name).collect()
    }

    #[tokio::test]
    async fn parallel_listing_reports_every_blob_exactly_once() {
        let store = Arc::new(FaultyStore::new(seeded(5)));
        let expected = names(collect_all(Arc::new(seeded(100_000)), "", 1).await.unwrap());
        assert_eq!(expected.len(), 7 * 23 + 7 + 3);
        let got = names(collect_all(store.clone(), "", 8).await.unwrap());
        assert_eq!(got, expected);
        let requests = store.counters.list.load(Ordering::SeqCst);
        assert!(requests > 1, "small pages force several requests");
    }

    #[tokio::test]
    async fn listing_honours_the_prefix() {
        let got = names(
            collect_all(Arc::new(seeded(4)), "data/d3/", 4)
                .await
                .unwrap(),
        );
        assert_eq!(got.len(), 23);
        assert!(got.iter().all(|n| n.starts_with("data/d3/")));
    }

    /// A service that ignores `startFrom` (older API versions) must still list correctly.
    struct IgnoresStartFrom(MemoryStore);

    #[async_trait]
    impl BlobStore for IgnoresStartFrom {
        async fn list(&self, q: &ListQuery) -> BlobResult<ListPage> {
            let mut q = q.clone();
            q.start_from = None;
            self.0.list(&q).await
        }
        async fn head(&self, name: &str) -> BlobResult<BlobProps> {
            self.0.head(name).await
        }
        async fn get_range(&self, n: &str, r: Range<u64>, e: &str) -> BlobResult<Bytes> {
            self.0.get_range(n, r, e).await
        }
        async fn check_access(&self) -> BlobResult<()> {
            Ok(())
        }
        async fn put(&self, n: &str, d: Bytes, m: &Metadata, e: &Expect) -> BlobResult<String> {
            BlobStore::put(&self.0, n, d, m, e).await
        }
        async fn stage_block(&self, n: &str, id: &[u8], d: Bytes) -> BlobResult<()> {
            self.0.stage_block(n, id, d).await
        }
        async fn commit_blocks(
            &self,
            n: &str,
            ids: &[Vec<u8>],
            m: &Metadata,
            e: &Expect,
        ) -> BlobResult<String> {
            self.0.commit_blocks(n, ids, m, e).await
        }
        async fn set_metadata(&self, n: &str, m: &Metadata, e: &str) -> BlobResult<String> {
            self.0.set_metadata(n, m, e).await
        }
        async fn copy(
            &self,
            f: &str,
            fe: &str,
            t: &str,
            m: &Metadata,
            e: &Expect,
        ) -> BlobResult<String> {
            self.0.copy(f, fe, t, m, e).await
        }
        async fn delete(&self, n: &str, e: &str) -> BlobResult<()> {
            self.0.delete(n, e).await
        }
    }

    #[tokio::test]
    async fn listing_is_exact_when_the_service_ignores_start_from() {
        let expected = names(collect_all(Arc::new(seeded(100_000)), "", 1).await.unwrap());
        let got = names(
            collect_all(Arc::new(IgnoresStartFrom(seeded(6))), "", 8)
                .await
                .unwrap(),
        );
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn listing_error_is_reported() {
        let store = Arc::new(FaultyStore::new(seeded(5)));
        store.set_offline(true);
        let err = collect_all(store, "", 4).await.unwrap_err();
        assert!(matches!(err, BlobError::Unreachable(_)));
    }

    #[test]
    fn split_point_skips_past_the_directory() {
        assert_eq!(
            split_point("p/", "p/dir/x/y"),
            Some(("p/dir/".into(), "p/dir0".into()))
        );
        assert_eq!(split_point("p/", "p/file"), None);
    }
}
