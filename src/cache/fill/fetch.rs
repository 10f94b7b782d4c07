//! One chunk's request: what it asks the service for, how its answer reaches the file, and
//! what is checked on arrival.
//!
//! The answer's pieces go to the file as they arrive, with no buffer of the chunk between,
//! and off the async threads: one blocking task per request writes them in order and
//! computes the checksums, so neither costs the async threads anything. A retried answer
//! starts over at offset 0 (its pieces land after the first attempt's, in order).
//!
//! What is checked follows the fill's plan (`verify.rs`): a blob of one chunk against its
//! Content-MD5 as it arrives, otherwise each range against the checksum the service
//! computed for it. A range that arrives corrupted is fetched again, `RANGE_RETRIES` times;
//! one that arrives without the checksum asked for is left to the whole-blob check.

use super::{CacheError, Fill};
use crate::blob::ReadError;
use crate::cache::verify::{Checksum, Plan, Running};
use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

/// How many times a range that arrives corrupted is fetched again before its read fails.
const RANGE_RETRIES: u32 = 2;

/// How many bytes of an answer are gathered before the blocking pool writes them.
const WRITE_BATCH: u64 = 1 << 20;

impl Fill {
    /// What this fill's checks are now (auto mode learns from the service's answers).
    pub(super) fn plan(&self) -> Plan {
        self.verifier.plan(self.blob.content_md5.is_some())
    }

    /// Fetches chunk `i`, again when its range arrived corrupted (its checksum says so)
    /// or without the checksum the plan now asks for.
    pub(super) async fn fetch(&self, i: usize) -> Result<u64, CacheError> {
        let mut corrupted = 0;
        loop {
            let plan = self.plan();
            // A blob of one chunk is verified against its Content-MD5 as it arrives.
            let whole = self.chunk_count() == 1 && plan.whole_md5;
            let want = if whole { None } else { plan.per_range };
            let (bytes, sum) = self.fetch_once(i, want, whole).await?;
            let Some(w) = want else { return Ok(bytes) };
            let (local, given) = sum;
            match given {
                Some(given) if given == local => {
                    self.verifier.answered(w, true);
                    return Ok(bytes);
                }
                Some(_) => {
                    self.verifier.answered(w, true);
                    corrupted += 1;
                    let (start, end) = self.range_of(i);
                    tracing::warn!(
                        "{:?}: bytes {start}..{end} arrived corrupted ({w:?} mismatch); fetching them again",
                        self.blob.name
                    );
                    if corrupted > RANGE_RETRIES {
                        return Err(CacheError::Corrupt(format!(
                            "{:?}: bytes {start}..{end} failed their {w:?} check {corrupted} times",
                            self.blob.name
                        )));
                    }
                }
                None => {
                    self.verifier.answered(w, false);
                    if self.plan().per_range == Some(w) || self.plan().whole_md5 {
                        // Nothing better to ask for: the whole-blob check (if any) decides.
                        self.unverified.store(true, Ordering::Relaxed);
                        return Ok(bytes);
                    }
                }
            }
        }
    }

    /// One request for chunk `i`, asking the service for `want`; with `whole`, the chunk
    /// is the blob and is checked against its Content-MD5. Returns the bytes and (the
    /// range's checksum computed here, the service's).
    async fn fetch_once(
        &self,
        i: usize,
        want: Option<Checksum>,
        whole: bool,
    ) -> Result<(u64, (Vec<u8>, Option<Vec<u8>>)), CacheError> {
        let (start, end) = self.range_of(i);
        let me = self.me.upgrade().expect("a fill fetching is alive");
        // Each piece goes to the file as it arrives, with no buffer of the chunk between,
        // and off the async threads (a blocking write there stalls every other transfer):
        // pieces are gathered up to `WRITE_BATCH` and written in order by one blocking
        // task (in order: a retried answer's pieces must land after the first attempt's),
        // which also computes the checksums, so they cost the async threads nothing.
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<Bytes>)>();
        let writer = tokio::task::spawn_blocking(move || {
            let fresh = || {
                (
                    want.map(Running::new),
                    whole.then(|| Running::new(Checksum::Md5)),
                )
            };
            let mut sums = fresh();
            for (mut at, pieces) in rx {
                if at == 0 {
                    // A retried answer starts over.
                    sums = fresh();
                }
                for p in pieces {
                    me.file.write_all_at(&p, start + at)?;
                    for h in [&mut sums.0, &mut sums.1].into_iter().flatten() {
                        h.update(&p);
                    }
                    at += p.len() as u64;
                }
            }
            Ok::<_, std::io::Error>((sums.0.map(Running::finish), sums.1.map(Running::finish)))
        });
        let mut batch: (u64, u64, Vec<Bytes>) = (0, 0, Vec::new());
        let write = |batch: &mut (u64, u64, Vec<Bytes>)| {
            let (at, _, pieces) = std::mem::take(batch);
            if !pieces.is_empty() {
                // The writer ends only when this sender goes: it is there to take them.
                let _ = tx.send((at, pieces));
            }
        };
        let got = self
            .store
            .read_range(
                &self.blob.name,
                start..end,
                &self.blob.etag,
                want,
                &mut |at, data: Bytes| {
                    if batch.2.is_empty() || at != batch.0 + batch.1 {
                        write(&mut batch);
                        batch.0 = at;
                    }
                    batch.1 += data.len() as u64;
                    batch.2.push(data);
                    if batch.1 >= WRITE_BATCH {
                        write(&mut batch);
                    }
                    Ok(())
                },
            )
            .await;
        write(&mut batch);
        drop(tx);
        // Every write ends before the chunk counts as present (or its failure is told).
        let (range_sum, md5) = writer
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))?;
        let got = got.map_err(|e| match e {
            ReadError::Blob(e) => CacheError::Blob(e),
            ReadError::Sink(e) => CacheError::from(e),
        })?;
        if got.bytes != end - start {
            return Err(CacheError::Corrupt(format!(
                "{:?}: range {start}..{end} returned {} bytes",
                self.blob.name, got.bytes
            )));
        }
        if let (Some(h), Some(expected)) = (md5, &self.blob.content_md5) {
            if &h != expected {
                return Err(mismatch(&self.blob.name));
            }
        }
        Ok((got.bytes, (range_sum.unwrap_or_default(), got.sum)))
    }
}

pub(super) fn mismatch(name: &str) -> CacheError {
    CacheError::Corrupt(format!("{name:?}: Content-MD5 mismatch"))
}
