//! A wrapper around any store that counts requests and fails them on demand.
//!
//! Tests use the counters to prove the metadata path makes no request after mount, and the
//! switches to model a service that goes away (every request fails as unreachable) or a
//! blob that changes behind simfs's back.

use super::{
    BlobError, BlobProps, BlobResult, BlobStore, Expect, ListPage, ListQuery, Metadata, ReadError,
    Sink,
};
use super::{Checksum, Got};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A ranged read going out or coming back, by the offset it starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadEvent {
    Sent(u64),
    Answered(u64),
}

#[derive(Default, Debug)]
pub struct Counters {
    pub list: AtomicU64,
    pub head: AtomicU64,
    pub get: AtomicU64,
    /// Whole-blob PUTs, staged blocks and block commits.
    pub put: AtomicU64,
    /// The bytes those PUTs and staged blocks carried.
    pub put_bytes: AtomicU64,
    pub set_metadata: AtomicU64,
    pub copy: AtomicU64,
    pub delete: AtomicU64,
    /// Requests in their round trip now, and the most at once so far (with a latency set).
    pub in_flight: AtomicU64,
    pub most_at_once: AtomicU64,
    /// Requests waiting for `FaultyStore::hold` to end.
    pub held: AtomicU64,
}

impl Counters {
    pub fn total(&self) -> u64 {
        self.list.load(Ordering::SeqCst)
            + self.head.load(Ordering::SeqCst)
            + self.get.load(Ordering::SeqCst)
            + self.writes()
    }

    /// Requests that change the container.
    pub fn writes(&self) -> u64 {
        self.put.load(Ordering::SeqCst)
            + self.set_metadata.load(Ordering::SeqCst)
            + self.copy.load(Ordering::SeqCst)
            + self.delete.load(Ordering::SeqCst)
    }
}

pub struct FaultyStore<S> {
    inner: S,
    pub counters: Arc<Counters>,
    offline: AtomicBool,
    /// Fail every `get_range` whose range starts at this offset (u64::MAX: never).
    fail_get_at: AtomicU64,
    /// Every write fails as the service refusing it (a 5xx after retries).
    refuse_writes: AtomicBool,
    /// Writes succeed until this many have been made, then fail (a crash point).
    writes_left: AtomicU64,
    /// Every request takes this long (milliseconds) before it is answered: a round trip.
    latency_ms: AtomicU64,
    /// Requests wait before going out while this is set (`hold`).
    hold: AtomicBool,
    /// This many more writes are carried out, but their answer is lost (a connection reset
    /// after the service committed).
    lose_answers: AtomicU64,
    /// The next ranged read hands on a first piece, then starts over (a body retried after
    /// a reset mid-transfer), with that piece's bytes flipped: whatever took them must
    /// forget them.
    restart_next_read: AtomicBool,
    /// This many more ranged reads have one bit flipped in their first piece.
    corrupt_reads: AtomicU64,
    /// Ranged answers come without a CRC64 / an MD5 when asked (as from an emulator).
    omit_crc64: AtomicBool,
    omit_md5: AtomicBool,
    /// Answers that said "throttled" and were retried to success (as the SDK does).
    throttled: AtomicU64,
    throttle_reads: AtomicU64,
    /// Every ranged read sent and answered, in order: which request waited for which.
    reads: Mutex<Vec<ReadEvent>>,
}

impl<S: BlobStore> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        FaultyStore {
            inner,
            counters: Arc::new(Counters::default()),
            offline: AtomicBool::new(false),
            fail_get_at: AtomicU64::new(u64::MAX),
            refuse_writes: AtomicBool::new(false),
            writes_left: AtomicU64::new(u64::MAX),
            latency_ms: AtomicU64::new(0),
            hold: AtomicBool::new(false),
            lose_answers: AtomicU64::new(0),
            restart_next_read: AtomicBool::new(false),
            corrupt_reads: AtomicU64::new(0),
            omit_crc64: AtomicBool::new(false),
            omit_md5: AtomicBool::new(false),
            throttled: AtomicU64::new(0),
            throttle_reads: AtomicU64::new(0),
            reads: Mutex::new(Vec::new()),
        }
    }

    /// The ranged reads so far, sent and answered, in the order they happened.
    pub fn read_events(&self) -> Vec<ReadEvent> {
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn read_event(&self, e: ReadEvent) {
        let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        // Enough for any test that looks; a long model run does not keep them all.
        if reads.len() < 100_000 {
            reads.push(e);
        }
    }

    /// The next `n` writes are carried out but answered with a connection error.
    pub fn lose_answers(&self, n: u64) {
        self.lose_answers.store(n, Ordering::SeqCst);
    }

    /// `r`, unless this write's answer is to be lost.
    fn answer<T>(&self, r: BlobResult<T>) -> BlobResult<T> {
        let lose = r.is_ok()
            && self
                .lose_answers
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if lose {
            return Err(BlobError::Unreachable(
                "injected: connection reset after the write was committed".into(),
            ));
        }
        r
    }

    /// Every request from now on takes `d` before it is answered.
    pub fn set_latency(&self, d: std::time::Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// While `on`, every request waits before it goes out (counted in `Counters::held`):
    /// a test can change the filesystem while an upload is known to be under way.
    pub fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    async fn round_trip(&self) {
        if self.hold.load(Ordering::SeqCst) {
            self.counters.held.fetch_add(1, Ordering::SeqCst);
            while self.hold.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            self.counters.held.fetch_sub(1, Ordering::SeqCst);
        }
        let ms = self.latency_ms.load(Ordering::SeqCst);
        if ms > 0 {
            struct Flight<'a>(&'a AtomicU64);
            impl Drop for Flight<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let c = &self.counters;
            let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let _flight = Flight(&c.in_flight);
            c.most_at_once.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// From now on every request fails as if the service were unreachable.
    /// The next ranged read starts over after a first, garbled piece (see the field).
    pub fn restart_next_read(&self) {
        self.restart_next_read.store(true, Ordering::SeqCst);
    }

    /// The next `n` ranged reads are throttled once each and retried to success (what the
    /// caller sees: the count of `throttled` grows).
    pub fn throttle_reads(&self, n: u64) {
        self.throttle_reads.store(n, Ordering::SeqCst);
    }

    /// The next `n` ranged reads arrive with one bit flipped.
    pub fn corrupt_reads(&self, n: u64) {
        self.corrupt_reads.store(n, Ordering::SeqCst);
    }

    /// Ranged answers leave out `sum` when asked for it.
    pub fn omit_sum(&self, sum: Checksum, omit: bool) {
        match sum {
            Checksum::Crc64 => self.omit_crc64.store(omit, Ordering::SeqCst),
            Checksum::Md5 => self.omit_md5.store(omit, Ordering::SeqCst),
        }
    }

    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
    }

    /// Makes ranged GETs starting at `offset` fail with a service error.
    pub fn fail_get_at(&self, offset: u64) {
        self.fail_get_at.store(offset, Ordering::SeqCst);
    }

    /// Makes every write request fail (reads keep working).
    pub fn refuse_writes(&self, refuse: bool) {
        self.refuse_writes.store(refuse, Ordering::SeqCst);
    }

    /// Lets `n` more writes through, then fails every write (u64::MAX: no limit).
    pub fn writes_left(&self, n: u64) {
        self.writes_left.store(n, Ordering::SeqCst);
    }

    fn write_gate(&self, counter: &AtomicU64) -> BlobResult<()> {
        counter.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        let exhausted = self
            .writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                u64::MAX => Some(n),
                0 => None,
                n => Some(n - 1),
            })
            .is_err();
        if exhausted || self.refuse_writes.load(Ordering::SeqCst) {
            return Err(BlobError::Service("injected: HTTP 503 ServerBusy".into()));
        }
        Ok(())
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
        self.round_trip().await;
        self.counters.list.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        self.inner.list(q).await
    }

    async fn head(&self, name: &str) -> BlobResult<BlobProps> {
        self.round_trip().await;
        self.counters.head.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        self.inner.head(name).await
    }

    async fn get_range(&self, name: &str, range: Range<u64>, etag: &str) -> BlobResult<Bytes> {
        self.round_trip().await;
        self.counters.get.fetch_add(1, Ordering::SeqCst);
        self.gate()?;
        if range.start == self.fail_get_at.load(Ordering::SeqCst) {
            return Err(BlobError::Service("injected: ranged GET failed".into()));
        }
        self.inner.get_range(name, range, etag).await
    }

    async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &str,
        want: Option<Checksum>,
        sink: &mut Sink<'_>,
    ) -> Result<Got, ReadError> {
        let start = range.start;
        self.read_event(ReadEvent::Sent(start));
        // Every way out, failures included, counts as answered.
        let got = async {
            self.round_trip().await;
            self.counters.get.fetch_add(1, Ordering::SeqCst);
            self.gate()?;
            if range.start == self.fail_get_at.load(Ordering::SeqCst) {
                return Err(BlobError::Service("injected: ranged GET failed".into()).into());
            }
            if self
                .throttle_reads
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                self.throttled.fetch_add(1, Ordering::SeqCst);
            }
            if self.restart_next_read.swap(false, Ordering::SeqCst) {
                let first = self.inner.get_range(name, range.clone(), etag).await?;
                let garbled: Vec<u8> = first.iter().take(4096).map(|b| !b).collect();
                sink(0, Bytes::from(garbled)).map_err(ReadError::Sink)?;
            }
            let corrupt = self.corrupt_reads.load(Ordering::SeqCst) > 0
                && self
                    .corrupt_reads
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            let mut got = if corrupt {
                // One bit flipped on the way: the service's checksum is of what it sent.
                let mut first = true;
                self.inner
                    .read_range(name, range, etag, want, &mut |at, piece: Bytes| {
                        if std::mem::take(&mut first) && !piece.is_empty() {
                            let mut p = piece.to_vec();
                            p[0] ^= 1;
                            return sink(at, Bytes::from(p));
                        }
                        sink(at, piece)
                    })
                    .await?
            } else {
                self.inner.read_range(name, range, etag, want, sink).await?
            };
            let omit = match want {
                Some(Checksum::Crc64) => &self.omit_crc64,
                Some(Checksum::Md5) => &self.omit_md5,
                None => return Ok(got),
            };
            if omit.load(Ordering::SeqCst) {
                got.sum = None;
            }
            Ok(got)
        }
        .await;
        self.read_event(ReadEvent::Answered(start));
        got
    }

    fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::SeqCst) + self.inner.throttled()
    }

    async fn check_access(&self) -> BlobResult<()> {
        self.round_trip().await;
        self.gate()?;
        self.inner.check_access().await
    }

    async fn put(
        &self,
        name: &str,
        data: Bytes,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        self.round_trip().await;
        self.write_gate(&self.counters.put)?;
        self.counters
            .put_bytes
            .fetch_add(data.len() as u64, Ordering::SeqCst);
        self.answer(self.inner.put(name, data, metadata, expect).await)
    }

    async fn stage_block(&self, name: &str, id: &[u8], data: Bytes) -> BlobResult<()> {
        self.round_trip().await;
        self.write_gate(&self.counters.put)?;
        self.counters
            .put_bytes
            .fetch_add(data.len() as u64, Ordering::SeqCst);
        self.answer(self.inner.stage_block(name, id, data).await)
    }

    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[Vec<u8>],
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        self.round_trip().await;
        self.write_gate(&self.counters.put)?;
        self.answer(self.inner.commit_blocks(name, ids, metadata, expect).await)
    }

    async fn set_metadata(
        &self,
        name: &str,
        metadata: &Metadata,
        etag: &str,
    ) -> BlobResult<String> {
        self.round_trip().await;
        self.write_gate(&self.counters.set_metadata)?;
        self.answer(self.inner.set_metadata(name, metadata, etag).await)
    }

    async fn copy(
        &self,
        from: &str,
        from_etag: &str,
        to: &str,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        self.round_trip().await;
        self.write_gate(&self.counters.copy)?;
        self.answer(self.inner.copy(from, from_etag, to, metadata, expect).await)
    }

    async fn delete(&self, name: &str, etag: &str) -> BlobResult<()> {
        self.round_trip().await;
        self.write_gate(&self.counters.delete)?;
        self.answer(self.inner.delete(name, etag).await)
    }
}
