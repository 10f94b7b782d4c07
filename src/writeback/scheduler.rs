//! When uploads happen: batches of due changes, drain, recovery, the background thread.
//!
//! A namespace or attribute change becomes due `delay` after the first change of a burst
//! (see `index::write`); a written file becomes due when it is closed (`closed`), at once.
//! The background thread uploads what is due, oldest first, 16 inodes at a time to start
//! with and adapted to the service (`Concurrency`: halved when it pushes back, else steered
//! by how long small uploads take, up to 64), holding back while an upload someone waits
//! for runs (`Foreground`), then sleeps
//! until the next change is due, a new change is due earlier than that (`changed` wakes it),
//! or in-memory data writes should be persisted to the index. An idle mount's thread sleeps
//! and does no work. A file a handle is still writing (written, not yet flushed) is left for
//! later: uploading it midway would only be uploaded again.

use super::{WbResult, Writeback, WritebackError};
use crate::index::journal::Failing;
use crate::posix::{AttrChanges, SetTime};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

/// Inodes the background uploads at once: it starts at `START`, halves (down to one) when
/// the service pushes back (busy, throttling, timing out) and grows back by one per upload,
/// and past `START` follows how long small uploads take (`succeeded`), up to `MOST`.
const START: usize = 16;
const MOST: usize = 64;
/// Uploads up to this size steer the concurrency: their time is the round trip and the
/// service's queue, not the transfer.
const SMALL: u64 = 1 << 20;
/// A small upload within this many times the fastest one lately adds one upload at once;
/// one slower than `QUEUED` times it takes one away.
const FAST: u64 = 2;
const QUEUED: u64 = 4;
/// Uploads quicker than this made no request (a file created and deleted before its turn, a
/// change already committed): they say nothing about the service, and must not become the
/// floor every real upload is measured against.
const NO_REQUEST: Duration = Duration::from_millis(1);

/// The most the background holds back one upload for a foreground one: a stream of fsyncs
/// must not stop it.
const YIELD_AT_MOST: Duration = Duration::from_millis(200);

/// Uploads someone waits for: fsync, a close on a `sync` mount, `simfs sync` and fsync of a
/// directory. While one runs the background starts no new upload (for at most
/// `YIELD_AT_MOST` each), so the waited-for requests queue at the service behind those
/// already in flight only, not behind a steady stream of new ones. pip fsyncs each
/// package's RECORD and INSTALLER while hundreds of its files upload in the background.
#[derive(Default)]
pub(super) struct Foreground {
    running: Mutex<usize>,
    idle: Condvar,
}

/// One foreground upload under way.
pub(super) struct Waiting<'a>(&'a Foreground);

impl Foreground {
    pub(super) fn enter(&self) -> Waiting<'_> {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Waiting(self)
    }

    /// Whether a foreground upload runs: someone waits for a commit now.
    pub(super) fn is_waiting(&self) -> bool {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) > 0
    }

    /// Waits (at most `YIELD_AT_MOST`) until no foreground upload runs.
    fn yield_to(&self) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .idle
            .wait_timeout_while(running, YIELD_AT_MOST, |n| *n > 0);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut n = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// Whether a batch of uploads (or of trash deletes) should stop: two requests in a row could
/// not reach the service, and none has succeeded for `after` (since the batch began, or
/// the last success). Each such failure already took the client's own retries (seconds
/// each), so a batch of thousands of files against a service that is down would otherwise
/// make one failing attempt per file, hours, before a drain could report it. A failure for
/// any other reason, or a success, resets the streak: a flaky link is not a dead one.
pub(super) struct Down {
    after: Duration,
    state: Mutex<(std::time::Instant, u32)>,
}

impl Down {
    pub(super) fn new(after: Duration) -> Down {
        Down {
            after,
            state: Mutex::new((std::time::Instant::now(), 0)),
        }
    }

    pub(super) fn ended<T>(&self, r: &WbResult<T>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(_) => *st = (std::time::Instant::now(), 0),
            Err(e) if e.is_unreachable() => st.1 += 1,
            Err(_) => st.1 = 0,
        }
    }

    pub(super) fn given_up(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 >= 2 && st.0.elapsed() >= self.after
    }
}

/// How many uploads the background runs at once, adapted to the service.
///
/// More uploads at once help only while the service answers them in parallel. Past that they
/// wait in its queue: the uploads get no faster in total, but each takes longer, and so
/// does the one request someone waits for, an fsync's. pip fsyncs each package's RECORD and
/// INSTALLER: behind 64 queued uploads on a single-threaded Azurite they took 30 to 340 ms.
/// So past `START` a small upload's time, against the fastest lately (the floor), steers:
/// near the floor the service keeps up and one more runs; at several times it, uploads queue
/// and one fewer runs.
///
/// The floor is the round trip of an upload that ran nearly alone (`ALONE`): a queue the
/// background builds itself must never become the floor, or every upload looks fast against
/// it and the background grows into the queue it measures. An earlier floor that crept up
/// on every slow upload did just that: during a `pip install` it doubled every 180 uploads,
/// the background grew to 64 at once, and pip's fsyncs waited 150 to 270 ms behind them
/// where 16 at once cost 40 to 50 ms, for the same uploads per second. Uploads that ran
/// nearly alone creep the floor up (1/32 each) so a link that became slower is relearned;
/// while none do (sustained load), the floor stays, and slow uploads hold the background at
/// `START`.
pub(super) struct Concurrency {
    now: AtomicUsize,
    /// The fastest small upload lately, in microseconds (`u64::MAX`: none yet).
    floor_us: AtomicU64,
    /// Uploads under way (background and foreground).
    in_flight: AtomicUsize,
}

/// An upload that started with fewer than this many others under way measures the round
/// trip, not a queue.
const ALONE: usize = 2;

/// How one upload of a batch went, besides its result.
pub(super) struct Ran {
    pub(super) took: Duration,
    /// Uploads under way when it started.
    pub(super) others: usize,
}

/// One upload under way, counted in `Concurrency::in_flight` until dropped.
pub(super) struct Flight<'a> {
    of: &'a Concurrency,
    /// Uploads under way when it started.
    pub(super) others: usize,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.of.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            now: AtomicUsize::new(START),
            floor_us: AtomicU64::new(u64::MAX),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Concurrency {
    fn now(&self) -> usize {
        self.now.load(Ordering::Relaxed).clamp(1, MOST)
    }

    /// An upload starts; counted until the returned flight is dropped.
    pub(super) fn begin(&self) -> Flight<'_> {
        let others = self.in_flight.fetch_add(1, Ordering::Relaxed);
        Flight { of: self, others }
    }

    /// An upload of `size` bytes that started with `others` under way succeeded in `took`.
    fn succeeded(&self, took: Duration, size: u64, others: usize) {
        if size > SMALL || took < NO_REQUEST {
            return;
        }
        let us = (took.as_micros() as u64).max(1);
        let alone = others < ALONE;
        let floor = match self
            .floor_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                if us < f {
                    Some(us)
                } else if alone {
                    Some(f + (f / 32).max(1))
                } else {
                    None
                }
            }) {
            Ok(f) | Err(f) => f.min(us),
        };
        // Back up to `START` after a push-back as before; past it only while uploads stay
        // fast, and back down to it when they queue. Slow uploads never take it below
        // `START`: they may be slow for the client's own reasons (a busy CPU), and fewer
        // uploads at once would then only let the pending work pile up.
        let step = |n: usize| {
            if n < START || us <= floor.saturating_mul(FAST) {
                (n + 1).min(MOST)
            } else if us > floor.saturating_mul(QUEUED) {
                n.saturating_sub(1).max(START)
            } else {
                n
            }
        };
        let _ = self
            .now
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(step(n)));
    }

    /// Uploads under way now, and how many the background would run at once now.
    fn levels(&self) -> (u64, u64) {
        (
            self.in_flight.load(Ordering::Relaxed) as u64,
            self.now() as u64,
        )
    }

    fn pushed_back(&self) {
        let before = self
            .now
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some((n / 2).max(1))
            })
            .unwrap_or(1);
        tracing::debug!(
            "the service pushes back: {} uploads at once",
            (before / 2).max(1)
        );
    }
}
/// Longest time data writes stay in memory only (their size and mtime; the dirty mark is
/// always in the index).
const PERSIST_WRITES: Duration = Duration::from_secs(1);

#[derive(Default)]
struct WakeState {
    stop: bool,
    /// The thread is uploading now; a change seen meanwhile makes it look again.
    busy: bool,
    changed: bool,
    /// When the sleeping thread wakes by itself (None: only when woken).
    wake_at: Option<SystemTime>,
}

/// Files closed (and deleted inodes let go) since the background last looked, in that
/// order: due at once. Kept in memory, so a close costs no transaction: the journal already
/// says the file is pending (its create or first write did), the data is in its local copy,
/// and after a crash every pending inode is due and mount-time recovery takes a size the
/// journal lacks from the local copy (`recover`). The background takes these first, then
/// what the journal says is due.
#[derive(Default)]
pub(super) struct Closed(
    Mutex<(
        std::collections::VecDeque<u64>,
        std::collections::HashSet<u64>,
    )>,
);

impl Closed {
    pub(super) fn add(&self, ino: u64) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.1.insert(ino) {
            g.0.push_back(ino);
        }
    }

    /// The oldest `most`, no longer marked.
    fn take(&self, most: usize) -> Vec<u64> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = most.min(g.0.len());
        let taken: Vec<u64> = g.0.drain(..n).collect();
        for i in &taken {
            g.1.remove(i);
        }
        taken
    }
}

#[derive(Default)]
pub(super) struct Wakeup {
    state: Mutex<WakeState>,
    cv: Condvar,
}

impl Wakeup {
    fn lock(&self) -> std::sync::MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The background thread; stopped (and joined) by `stop` or on drop.
pub struct Background {
    wb: Arc<Writeback>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.wb.wakeup.lock().stop = true;
        self.wb.wakeup.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.halt();
    }
}

impl Writeback {
    /// A change due at `due` was made: wakes the background thread if it would sleep past it.
    pub fn changed(&self, due: SystemTime) {
        let mut st = self.wakeup.lock();
        if st.busy {
            st.changed = true;
        } else if st.wake_at.is_none_or(|w| due < w) {
            st.wake_at = Some(due);
            self.wakeup.cv.notify_one();
        }
    }

    /// Starts the background thread.
    pub fn start(self: &Arc<Self>) -> Background {
        self.wakeup.lock().stop = false;
        let wb = self.clone();
        let thread = std::thread::Builder::new()
            .name("simfs-writeback".into())
            .spawn(move || wb.background())
            .expect("spawning the write-back thread");
        Background {
            wb: self.clone(),
            thread: Some(thread),
        }
    }

    fn background(&self) {
        if let Err(e) = self.rt.block_on(self.settle_intents(None, false)) {
            tracing::warn!("write-back: settling interrupted uploads: {e}");
        }
        loop {
            {
                let mut st = self.wakeup.lock();
                if st.stop {
                    return;
                }
                st.busy = true;
                st.changed = false;
            }
            let next = match self.upload_due(false) {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!("write-back: {e}");
                    Some(SystemTime::now() + Duration::from_secs(1))
                }
            };
            // After the uploads, whose first transactions persist them too.
            if self.index.has_written() {
                if let Err(e) = self.index.persist_written() {
                    tracing::warn!("write-back: recording data writes: {e}");
                }
            }
            let next = if self.index.has_written() {
                let tick = SystemTime::now() + PERSIST_WRITES;
                Some(next.map_or(tick, |n| n.min(tick)))
            } else {
                next
            };
            let mut st = self.wakeup.lock();
            st.busy = false;
            if st.changed {
                continue;
            }
            st.wake_at = next;
            loop {
                if st.stop {
                    return;
                }
                let now = SystemTime::now();
                st = match st.wake_at {
                    Some(t) if t <= now => break,
                    Some(t) => {
                        let wait = t.duration_since(now).unwrap_or_default();
                        self.wakeup
                            .cv
                            .wait_timeout(st, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => self.wakeup.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                };
            }
        }
    }

    /// One round of background work: uploads what is due and empties the trash. A file
    /// open for writing is left to its writer unless `writers_too`. Returns when the next
    /// change will be due (None: nothing pending).
    pub fn upload_due(&self, writers_too: bool) -> WbResult<Option<SystemTime>> {
        self.upload_due_with(writers_too, &mut || {})
    }

    /// Uploads `inos`, `workers` at a time (each upload is mostly a round trip), calling
    /// `done(i, result, ran)` as the `i`th ends. A failure is recorded with its retry time by
    /// `upload` itself. Returns how many were tried: they are handed out in order, so when
    /// the batch gives up on a service it cannot reach, `inos[tried..]` were not.
    pub(super) fn upload_each(
        &self,
        inos: &[u64],
        workers: usize,
        background: bool,
        done: &(dyn Fn(usize, &WbResult<()>, Ran) + Sync),
    ) -> usize {
        let next = AtomicUsize::new(0);
        let down = Down::new(self.opts.give_up_after);
        let _waiting = (!background).then(|| self.foreground.enter());
        std::thread::scope(|scope| {
            for _ in 0..workers.min(inos.len()) {
                scope.spawn(|| loop {
                    if background {
                        self.foreground.yield_to();
                    }
                    if down.given_up() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(ino) = inos.get(i) else {
                        return;
                    };
                    let started = std::time::Instant::now();
                    let flight = self.concurrency.begin();
                    let r = self.upload_inode(*ino);
                    let others = flight.others;
                    drop(flight);
                    let took = started.elapsed();
                    down.ended(&r);
                    done(i, &r, Ran { took, others });
                });
            }
        });
        let tried = next.into_inner().min(inos.len());
        if tried < inos.len() {
            tracing::warn!(
                "write-back: the storage service cannot be reached; {} uploads left for later",
                inos.len() - tried
            );
        }
        tried
    }

    /// `upload_due`, calling `after_batch` after each batch of (up to 256) inodes.
    fn upload_due_with(
        &self,
        writers_too: bool,
        after_batch: &mut dyn FnMut(),
    ) -> WbResult<Option<SystemTime>> {
        loop {
            let now = SystemTime::now();
            let mut due = self.closed.take(256);
            let mut seen: std::collections::HashSet<u64> = due.iter().copied().collect();
            for ino in self.index.due(now, 256)? {
                if due.len() >= 256 {
                    break;
                }
                if seen.insert(ino) {
                    due.push(ino);
                }
            }
            if due.is_empty() {
                break;
            }
            let mut ready = Vec::with_capacity(due.len());
            for ino in due {
                if !writers_too && self.pins.is_writing(ino) {
                    self.index.defer(ino, now + self.opts.delay)?;
                } else {
                    ready.push(ino);
                }
            }
            let progress = AtomicBool::new(false);
            self.upload_each(&ready, self.concurrency.now(), true, &|i, r, ran| match r {
                Ok(()) => {
                    progress.store(true, Ordering::Relaxed);
                    let size = self.index.getattr(ready[i]).ok().flatten();
                    self.concurrency
                        .succeeded(ran.took, size.map_or(0, |a| a.size), ran.others);
                }
                Err(e) if e.is_pushback() => self.concurrency.pushed_back(),
                Err(_) => {}
            });
            after_batch();
            if !progress.load(Ordering::Relaxed) {
                break;
            }
        }
        self.empty_trash(writers_too)?;
        Ok(self.index.pending()?.1)
    }

    /// Uploads everything pending now (files still open for writing too when
    /// `writers_too`), calling `progress` with the number left after each round, then settles
    /// what lost answers left (`settle_all`); returns how many changes are still failing.
    pub fn drain(&self, writers_too: bool, mut progress: impl FnMut(u64)) -> WbResult<u64> {
        self.index.persist_written()?;
        self.rt.block_on(self.settle_intents(None, false))?;
        self.index.all_due_now()?;
        let mut last_left = u64::MAX;
        loop {
            self.upload_due_with(writers_too, &mut || {
                if let Ok((left, _)) = self.index.pending() {
                    progress(left);
                }
            })?;
            let left = self.index.pending()?.0;
            progress(left);
            if left == 0 {
                self.settle_all()?;
                return Ok(0);
            }
            if left >= last_left {
                // No progress this round: what is left is failing.
                return Ok(left);
            }
            last_left = left;
            self.index.all_due_now()?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Uploads under way now (background and waited for), and how many the background
    /// would run at once now (`Concurrency`): for the metrics.
    pub fn uploads_now(&self) -> (u64, u64) {
        self.concurrency.levels()
    }

    /// Number of pending changes and the ones failing with their last error.
    pub fn pending(&self) -> WbResult<(u64, Vec<Failing>)> {
        Ok((self.index.pending()?.0, self.index.failing()?))
    }

    /// Mount-time recovery: local copies may be longer than the index recorded, and newer
    /// (a crash between a write and its record); every pending change is due at once.
    /// Returns the number pending.
    pub fn recover(&self) -> WbResult<u64> {
        for ino in self.index.local_inodes()? {
            let Some(a) = self.index.getattr(ino)? else {
                continue;
            };
            let path = self.local.path(ino);
            // A crash between creating the inode and its (empty) local file.
            if !path.exists() && a.size == 0 {
                self.local
                    .make(ino, None, true)
                    .map_err(|e| WritebackError::Invalid(e.to_string()))?;
            }
            // Written in place by the kernel (FUSE passthrough) when the crash came: what was
            // written may never have reached the journal, so the copy is uploaded.
            if self.local.marked_in_place(ino) {
                if let (Ok(md), true) = (std::fs::metadata(&path), a.nlink > 0) {
                    let now = SystemTime::now();
                    self.index.wrote(ino, md.len(), now, now)?;
                }
                self.local.clear_in_place_mark(ino);
                continue;
            }
            if let Ok(md) = std::fs::metadata(&path) {
                if md.len() != a.size && a.nlink > 0 {
                    let now = SystemTime::now();
                    let fix = AttrChanges {
                        size: Some(md.len()),
                        mtime: md.modified().ok().map(SetTime::At),
                        ..Default::default()
                    };
                    self.index.setattr(ino, &fix, now, now)?;
                }
            }
        }
        self.index.all_due_now()?;
        Ok(self.index.pending()?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobError;

    #[test]
    fn concurrency_halves_when_the_service_pushes_back_and_grows_while_uploads_stay_fast() {
        let ms = Duration::from_millis;
        let c = Concurrency::default();
        assert_eq!(c.now(), START);
        c.pushed_back();
        assert_eq!(c.now(), START / 2);
        for _ in 0..10 {
            c.pushed_back();
        }
        assert_eq!(c.now(), 1, "never below one");
        c.succeeded(ms(6), 3000, 0);
        assert_eq!(
            c.now(),
            2,
            "the first small upload sets the floor, and is fast"
        );
        for _ in 0..200 {
            c.succeeded(ms(8), 3000, 0);
        }
        assert_eq!(c.now(), MOST, "never above the most");
    }

    #[test]
    fn uploads_that_queue_at_the_service_take_back_the_growth_and_large_ones_do_not_steer() {
        let ms = Duration::from_millis;
        let c = Concurrency::default();
        for _ in 0..14 {
            c.succeeded(ms(6), 3000, 0);
        }
        assert_eq!(c.now(), START + 14, "fast uploads: one more each");
        for _ in 0..10 {
            c.succeeded(ms(40), 3000, START);
        }
        assert_eq!(c.now(), START + 4, "each upload at 6x the floor: one fewer");
        c.succeeded(ms(18), 3000, 0);
        assert_eq!(c.now(), START + 4, "at 3x the floor: held");
        for _ in 0..10 {
            c.succeeded(ms(900), 64 << 20, 0);
        }
        assert_eq!(c.now(), START + 4, "a large upload's time is its transfer");
        for _ in 0..10 {
            c.succeeded(Duration::from_micros(50), 0, 0);
        }
        c.succeeded(ms(18), 3000, 0);
        assert_eq!(
            c.now(),
            START + 4,
            "an upload that made no request is no floor"
        );
        for _ in 0..100 {
            c.succeeded(ms(300), 3000, START);
        }
        assert_eq!(c.now(), START, "slow uploads never take it below the start");
        c.pushed_back();
        c.succeeded(ms(300), 3000, START);
        assert_eq!(
            c.now(),
            START / 2 + 1,
            "after a push-back it grows back to the start"
        );
        // Uploads that ran nearly alone relearn a link that became slower (or a floor that
        // was a fluke), and concurrency grows past the start again.
        let mut grew = false;
        for _ in 0..2000 {
            c.succeeded(ms(300), 3000, 0);
            grew |= c.now() > START;
        }
        assert!(grew, "a floor of 6 ms relearned as 300 ms");
    }

    #[test]
    fn a_queue_the_background_builds_itself_never_becomes_the_floor() {
        let ms = Duration::from_millis;
        let c = Concurrency::default();
        c.succeeded(ms(13), 3000, 0);
        // Sustained load on a service that answers one request at a time: every upload
        // waits behind the others in flight, and more at once would only queue longer.
        for _ in 0..5000 {
            let n = c.now() as u64;
            c.succeeded(ms(3 * n + 5), 3000, c.now() - 1);
            assert!(c.now() <= START + 1, "grew into its own queue: {}", c.now());
        }
        assert_eq!(c.now(), START);
    }

    #[test]
    fn a_service_that_answers_in_parallel_lets_the_background_grow_under_load() {
        let ms = Duration::from_millis;
        let c = Concurrency::default();
        c.succeeded(ms(20), 3000, 0);
        // Many at once, each about as fast as one alone (jitter of up to 1.5x).
        for i in 0..200u64 {
            c.succeeded(ms(20 + (i % 11)), 3000, c.now() - 1);
        }
        assert_eq!(c.now(), MOST);
    }

    #[test]
    fn the_metrics_levels_are_the_uploads_under_way_and_the_window_now() {
        let c = Concurrency::default();
        assert_eq!(c.levels(), (0, START as u64));
        let (a, b) = (c.begin(), c.begin());
        c.pushed_back();
        assert_eq!(c.levels(), (2, (START / 2) as u64));
        drop((a, b));
        assert_eq!(c.levels(), (0, (START / 2) as u64));
    }

    #[test]
    fn uploads_count_as_under_way_until_their_flight_ends() {
        let c = Concurrency::default();
        let a = c.begin();
        let b = c.begin();
        assert_eq!((a.others, b.others), (0, 1));
        drop(a);
        assert_eq!(c.begin().others, 1, "a's flight ended, b's goes on");
        drop(b);
        assert_eq!(c.begin().others, 0);
    }

    #[test]
    fn the_background_holds_back_while_a_foreground_upload_runs_but_not_for_ever() {
        use std::time::Instant;
        let f = Arc::new(Foreground::default());
        let waiting = f.enter();
        let started = Instant::now();
        f.yield_to();
        assert!(
            started.elapsed() >= YIELD_AT_MOST,
            "held back while the foreground upload runs, up to the bound"
        );
        let f2 = f.clone();
        let background = std::thread::spawn(move || {
            f2.yield_to();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(50));
        // Order, not durations: on a loaded machine the thread may start late.
        let released = Instant::now();
        drop(waiting);
        let went_on = background.join().unwrap();
        assert!(
            went_on >= released,
            "held until the foreground upload ended"
        );
        let _nested = (f.enter(), f.enter());
        drop(_nested);
        assert_eq!(
            *f.running.lock().unwrap(),
            0,
            "every foreground upload counted out"
        );
    }

    #[test]
    fn busy_throttled_and_unreachable_answers_are_pushback_and_others_are_not() {
        let service = |m: &str| BlobError::Service(m.to_string());
        assert!(service("put of \"a\": HTTP 503 ServerBusy").is_pushback());
        assert!(service("put of \"a\": HTTP 500 OperationTimedOut").is_pushback());
        assert!(service("put of \"a\": HTTP 429 TooManyRequests").is_pushback());
        assert!(BlobError::Unreachable("timed out".into()).is_pushback());
        assert!(!service("put of \"a\": HTTP 400 InvalidBlobOrBlock").is_pushback());
        assert!(!BlobError::Changed("a".into()).is_pushback());
        assert!(!BlobError::Auth("a".into()).is_pushback());
    }
}
