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
//! Requests in flight share the link, so a read must not find it full of the sweep:
//! - A read away from the sweep's front (a seek in a shard; the loader faulting in a shared
//!   object's data segment, near its end) is a *jump*: its chunks get requests of their own
//!   at once, beyond the parallelism, and the sweep sends nothing new until they land. It
//!   then goes on from there (readers that jump mostly read forward) and comes back for
//!   what it skipped.
//! - At the start, and again once a jump has landed, the sweep runs two requests until a
//!   read has been served: the loader reads the header, then jumps; relocates, then jumps
//!   again. A sequential reader opens the sweep with its second read; it opens anyway after
//!   `OPENING` with no read waiting, or for someone who waits for the whole.
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
//!
//! Which chunk is fetched when lives here; what one chunk's request does (its checksums,
//! how its answer reaches the file) in `fetch.rs`.

use super::verify::{Verifier, RANGE_SUM_MAX};
use super::CacheError;
use crate::blob::{BlobRef, BlobStore};
use fetch::mismatch;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// How long after its first chunk lands a fill waits for its reader's next read before the
/// sweep runs at full parallelism anyway (about a round trip).
pub(super) const OPENING: std::time::Duration = std::time::Duration::from_millis(5);

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
    /// `OPENING` but in tests.
    pub opening: std::time::Duration,
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
    /// Chunks a reader jumped to (whole mode), and how many of them have not landed: while
    /// any has not, the sweep starts nothing new.
    jumped: Vec<bool>,
    jumps: usize,
    /// The sweep may run at full parallelism: a chunk has landed and the reader asked
    /// again, or `OPENING` passed.
    opened: bool,
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
    /// Reads waiting for chunks now.
    waiting: AtomicUsize,
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
            jumped: vec![false; n],
            jumps: 0,
            opened: false,
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
            waiting: AtomicUsize::new(0),
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
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let mut st = self.state();
        let mut asked = false;
        let seen = st.failures;
        // A read after a chunk landed shows where the reader goes: once it is served the
        // sweep may fill the link, unless it jumped (then the next read decides).
        let mut opens = st.present > 0 && !st.opened;
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
                if opens && !st.opened {
                    st.opened = true;
                    self.spawn_workers(&mut st);
                }
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
                let front = self.sweep_front(&st);
                for i in r.clone().rev() {
                    if st.chunks[i] == Chunk::Missing {
                        st.urgent.push_front(i);
                        if !self.is_window() && Some(i) != front && !st.jumped[i] {
                            st.jumped[i] = true;
                            st.jumps += 1;
                        }
                    }
                }
                if st.jumps > 0 {
                    // The sweep goes on from where the reader went (it comes back for what
                    // it skipped): readers that jump mostly read forward from there.
                    st.cursor = r.end;
                    opens = false;
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
        // Someone wants all of it: nothing to learn from the next read.
        st.opened = true;
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
        let sweep = if st.jumps > 0 {
            0
        } else {
            st.chunks[from.min(to)..to]
                .iter()
                .filter(|c| **c == Chunk::Missing)
                .count()
        };
        let wanted = st.urgent.len() + sweep;
        // Until the first chunk lands only two requests run: the first byte does not share
        // the link with a full set of large chunks. A jump gets its own request at once.
        let limit = if !st.opened {
            st.target.min(2)
        } else {
            st.target
        } + st.jumps;
        // Workers take the queue's chunks as they come free; a jump does not wait for that.
        let need = if st.jumps > 0 {
            st.workers + st.urgent.len()
        } else {
            wanted
        };
        while st.workers < need.min(limit) {
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
        if st.jumps > 0 {
            // The link is the jumping reader's until its chunks land.
            return None;
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

    /// Lets the sweep run at full parallelism after `wait`, if no read did so before. While
    /// a read waits it is left to that read (which opens it once served): opening it under
    /// the read would share the link with the read's own chunk.
    fn open_after(&self, wait: std::time::Duration) {
        let me = self.me.clone();
        self.rt.spawn(async move {
            loop {
                tokio::time::sleep(wait).await;
                let Some(fill) = me.upgrade() else { return };
                let mut st = fill.state();
                if st.opened {
                    return;
                }
                if fill.waiting.load(Ordering::Relaxed) == 0 {
                    st.opened = true;
                    fill.spawn_workers(&mut st);
                    return;
                }
            }
        });
    }

    /// The chunk the sweep would request next (whole mode): a reader waiting for it is
    /// reading sequentially, not jumping.
    fn sweep_front(&self, st: &State) -> Option<usize> {
        (st.cursor..st.chunks.len()).find(|&i| st.chunks[i] == Chunk::Missing)
    }

    /// Where a window's read-ahead stops: half a window past the last read.
    fn sweep_limit(&self, st: &State, chunks: usize) -> usize {
        (st.demand_hi + chunks / 2 + 1).min(st.chunks.len())
    }

    /// Records the outcome of chunk `i`; false when the worker should stop.
    fn landed(&self, i: usize, r: Result<u64, CacheError>) -> bool {
        let mut st = self.state();
        if st.jumped[i] {
            st.jumped[i] = false;
            st.jumps -= 1;
            if st.jumps == 0 && st.opened {
                // The reader's next read may be a jump again (a loader goes from the data
                // segment to the relocations): until it comes, two requests, not a round.
                st.opened = false;
                self.open_after(self.tuning.opening);
            }
        }
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
                    self.open_after(self.tuning.opening);
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
                let State { chunks, jumped, .. } = &mut *st;
                for (j, c) in jumped.iter_mut().zip(chunks.iter()) {
                    *j &= *c == Chunk::Fetching;
                }
                st.jumps = st.jumped.iter().filter(|j| **j).count();
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
                if st.workers > st.target.max(1) + st.jumps && !st.finishing {
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

mod fetch;
#[cfg(test)]
mod tests;
