//! Ingesting the container into a new index: list in parallel, fetch symlink targets, write.
//!
//! This is the only part of the index that talks to the network, and it runs before the
//! mount is served. A listing that fails leaves any previous index untouched. Progress is
//! reported through a callback; drawing it is the caller's business.

use super::build::{BuildStats, Defaults, TreeBuilder, MAX_TARGET};
use super::{Index, IndexError, SourceId};
use crate::blob::listing::{list_all, ListProgress};
use crate::blob::{BlobError, BlobStore};
use futures::StreamExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Requests in flight at once while listing and fetching symlink targets.
    pub concurrency: usize,
    pub defaults: Defaults,
}

/// How far indexing has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestProgress {
    /// After each page of the listing.
    Listed { blobs: u64, requests: u64 },
    /// The listing is done; this many symlink targets are being read.
    ReadingTargets(usize),
}

/// A progress callback that ignores everything.
pub fn no_progress(_: IngestProgress) {}

/// Lists `prefix` of the container and writes a complete index at `db`, returning it opened.
pub async fn build_index(
    store: Arc<dyn BlobStore>,
    source: &SourceId,
    db: &Path,
    opts: &IngestOptions,
    progress_to: &(dyn Fn(IngestProgress) + Sync),
) -> Result<(Index, BuildStats), IngestError> {
    let started = Instant::now();
    let listing = Listing {
        under: "",
        known_target: &|_, _| None,
    };
    let (stats, requests) = write_listing(store, source, db, opts, &listing, progress_to).await?;
    tracing::info!(
        "indexed {} files, {} directories, {} symlinks ({} hidden) in {:.2?} with {} list requests",
        stats.files,
        stats.dirs,
        stats.symlinks,
        stats.hidden,
        started.elapsed(),
        requests
    );
    let index = Index::open_existing(db, source)?
        .ok_or_else(|| IndexError::Corrupt("freshly written index does not open".into()))?;
    Ok((index, stats))
}

/// What part of the source a listing covers, and what it already knows.
pub struct Listing<'a> {
    /// Only names that start with this (relative to the source's prefix) are listed.
    pub under: &'a str,
    /// The target of a symlink blob with this (name, ETag), when already known: a refresh
    /// reads only the targets of symlinks that are new or changed.
    pub known_target: &'a (dyn Fn(&str, &str) -> Option<Vec<u8>> + Sync),
}

/// Lists `listing.under` of the source and writes it as a complete index at `db`; returns
/// the build's counts and the number of list requests made.
pub async fn write_listing(
    store: Arc<dyn BlobStore>,
    source: &SourceId,
    db: &Path,
    opts: &IngestOptions,
    listing: &Listing<'_>,
    progress_to: &(dyn Fn(IngestProgress) + Sync),
) -> Result<(BuildStats, u64), IngestError> {
    let progress = Arc::new(ListProgress::default());
    let mut rx = list_all(
        store.clone(),
        format!("{}{}", source.prefix, listing.under),
        opts.concurrency,
        progress.clone(),
    );
    let mut builder = Some(TreeBuilder::create(db, opts.defaults.clone())?);
    while let Some(page) = rx.recv().await {
        let page = page?;
        // SQLite work leaves the runtime's workers free for the listing's requests.
        let mut b = builder
            .take()
            .expect("the builder comes back after each page");
        let prefix = source.prefix.clone();
        let (b, added) = tokio::task::spawn_blocking(move || {
            let r = add_page(&mut b, &prefix, page);
            (b, r)
        })
        .await
        .map_err(|e| IndexError::Corrupt(format!("index writer failed: {e}")))?;
        added?;
        builder = Some(b);
        progress_to(IngestProgress::Listed {
            blobs: progress.blobs.load(Ordering::Relaxed),
            requests: progress.requests.load(Ordering::Relaxed),
        });
    }
    let mut builder = builder.expect("the builder came back");
    let mut links = Vec::new();
    for (ino, blob) in builder.pending_symlinks()? {
        match (listing.known_target)(&blob.name, &blob.etag) {
            Some(t) => builder.set_target(ino, t)?,
            None => links.push((ino, blob)),
        }
    }
    progress_to(IngestProgress::ReadingTargets(links.len()));
    let mut fetched = futures::stream::iter(links.into_iter().map(|(id, blob)| {
        let store = store.clone();
        async move {
            let end = blob.size.min(MAX_TARGET);
            let data = store.get_range(&blob.name, 0..end, &blob.etag).await;
            (id, data)
        }
    }))
    .buffer_unordered(opts.concurrency.max(1));
    while let Some((id, data)) = fetched.next().await {
        builder.set_target(id, data?.to_vec())?;
    }
    let db_owned = db.to_path_buf();
    let source2 = source.clone();
    let stats = tokio::task::spawn_blocking(move || builder.write(&db_owned, &source2))
        .await
        .map_err(|e| IndexError::Corrupt(format!("index writer failed: {e}")))??;
    Ok((stats, progress.requests.load(Ordering::Relaxed)))
}

/// Adds one page of the listing to the build.
fn add_page(
    builder: &mut TreeBuilder,
    prefix: &str,
    page: Vec<crate::blob::BlobProps>,
) -> Result<(), IndexError> {
    for props in page {
        let Some(rel) = props.name.strip_prefix(prefix) else {
            continue;
        };
        if super::names::is_reserved(rel) {
            builder.hide(&props.name, "reserved for simfs (index snapshots)")?;
            continue;
        }
        match crate::blob::format::long_path(prefix, rel, &props.metadata) {
            Ok(Some(path)) => builder.add(&path, props)?,
            Ok(None) => {
                let rel = rel.to_string();
                builder.add(&rel, props)?
            }
            Err(why) => builder.hide(&props.name, why)?,
        }
    }
    Ok(())
}
