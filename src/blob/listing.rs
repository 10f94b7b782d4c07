//! Listing a whole container (or prefix) quickly: a parallel split by directory, and by
//! name range inside a directory too large for one page.
//!
//! Azure lists 5,000 names per request in name order, so a sequential listing of a large
//! container is a chain of round trips. simfs splits the name space as it goes: when a page
//! ends inside a directory `P/d/`, a new task takes `P/d/` from the page's last name onwards
//! (with `startFrom`) and the current task skips past it to `P/d0` (`'0'` is the byte after
//! `'/'`). Every name under `P` with a segment `d` lies in `[P/d/, P/d0)`, so the two tasks
//! cover the rest exactly once, and big directories fan out recursively.
//!
//! A full page that ends on a direct child of the task's directory (a flat directory of
//! shards) is split by name range instead: from the page's last name `L`, each position
//! from where the page's first and last names differ back to the directory's start gives a
//! split point, `L` cut there with that byte raised by one (`shard-00004999` gives
//! `shard-00005`, `shard-0001`, `shard-001`, ...). The points are ascending and each new
//! task owns `[point, next point)`, the last one up to the current task's own upper bound,
//! which the current task takes as its new bound: every name is still listed once, sparse
//! ranges cost one short request, and dense ones split again on their first full page.
//!
//! A service that ignores `startFrom` still gets a correct listing: names below the task's
//! lower bound are dropped and the task follows markers instead, splitting only on pages that
//! end inside its own range, so no name is reported twice; range splits stop once a page
//! shows `startFrom` was ignored (each range task would page from the directory's start).

use super::{BlobError, BlobProps, BlobStore, ListQuery};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
        no_start_from: AtomicBool::new(false),
    });
    tokio::spawn(scan(ctx, tx, prefix, None, None));
    rx
}

struct Ctx {
    store: Arc<dyn BlobStore>,
    permits: Semaphore,
    progress: Arc<ListProgress>,
    /// The service answered a `startFrom` with names below it: no more range splits.
    no_start_from: AtomicBool,
}

/// Split points after most of these: the last task keeps the rest of the range.
const MAX_RANGE_SPLITS: usize = 8;

type Tx = mpsc::Sender<Result<Vec<BlobProps>, BlobError>>;

/// Lists names under `prefix` that are >= `lower` (all of them when `lower` is None) and
/// below `upper` (when given). `lower` itself is skipped when `skip_lower` (the spawning task
/// already reported it).
fn scan(
    ctx: Arc<Ctx>,
    tx: Tx,
    prefix: String,
    start: Option<(String, bool)>,
    mut upper: Option<String>,
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
            if let (Some(from), Some(first)) = (&query.start_from, page.blobs.first()) {
                if first.name < *from && first.name.starts_with(&prefix) {
                    ctx.no_start_from.store(true, Ordering::Relaxed);
                }
            }
            let first = page
                .blobs
                .iter()
                .find(|b| lower.as_ref().is_none_or(|l| b.name >= *l))
                .map(|b| b.name.clone());
            let last = page.blobs.last().map(|b| b.name.clone());
            let past_upper = match (&upper, &last) {
                (Some(u), Some(l)) => l >= u,
                _ => false,
            };
            let blobs: Vec<BlobProps> = page
                .blobs
                .into_iter()
                .filter(|b| b.name.starts_with(&prefix))
                .filter(|b| lower.as_ref().is_none_or(|l| b.name >= *l))
                .filter(|b| upper.as_ref().is_none_or(|u| b.name < *u))
                .filter(|b| skip_exact.as_ref() != Some(&b.name))
                .collect();
            ctx.progress
                .blobs
                .fetch_add(blobs.len() as u64, Ordering::Relaxed);
            if !blobs.is_empty() && tx.send(Ok(blobs)).await.is_err() {
                return; // receiver gone: the caller gave up
            }
            if past_upper {
                return;
            }
            let Some(next) = page.next_marker else { return };
            let Some(last) = last else {
                marker = Some(next);
                continue;
            };
            let in_range = lower.as_ref().is_none_or(|l| last >= *l);
            match in_range.then(|| split_point(&prefix, &last)).flatten() {
                Some((dir, resume)) => {
                    // The directory's task stops where this task's range does.
                    let dir_upper = upper.clone().filter(|u| *u < resume);
                    let start = Some((last, true));
                    tokio::spawn(scan(ctx.clone(), tx.clone(), dir, start, dir_upper));
                    if upper.as_ref().is_some_and(|u| resume >= *u) {
                        return;
                    }
                    lower = Some(resume);
                    skip_exact = None;
                    marker = None;
                }
                None => {
                    let points = match (in_range, &first) {
                        (true, Some(first)) if !ctx.no_start_from.load(Ordering::Relaxed) => {
                            range_points(&prefix, first, &last, upper.as_deref())
                        }
                        _ => Vec::new(),
                    };
                    for (i, p) in points.iter().enumerate() {
                        let up = points.get(i + 1).cloned().or_else(|| upper.clone());
                        let start = Some((p.clone(), false));
                        tokio::spawn(scan(ctx.clone(), tx.clone(), prefix.clone(), start, up));
                    }
                    if let Some(p) = points.first() {
                        upper = Some(p.clone());
                    }
                    marker = Some(next);
                }
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

/// Where to split the rest of a flat directory after a full page from `first` to `last`
/// (both direct children of `prefix`), below `upper`: ascending names above `last` (see the
/// module's comment). Empty when no position gives one.
fn range_points(prefix: &str, first: &str, last: &str, upper: Option<&str>) -> Vec<String> {
    let (f, l) = (first.as_bytes(), last.as_bytes());
    let start = prefix.len();
    let differ = f
        .iter()
        .zip(l)
        .position(|(a, b)| a != b)
        .unwrap_or(f.len().min(l.len()));
    let mut points = Vec::new();
    for j in (start..=differ.min(l.len().saturating_sub(1))).rev() {
        // Only printable ASCII is raised, so the point stays valid UTF-8.
        let c = l[j];
        if !(0x20..0x7e).contains(&c) || !last.is_char_boundary(j) {
            continue;
        }
        let mut p = l[..j].to_vec();
        p.push(c + 1);
        let p = String::from_utf8(p).expect("ASCII appended to a char boundary");
        if upper.is_some_and(|u| p.as_str() >= u) {
            break;
        }
        points.push(p);
        if points.len() == MAX_RANGE_SPLITS {
            break;
        }
    }
    points
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

    /// A store that answers each list request after a short wait, counting how many are in
    /// flight at once, and that can ignore `startFrom` (older API versions) as a service may.
    #[derive(Default)]
    struct Probe {
        store: MemoryStore,
        ignore_start_from: bool,
        in_flight: std::sync::atomic::AtomicUsize,
        most_in_flight: std::sync::atomic::AtomicUsize,
    }

    /// `store` behind a service that ignores `startFrom`.
    fn ignoring_start_from(store: MemoryStore) -> Probe {
        Probe {
            store,
            ignore_start_from: true,
            ..Default::default()
        }
    }

    #[async_trait]
    impl BlobStore for Probe {
        async fn list(&self, q: &ListQuery) -> BlobResult<ListPage> {
            let mut q = q.clone();
            if self.ignore_start_from {
                q.start_from = None;
            }
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            let page = self.store.list(&q).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            page
        }
        async fn head(&self, name: &str) -> BlobResult<BlobProps> {
            self.store.head(name).await
        }
        async fn get_range(&self, n: &str, r: Range<u64>, e: &str) -> BlobResult<Bytes> {
            self.store.get_range(n, r, e).await
        }
        async fn check_access(&self) -> BlobResult<()> {
            Ok(())
        }
        async fn put(&self, n: &str, d: Bytes, m: &Metadata, e: &Expect) -> BlobResult<String> {
            BlobStore::put(&self.store, n, d, m, e).await
        }
        async fn stage_block(&self, n: &str, id: &[u8], d: Bytes) -> BlobResult<()> {
            self.store.stage_block(n, id, d).await
        }
        async fn commit_blocks(
            &self,
            n: &str,
            ids: &[Vec<u8>],
            m: &Metadata,
            e: &Expect,
        ) -> BlobResult<String> {
            self.store.commit_blocks(n, ids, m, e).await
        }
        async fn set_metadata(&self, n: &str, m: &Metadata, e: &str) -> BlobResult<String> {
            self.store.set_metadata(n, m, e).await
        }
        async fn copy(
            &self,
            f: &str,
            fe: &str,
            t: &str,
            m: &Metadata,
            e: &Expect,
        ) -> BlobResult<String> {
            self.store.copy(f, fe, t, m, e).await
        }
        async fn delete(&self, n: &str, e: &str) -> BlobResult<()> {
            self.store.delete(n, e).await
        }
    }

    #[tokio::test]
    async fn listing_is_exact_when_the_service_ignores_start_from() {
        let expected = names(collect_all(Arc::new(seeded(100_000)), "", 1).await.unwrap());
        let got = names(
            collect_all(Arc::new(ignoring_start_from(seeded(6))), "", 8)
                .await
                .unwrap(),
        );
        assert_eq!(got, expected);
    }

    /// A flat directory of numbered shards, hashed names beside it, a subdirectory inside.
    fn flat(page: usize) -> MemoryStore {
        let s = MemoryStore::with_page_size(page);
        for i in 0..2000 {
            s.put(&format!("flat/shard-{i:06}.tar"), "", &[]);
        }
        for i in 0..300u32 {
            let h = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(i.to_le_bytes()));
            s.put(&format!("flat/{}", &h[..12]), "", &[]);
        }
        for i in 0..40 {
            s.put(&format!("flat/shard-000777.tar.d/part-{i}"), "", &[]);
        }
        s
    }

    #[tokio::test]
    async fn a_flat_directory_is_split_by_name_range_and_listed_exactly_once() {
        let expected = names(collect_all(Arc::new(flat(100_000)), "", 1).await.unwrap());
        assert_eq!(expected.len(), 2340);
        let probe = Arc::new(Probe {
            store: flat(50),
            ..Default::default()
        });
        let got = names(collect_all(probe.clone(), "", 8).await.unwrap());
        assert_eq!(got, expected);
        let most = probe.most_in_flight.load(Ordering::SeqCst);
        assert!(
            most > 2,
            "requests ran side by side inside the directory: {most}"
        );
        // Exact, and no longer split, when the service ignores startFrom.
        let got = names(
            collect_all(Arc::new(ignoring_start_from(flat(50))), "", 8)
                .await
                .unwrap(),
        );
        assert_eq!(got, expected);
    }

    #[test]
    fn range_points_rise_from_the_last_name_and_stay_below_the_bound() {
        let p = range_points("d/", "d/shard-00000000", "d/shard-00004999", None);
        assert_eq!(
            &p[..4],
            ["d/shard-00005", "d/shard-0001", "d/shard-001", "d/shard-01"]
        );
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        assert!(p.len() <= MAX_RANGE_SPLITS);
        let bounded = range_points("d/", "d/a0", "d/a9", Some("d/b"));
        assert_eq!(bounded, ["d/a:"], "'b' would reach the bound");
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
