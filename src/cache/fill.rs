//! One blob version being hydrated, readable while it fills.
//!
//! A `Fill` is a sparse file of the blob's size, fetched in chunks by a few async workers.
//! Each chunk is Missing, Fetching or Present; a read waits only for the chunks under its
//! own range, and those jump the queue (`urgent`) ahead of the sequential sweep, so a reader
//! seeking in a large shard gets its ranges first and a sequential reader never fetches a
//! byte twice. Chunk size follows the blob's size; the number of requests in flight starts
//! low and doubles while each doubling still raises the measured rate (up to a maximum), so
//! a fast link is filled without a fixed constant and a slow one is not flooded.
//!
//! Two modes. `Whole`: every chunk is fetched, the file is verified (Content-MD5 when the
//! service has one) and renamed into `data/`; from then on the cache serves it like any
//! hydrated file. Data read before the verification is served as fetched: a mismatch found
//! at the end fails every later read with EIO and the copy is dropped. `Window`: the blob is
//! larger than the cache may hold, so only the chunks around the readers are kept, at most
//! `window` chunks, the least recently read punched out of the file; it is never promoted
//! and its file goes when the last handle does.
//!
//! A failed request fails the reads that wait on it; the next read of a missing range
//! tries again, so a transient outage costs a read, not the open file.

use super::verify::{Checksum, Plan, Running, Verifier, RANGE_SUM_MAX};
use super::CacheError;
use crate::blob::{BlobRef, BlobStore, ReadError};
use bytes::Bytes;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Instant;

/// Failed chunks become fetchable again: someone asks for the whole.
fn retry_failed(st: &mut State) {
    for c in st.chunks.iter_mut().filter(|c| **c == Chunk::Failed) {
        *c = Chunk::Missing;
    }
}

/// Chunks landed without throttling before an eased-off fill adds a request in flight.
const CALM_CHUNKS: u32 = 4;

/// How many times a range that arrives corrupted is fetched again before its read fails.
const RANGE_RETRIES: u32 = 2;

/// How many bytes of an answer are gathered before the blocking pool writes them.
const WRITE_BATCH: u64 = 1 << 20;

/// What the cache does once a whole fill is verified (or its file is dropped): promote it,
/// release its reservation. Called exactly once.
pub(super) type Finish = Box<dyn FnOnce(&Fill, bool) + Send>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    Missing,
    Fetching,
    Present,
    /// Its last request failed: fetched again only when someone asks (a read, an open, a
    /// wait for the whole), never by workers still sweeping, which would fail it again
    /// while the service is down and fail the reads that came after.
    Failed,
}

pub(super) enum Mode {
    /// Fetch everything, verify, then rename into `dest`.
    Whole { dest: PathBuf },
    /// Keep at most this many chunks; fetch ahead of readers by half of it.
    Window { chunks: usize },
}

/// How a fill sizes its requests.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tuning {
    pub min_chunk: u64,
    pub max_chunk: u64,
    pub start_parallel: usize,
    pub max_parallel: usize,
}

impl Tuning {
    /// About 16 chunks per blob, between the bounds: small blobs still fetch in parallel,
    /// large ones do not pay a request per megabyte.
    pub(super) fn chunk_for(&self, size: u64) -> u64 {
        (size / 16)
            .clamp(
                self.min_chunk.max(1),
                self.max_chunk.max(self.min_chunk).max(1),
            )
            .next_multiple_of(4096)
    }

    /// Where each chunk of a blob of `size` bytes starts, then `size`. The first chunks are
    /// small and double up to `chunk_for(size)`: the first byte costs a round trip and a
    /// small transfer, not a whole large chunk.
    pub(super) fn bounds(&self, size: u64) -> Vec<u64> {
        let steady = self.chunk_for(size);
        let mut step = (self.min_chunk / 4).clamp(64 << 10, steady.max(64 << 10));
        let mut bounds = vec![0];
        let mut at = 0u64;
        while at < size {
            at = (at + step).min(size);
            bounds.push(at);
            step = (step * 2).min(steady);
        }
        bounds
    }
}

struct State {
    chunks: Vec<Chunk>,
    present: usize,
    urgent: VecDeque<usize>,
    /// Next chunk the background sweep considers.
    cursor: usize,
    /// Bumped at every failure; a waiting reader gives up when it moves.
    failures: u64,
    error: Option<CacheError>,
    /// Set when the fill can never complete (verification failed): reads fail at once.
    broken: Option<CacheError>,
    workers: usize,
    target: usize,
    /// Rate measurement of the current round: its start, bytes landed, and the rate of the
    /// last round at a lower parallelism (bytes/s); `settled` once doubling stopped paying.
    round: (Instant, u64),
    last_rate: f64,
    settled: bool,
    /// Window mode: recency of each chunk's last read, readers inside each chunk, and the
    /// furthest chunk a reader asked for.
    used: Vec<u64>,
    reading: Vec<u32>,
    tick: u64,
    demand_hi: usize,
    finishing: bool,
    /// The store's count of throttling answers when last looked at; chunks landed since the
    /// fill eased off, and whether it did.
    throttled_seen: u64,
    calm: u32,
    eased: bool,
}

pub struct Fill {
    blob: BlobRef,
    file: File,
    tmp: PathBuf,
    /// Chunk `i` is `bounds[i]..bounds[i + 1]`.
    bounds: Vec<u64>,
    mode: Mode,
    tuning: Tuning,
    verifier: Arc<Verifier>,
    /// Some range came without the checksum asked for: the whole-blob check decides.
    unverified: AtomicBool,
    complete: AtomicBool,
    st: Mutex<State>,
    cv: Condvar,
    /// Bumped with every `cv` notification, for async waiters (the prefetcher).
    events: tokio::sync::watch::Sender<u64>,
    store: Arc<dyn BlobStore>,
    rt: tokio::runtime::Handle,
    finish: Mutex<Option<Finish>>,
    me: Weak<Fill>,
}

impl Fill {
    /// A fill of `blob` into the new file `tmp`; nothing is fetched until `start` or a read.
    pub(super) fn new(
        blob: BlobRef,
        tmp: PathBuf,
        mode: Mode,
        mut tuning: Tuning,
        (store, verifier): (Arc<dyn BlobStore>, Arc<Verifier>),
        rt: tokio::runtime::Handle,
        finish: Finish,
    ) -> Result<Arc<Fill>, CacheError> {
        if verifier
            .plan(blob.content_md5.is_some())
            .per_range
            .is_some()
        {
            // The service checksums ranges of at most 4 MiB.
            tuning.max_chunk = tuning.max_chunk.min(RANGE_SUM_MAX);
            tuning.min_chunk = tuning.min_chunk.min(tuning.max_chunk);
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.set_len(blob.size)?;
        let bounds = tuning.bounds(blob.size);
        let n = bounds.len() - 1;
        let window = matches!(mode, Mode::Window { .. });
        let st = State {
            chunks: vec![Chunk::Missing; n],
            present: 0,
            urgent: VecDeque::new(),
            cursor: 0,
            failures: 0,
            error: None,
            broken: None,
            workers: 0,
            target: tuning.start_parallel.clamp(1, tuning.max_parallel.max(1)),
            round: (Instant::now(), 0),
            last_rate: 0.0,
            settled: false,
            used: if window { vec![0; n] } else { Vec::new() },
            reading: if window { vec![0; n] } else { Vec::new() },
            tick: 0,
            demand_hi: 0,
            finishing: false,
            throttled_seen: store.throttled(),
            calm: 0,
            eased: false,
        };
        Ok(Arc::new_cyclic(|me| Fill {
            blob,
            file,
            tmp,
            bounds,
            mode,
            tuning,
            verifier,
            unverified: AtomicBool::new(false),
            complete: AtomicBool::new(false),
            st: Mutex::new(st),
            cv: Condvar::new(),
            events: tokio::sync::watch::Sender::new(0),
            store,
            rt,
            finish: Mutex::new(Some(finish)),
            me: me.clone(),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn blob(&self) -> &BlobRef {
        &self.blob
    }

    pub(super) fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The largest chunk (the steady size past the first small ones).
    pub fn chunk_size(&self) -> u64 {
        self.bounds
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }

    fn range_of(&self, i: usize) -> (u64, u64) {
        (self.bounds[i], self.bounds[i + 1])
    }

    pub fn is_window(&self) -> bool {
        matches!(self.mode, Mode::Window { .. })
    }

    fn chunk_count(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Failed for good (the data did not verify): a new open starts a new fill.
    pub fn is_broken(&self) -> bool {
        self.state().broken.is_some()
    }

    /// Verified and in place: reads go straight to the file.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Starts the background sweep (whole mode; a window fills around its readers).
    pub(super) fn start(&self) {
        let mut st = self.state();
        retry_failed(&mut st);
        self.spawn_workers(&mut st);
    }

    fn chunks_of(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let end = (off.saturating_add(len)).min(self.blob.size);
        if off >= end {
            return 0..0;
        }
        // The chunk holding `off` through the one holding `end - 1`.
        let first = self.bounds.partition_point(|&b| b <= off) - 1;
        let last = self.bounds.partition_point(|&b| b < end) - 1;
        first..last + 1
    }

    /// Whether a read of `len` bytes at `off` would not wait.
    pub fn ready(&self, off: u64, len: u64) -> bool {
        if self.is_complete() {
            return true;
        }
        let r = self.chunks_of(off, len);
        let st = self.state();
        st.broken.is_none() && st.chunks[r].iter().all(|c| *c == Chunk::Present)
    }

    /// Runs `read` on the file once the chunks under `len` bytes at `off` are present (None
    /// when the range lies past the end).
    pub(super) fn read_with<T>(
        &self,
        off: u64,
        len: u64,
        read: impl FnOnce(&File) -> Result<T, CacheError>,
    ) -> Result<Option<T>, CacheError> {
        if self.is_complete() {
            return read(&self.file).map(Some);
        }
        let r = self.chunks_of(off, len);
        if r.is_empty() {
            return Ok(None);
        }
        self.wait_for(r.clone())?;
        let got = read(&self.file).map(Some);
        if self.is_window() {
            let mut st = self.state();
            for i in r {
                st.reading[i] -= 1;
            }
            self.trim_window(&mut st);
        }
        got
    }

    /// Waits until chunks `r` are present (window mode: and marks them being read).
    fn wait_for(&self, r: std::ops::Range<usize>) -> Result<(), CacheError> {
        let mut st = self.state();
        let mut asked = false;
        let seen = st.failures;
        if let Mode::Window { chunks } = self.mode {
            // Read-ahead follows the reader wherever it goes, forwards or back.
            st.demand_hi = r.end - 1;
            if st.cursor < r.start || st.cursor > r.end + chunks / 2 {
                st.cursor = r.end.min(st.chunks.len());
            }
            self.spawn_workers(&mut st);
        }
        loop {
            if let Some(e) = &st.broken {
                return Err(e.clone());
            }
            if st.chunks[r.clone()].iter().all(|c| *c == Chunk::Present) {
                if self.is_window() {
                    st.tick += 1;
                    let t = st.tick;
                    for i in r.clone() {
                        st.reading[i] += 1;
                        st.used[i] = t;
                    }
                }
                return Ok(());
            }
            if st.failures != seen {
                return Err(st
                    .error
                    .clone()
                    .unwrap_or(CacheError::Corrupt("a chunk of the download failed".into())));
            }
            if !asked {
                asked = true;
                // A reader asking is what retries failed chunks: its own first, the rest
                // with the sweep.
                retry_failed(&mut st);
                for i in r.clone().rev() {
                    if st.chunks[i] == Chunk::Missing {
                        st.urgent.push_front(i);
                    }
                }
                self.spawn_workers(&mut st);
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until the whole blob is present and verified (whole mode only).
    pub fn wait_complete(&self) -> Result<(), CacheError> {
        let mut st = self.state();
        let seen = st.failures;
        retry_failed(&mut st);
        self.spawn_workers(&mut st);
        loop {
            if self.is_complete() {
                return Ok(());
            }
            if let Some(e) = &st.broken {
                return Err(e.clone());
            }
            if st.failures != seen {
                return Err(st.error.clone().expect("a failure records its error"));
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits, without blocking a thread, until the fill is complete, broken, or a request
    /// of it failed. Dropped with the runtime at shutdown, unlike a thread in `wait_complete`.
    pub async fn settled(&self) {
        let mut rx = self.events.subscribe();
        let seen = self.state().failures;
        loop {
            {
                let st = self.state();
                if self.is_complete() || st.broken.is_some() || st.failures != seen {
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn signal(&self) {
        self.cv.notify_all();
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Tops the workers up to the target while there is something to fetch.
    fn spawn_workers(&self, st: &mut State) {
        if st.broken.is_some() || st.finishing {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        let (from, to) = match self.mode {
            Mode::Whole { .. } => (0, st.chunks.len()),
            Mode::Window { chunks } => (st.cursor, self.sweep_limit(st, chunks)),
        };
        let wanted = st.urgent.len()
            + st.chunks[from.min(to)..to]
                .iter()
                .filter(|c| **c == Chunk::Missing)
                .count();
        // Until the first chunk lands only two requests run: the first byte does not share
        // the link with a full set of large chunks.
        let limit = if st.present == 0 {
            st.target.min(2)
        } else {
            st.target
        };
        while st.workers < wanted.min(limit) {
            st.workers += 1;
            // Whole fills keep themselves alive to the end (the copy is worth finishing);
            // a window lives only as long as its readers.
            let w = if self.is_window() {
                Worker::Weak(Arc::downgrade(&me))
            } else {
                Worker::Strong(me.clone())
            };
            self.rt.spawn(w.run());
        }
    }

    /// The next chunk to fetch, marked Fetching: a reader's first, then the sweep (in window
    /// mode only up to half a window past the furthest read).
    fn next_chunk(&self, st: &mut State) -> Option<usize> {
        while let Some(i) = st.urgent.pop_front() {
            if matches!(st.chunks[i], Chunk::Missing | Chunk::Failed) {
                st.chunks[i] = Chunk::Fetching;
                return Some(i);
            }
        }
        let limit = match self.mode {
            Mode::Whole { .. } => st.chunks.len(),
            Mode::Window { chunks } => self.sweep_limit(st, chunks),
        };
        while st.cursor < limit {
            let i = st.cursor;
            st.cursor += 1;
            if st.chunks[i] == Chunk::Missing {
                st.chunks[i] = Chunk::Fetching;
                return Some(i);
            }
        }
        if !self.is_window() {
            // Chunks that failed and went back to Missing behind the cursor.
            if let Some(i) = st.chunks.iter().position(|c| *c == Chunk::Missing) {
                st.chunks[i] = Chunk::Fetching;
                return Some(i);
            }
        }
        None
    }

    /// Where a window's read-ahead stops: half a window past the last read.
    fn sweep_limit(&self, st: &State, chunks: usize) -> usize {
        (st.demand_hi + chunks / 2 + 1).min(st.chunks.len())
    }

    /// What this fill's checks are now (auto mode learns from the service's answers).
    fn plan(&self) -> Plan {
        self.verifier.plan(self.blob.content_md5.is_some())
    }

    /// Fetches chunk `i`, again when its range arrived corrupted (its checksum says so)
    /// or without the checksum the plan now asks for.
    async fn fetch(&self, i: usize) -> Result<u64, CacheError> {
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

    /// Records the outcome of chunk `i`; false when the worker should stop.
    fn landed(&self, i: usize, r: Result<u64, CacheError>) -> bool {
        let mut st = self.state();
        let ok = match r {
            Ok(bytes) => {
                st.chunks[i] = Chunk::Present;
                st.present += 1;
                if self.is_window() {
                    st.tick += 1;
                    st.used[i] = st.tick;
                }
                if st.present == 1 {
                    // The rate is measured from here, at full parallelism.
                    st.round = (Instant::now(), 0);
                } else if !self.ease_off(&mut st) {
                    self.adapt(&mut st, bytes);
                }
                true
            }
            Err(e) => {
                tracing::warn!("hydrating {:?}: {e}", self.blob.name);
                if matches!(e, CacheError::Corrupt(_)) {
                    // The service holds something else than it describes: no retry helps.
                    st.broken = Some(e.clone());
                }
                st.chunks[i] = Chunk::Failed;
                st.failures += 1;
                st.error = Some(e);
                // Nobody retries on their own: the next read (or open) asks again.
                st.urgent.clear();
                st.cursor = 0;
                false
            }
        };
        if self.is_window() {
            self.trim_window(&mut st);
        }
        self.signal();
        if ok {
            self.spawn_workers(&mut st);
        }
        ok
    }

    /// While the service throttles (its answers say so, even those retried to success), the
    /// fill halves its requests in flight and stops doubling; then adds one back per
    /// `CALM_CHUNKS` chunks landed without throttling, up to where it was allowed. A fleet
    /// that keeps its parallelism while the account throttles makes the throttling worse.
    /// Whether the fill is easing off (and `adapt` must not run).
    fn ease_off(&self, st: &mut State) -> bool {
        let now = self.store.throttled();
        if now > st.throttled_seen {
            st.throttled_seen = now;
            st.target = (st.target / 2).max(1);
            st.settled = true;
            st.eased = true;
            st.calm = 0;
            return true;
        }
        if !st.eased {
            return false;
        }
        st.calm += 1;
        if st.calm >= CALM_CHUNKS {
            st.calm = 0;
            st.target = (st.target + 1).min(self.tuning.max_parallel);
        }
        true
    }

    /// Doubles the requests in flight while the last doubling raised the rate by 15%.
    fn adapt(&self, st: &mut State, bytes: u64) {
        st.round.1 += bytes;
        if st.settled || st.round.1 < self.chunk_size() * 2 * st.target as u64 {
            return;
        }
        let secs = st.round.0.elapsed().as_secs_f64().max(1e-6);
        let rate = st.round.1 as f64 / secs;
        if rate > st.last_rate * 1.15 && st.target < self.tuning.max_parallel {
            st.last_rate = rate;
            st.target = (st.target * 2).min(self.tuning.max_parallel);
        } else {
            st.settled = true;
        }
        st.round = (Instant::now(), 0);
    }

    /// The parallelism the fill has settled on (or reached so far).
    pub fn parallelism(&self) -> usize {
        self.state().target
    }

    /// Window mode: punches the least recently read chunks out beyond the window.
    fn trim_window(&self, st: &mut State) {
        let Mode::Window { chunks: keep } = self.mode else {
            return;
        };
        while st.present > keep {
            let victim = (0..st.chunks.len())
                .filter(|&i| st.chunks[i] == Chunk::Present && st.reading[i] == 0)
                .min_by_key(|&i| st.used[i]);
            let Some(v) = victim else { return };
            let (start, end) = self.range_of(v);
            if let Err(e) = punch(&self.file, start, end - start) {
                tracing::warn!("freeing part of the streamed {:?}: {e}", self.blob.name);
                return;
            }
            st.chunks[v] = Chunk::Missing;
            st.present -= 1;
        }
    }

    /// Called by the worker that saw the last chunk land (whole mode).
    async fn complete_whole(&self) {
        let Mode::Whole { dest } = &self.mode else {
            return;
        };
        // The whole-blob hash is skipped when every range was checked on arrival.
        let plan = self.plan();
        let hash =
            plan.whole_md5 && (plan.per_range.is_none() || self.unverified.load(Ordering::Relaxed));
        let verdict = match &self.blob.content_md5 {
            Some(_) if self.chunk_count() == 1 || !hash => Ok(()),
            Some(expected) => {
                let path = self.tmp.clone();
                let expected = expected.clone();
                let name = self.blob.name.clone();
                tokio::task::spawn_blocking(move || match super::md5_file(&path) {
                    Ok(actual) if actual == expected => Ok(()),
                    Ok(_) => Err(mismatch(&name)),
                    Err(e) => Err(e.into()),
                })
                .await
                .unwrap_or_else(|e| Err(CacheError::Corrupt(format!("verifying: {e}"))))
            }
            None => Ok(()),
        };
        let verdict = verdict.and_then(|()| Ok(std::fs::rename(&self.tmp, dest)?));
        let ok = verdict.is_ok();
        {
            let mut st = self.state();
            match verdict {
                Ok(()) => self.complete.store(true, Ordering::Release),
                Err(e) => {
                    tracing::warn!("hydrating {:?} failed: {e}", self.blob.name);
                    st.failures += 1;
                    st.error = Some(e.clone());
                    st.broken = Some(e);
                }
            }
            self.signal();
        }
        if let Some(f) = self.finish.lock().unwrap_or_else(|p| p.into_inner()).take() {
            f(self, ok);
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if !self.is_complete() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        if let Some(f) = self
            .finish
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            f(self, false);
        }
    }
}

enum Worker {
    Strong(Arc<Fill>),
    Weak(Weak<Fill>),
}

impl Worker {
    fn fill(&self) -> Option<Arc<Fill>> {
        match self {
            Worker::Strong(f) => Some(f.clone()),
            Worker::Weak(w) => w.upgrade(),
        }
    }

    async fn run(self) {
        loop {
            let Some(fill) = self.fill() else { return };
            // Some(chunk) to fetch; None to stop, completing the fill if this was its last
            // worker and everything is present.
            let next = {
                let mut st = fill.state();
                if st.workers > st.target.max(1) && !st.finishing {
                    // The fill eased off: this worker goes (the others carry on).
                    st.workers -= 1;
                    return;
                }
                let next = fill.next_chunk(&mut st);
                if next.is_none() {
                    st.workers -= 1;
                }
                let last = next.is_none()
                    && st.workers == 0
                    && st.present == st.chunks.len()
                    && !st.finishing
                    && !fill.is_window()
                    && !fill.is_complete();
                if last {
                    st.finishing = true;
                }
                (next, last)
            };
            match next {
                (Some(i), _) => {
                    let r = fill.fetch(i).await;
                    if !fill.landed(i, r) {
                        fill.state().workers -= 1;
                        return;
                    }
                }
                (None, last) => {
                    if last {
                        fill.complete_whole().await;
                    }
                    return;
                }
            }
        }
    }
}

fn mismatch(name: &str) -> CacheError {
    CacheError::Corrupt(format!("{name:?}: Content-MD5 mismatch"))
}

/// Gives the blocks of a byte range back to the disk (the file keeps its size).
fn punch(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: a valid descriptor owned by `file`, which outlives the call.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Fill, Mode, Tuning};
    use crate::blob::faulty::FaultyStore;
    use crate::blob::memory::MemoryStore;
    use crate::blob::{BlobRef, BlobStore};
    use crate::cache::verify::{Verifier, Verify};
    use std::sync::Arc;

    /// A whole fill of a 4 MiB blob in 64 chunks, the store throttling its first
    /// `throttled` reads (each retried to success); the parallelism it ended at.
    fn parallelism_after(throttled: u64) -> usize {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mem = MemoryStore::new();
        mem.put("b", vec![3u8; 4 << 20], &[]);
        let p = rt.block_on(mem.head("b")).unwrap();
        let blob = BlobRef {
            name: "b".into(),
            etag: p.etag,
            size: p.size,
            content_md5: None,
        };
        let store = Arc::new(FaultyStore::new(mem));
        store.throttle_reads(throttled);
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            min_chunk: 64 << 10,
            max_chunk: 64 << 10,
            start_parallel: 4,
            max_parallel: 8,
        };
        let fill = Fill::new(
            blob,
            dir.path().join("tmp"),
            Mode::Whole {
                dest: dir.path().join("dest"),
            },
            tuning,
            (
                store.clone() as Arc<dyn BlobStore>,
                Arc::new(Verifier::new(Verify::None)),
            ),
            rt.handle().clone(),
            Box::new(|_, _| {}),
        )
        .unwrap();
        fill.start();
        fill.wait_complete().unwrap();
        fill.parallelism()
    }

    #[test]
    fn a_throttled_fill_halves_its_requests_and_adds_them_back_once_calm() {
        assert_eq!(parallelism_after(u64::MAX), 1, "throttled throughout");
        assert_eq!(
            parallelism_after(3),
            8,
            "throttled at first, then one more per calm stretch up to the maximum"
        );
    }

    fn tuning() -> Tuning {
        Tuning {
            min_chunk: 1 << 20,
            max_chunk: 8 << 20,
            start_parallel: 8,
            max_parallel: 16,
        }
    }

    #[test]
    fn chunks_start_small_double_and_tile_the_blob() {
        let t = tuning();
        for size in [1u64, 4096, 300_000, 1 << 20, 64 << 20, (1 << 30) + 12_345] {
            let b = t.bounds(size);
            assert_eq!((b[0], *b.last().unwrap()), (0, size), "{size}");
            let lens: Vec<u64> = b.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(lens.iter().all(|&l| l > 0), "{size}: {lens:?}");
            // The first chunk is small whatever the blob's size: the first byte is cheap.
            assert!(lens[0] <= 256 << 10, "{size}: {lens:?}");
            let steady = t.chunk_for(size);
            assert!(lens.iter().all(|&l| l <= steady), "{size}: {lens:?}");
            for w in lens.windows(2).take(lens.len().saturating_sub(2)) {
                assert!(w[1] == w[0] * 2 || w[1] == steady, "{size}: {lens:?}");
            }
        }
        // A 1 GiB blob: 8 MiB chunks after the ramp, not a request per megabyte.
        assert!(t.bounds(1 << 30).len() < 140);
    }
}
