//! Work that may wait for the next commit instead of making one (group commit).
//!
//! Every commit has a fixed cost in the daemon: the log's frames are written page by page,
//! the page cache is settled and the memo's rows are read again. Write-back records each
//! finished upload, and during a `pip install` those records came at the rate files were
//! created: one commit each, the largest single cost of a small file after its create. A
//! record that nothing waits for can instead board here and be done by whichever
//! transaction comes next (a create, the next upload's start), which shares its pages.
//!
//! A rider's work runs in its own savepoint inside the host's transaction, after the host
//! persisted the data writes held in memory and before the host's own work, which then runs
//! in a savepoint of its own: a rider that fails takes nothing of the host with it, and a
//! host that fails still commits its riders. A rider learns its outcome only once the
//! commit is done; a commit that fails (or a host that panics) hands the work back, and the
//! owner does it in a transaction of its own. An owner that no transaction picked up within
//! its wait makes a transaction itself, which takes along whoever else boarded by then.
//!
//! The owner waits, blocked, for the outcome: the locks it holds (write-back's, on the
//! inode and its names) keep covering the work, exactly as when it made the commit itself.

use super::{Index, IndexResult};
use rusqlite::Transaction;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type Work = Arc<dyn Fn(&Transaction<'_>) -> IndexResult<()> + Send + Sync>;

/// What became of a rider.
enum Outcome {
    /// Its work ran (Ok or its own error) and the host committed.
    Done(IndexResult<()>),
    /// The host did not commit: the owner does the work itself.
    NotCommitted,
}

#[derive(Default)]
struct Seat {
    outcome: Mutex<Option<Outcome>>,
    filled: Condvar,
}

impl Seat {
    fn fill(&self, o: Outcome) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(o);
        self.filled.notify_all();
    }

    /// The outcome, waiting at most `limit` (None: for as long as it takes).
    fn wait(&self, limit: Option<Duration>) -> Option<Outcome> {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        match limit {
            Some(d) => {
                o = self
                    .filled
                    .wait_timeout_while(o, d, |o| o.is_none())
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => {
                o = self
                    .filled
                    .wait_while(o, |o| o.is_none())
                    .unwrap_or_else(|p| p.into_inner())
            }
        }
        o.take()
    }
}

struct Rider {
    work: Work,
    seat: Arc<Seat>,
}

/// Riders waiting for a host.
#[derive(Default)]
pub(super) struct Riders {
    queue: Mutex<Vec<Rider>>,
}

/// The riders one host took, with their results until it commits. Whatever it has not
/// filled when it goes (the commit failed, or a panic unwound) is handed back.
#[derive(Default)]
pub(super) struct Taken {
    riders: Vec<(Rider, Option<IndexResult<()>>)>,
}

impl Taken {
    pub(super) fn is_empty(&self) -> bool {
        self.riders.is_empty()
    }

    /// Takes everyone waiting and runs their work in `tx`, each in its own savepoint.
    pub(super) fn board(riders: &Riders, tx: &Transaction<'_>) -> IndexResult<Taken> {
        let queue = std::mem::take(&mut *riders.queue.lock().unwrap_or_else(|p| p.into_inner()));
        // Held by `taken` before any runs: a savepoint that fails hands every one back.
        let mut taken = Taken {
            riders: queue.into_iter().map(|r| (r, None)).collect(),
        };
        for (r, result) in &mut taken.riders {
            *result = Some(in_savepoint(tx, |tx| (r.work)(tx))?);
        }
        Ok(taken)
    }

    /// The host committed: every rider gets its result.
    pub(super) fn committed(mut self) {
        for (r, result) in self.riders.drain(..) {
            if let Some(result) = result {
                r.seat.fill(Outcome::Done(result));
            }
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        for (r, _) in self.riders.drain(..) {
            r.seat.fill(Outcome::NotCommitted);
        }
    }
}

/// Runs `f` in a savepoint of `tx`: its changes stay if it succeeds and are undone if it
/// fails, the rest of the transaction untouched either way. The outer error is the
/// savepoint's own (the transaction is then unusable); the inner one is `f`'s. (One name
/// serves every savepoint: they follow one another, never nest.)
pub(super) fn in_savepoint<T>(
    tx: &Transaction<'_>,
    f: impl FnOnce(&Transaction<'_>) -> IndexResult<T>,
) -> IndexResult<IndexResult<T>> {
    tx.prepare_cached("SAVEPOINT simfs_part")?.execute([])?;
    let out = f(tx);
    if out.is_err() {
        tx.prepare_cached("ROLLBACK TO simfs_part")?.execute([])?;
    }
    tx.prepare_cached("RELEASE simfs_part")?.execute([])?;
    Ok(out)
}

impl Index {
    /// Does `work` in a transaction: the next one anyone makes within `within`, or one of
    /// its own after that. Returns once that transaction committed (or `work` failed).
    /// With a zero `within` it makes its own at once, taking along whoever waits.
    pub(crate) fn write_soon(
        &self,
        within: Duration,
        work: impl Fn(&Transaction<'_>) -> IndexResult<()> + Send + Sync + 'static,
    ) -> IndexResult<()> {
        if within.is_zero() {
            return self.write(|tx| work(tx));
        }
        let work: Work = Arc::new(work);
        let seat = Arc::new(Seat::default());
        self.riders
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Rider {
                work: work.clone(),
                seat: seat.clone(),
            });
        let outcome = match seat.wait(Some(within)) {
            Some(o) => o,
            None => {
                // No host came: be one (unless a host took the seat a moment ago, which then
                // fills it when its own commit is done).
                let own = self.write(|_| Ok(()));
                match seat.wait(None) {
                    Some(Outcome::NotCommitted) => own.and(Ok(Outcome::NotCommitted))?,
                    Some(o) => o,
                    None => Outcome::NotCommitted,
                }
            }
        };
        match outcome {
            Outcome::Done(result) => result,
            Outcome::NotCommitted => self.write(|tx| work(tx)),
        }
    }
}

impl Index {
    /// Commits the riders waiting now, for a caller about to wait for a commit of its own
    /// that may need theirs first (an fsync of a file whose record waits here).
    pub(crate) fn hurry_riders(&self) -> IndexResult<()> {
        if self
            .riders
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return Ok(());
        }
        self.write(|_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::memo::tests::{file, fresh_index};
    use super::super::IndexError;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn perm_of(index: &super::Index, ino: u64) -> i64 {
        index
            .with_conn(|c| {
                Ok(c.query_row(
                    "SELECT perm FROM inodes WHERE ino = ?1",
                    [ino as i64],
                    |r| r.get(0),
                )?)
            })
            .unwrap()
    }

    fn set_perm(
        perm: i64,
        ino: u64,
    ) -> impl Fn(&rusqlite::Transaction<'_>) -> super::IndexResult<()> {
        move |tx| {
            tx.execute(
                "UPDATE inodes SET perm = ?1 WHERE ino = ?2",
                [perm, ino as i64],
            )?;
            Ok(())
        }
    }

    /// A rider whose wait only another transaction can cut short, once it is queued.
    fn board(
        index: &Arc<super::Index>,
        work: impl Fn(&rusqlite::Transaction<'_>) -> super::IndexResult<()> + Send + Sync + 'static,
    ) -> std::thread::JoinHandle<super::IndexResult<()>> {
        let before = index.riders.queue.lock().unwrap().len();
        let i2 = index.clone();
        let h = std::thread::spawn(move || i2.write_soon(Duration::from_secs(60), work));
        while index.riders.queue.lock().unwrap().len() == before {
            std::thread::sleep(Duration::from_millis(1));
        }
        h
    }

    #[test]
    fn a_rider_is_committed_by_the_next_transaction_of_anyone() {
        let (_d, index, at) = fresh_index();
        let ino = file(&index, "a", at);
        let other = file(&index, "b", at);
        let index = Arc::new(index);
        let rider = board(&index, set_perm(0o600, ino));
        let t = std::time::Instant::now();
        index.write(set_perm(0o640, other)).unwrap();
        rider.join().unwrap().unwrap();
        assert!(t.elapsed() < Duration::from_secs(30));
        assert_eq!(perm_of(&index, ino), 0o600);
        assert_eq!(perm_of(&index, other), 0o640);
    }

    #[test]
    fn hurrying_commits_the_riders_waiting_now() {
        let (_d, index, at) = fresh_index();
        let ino = file(&index, "a", at);
        let index = Arc::new(index);
        let rider = board(&index, set_perm(0o600, ino));
        let t = std::time::Instant::now();
        index.hurry_riders().unwrap();
        rider.join().unwrap().unwrap();
        assert!(t.elapsed() < Duration::from_secs(30));
        assert_eq!(perm_of(&index, ino), 0o600);
    }

    #[test]
    fn a_rider_nobody_takes_commits_itself_after_its_wait() {
        let (_d, index, at) = fresh_index();
        let ino = file(&index, "a", at);
        index
            .write_soon(Duration::from_millis(5), set_perm(0o600, ino))
            .unwrap();
        assert_eq!(perm_of(&index, ino), 0o600);
        assert!(index.riders.queue.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failing_host_still_commits_its_riders_and_a_failing_rider_spares_the_host() {
        let (_d, index, at) = fresh_index();
        let ino = file(&index, "a", at);
        let other = file(&index, "b", at);
        let index = Arc::new(index);
        let ran = Arc::new(AtomicUsize::new(0));
        let good = board(&index, set_perm(0o600, ino));
        let r2 = ran.clone();
        let bad = board(&index, move |tx| {
            r2.fetch_add(1, Ordering::SeqCst);
            set_perm(0o700, ino)(tx)?;
            Err(IndexError::Corrupt("the rider fails".into()))
        });
        let host = index.write(|tx| {
            set_perm(0o640, other)(tx)?;
            Err::<(), _>(IndexError::Corrupt("the host fails".into()))
        });
        assert!(matches!(host, Err(IndexError::Corrupt(m)) if m == "the host fails"));
        good.join().unwrap().unwrap();
        let bad = bad.join().unwrap();
        assert!(matches!(bad, Err(IndexError::Corrupt(m)) if m == "the rider fails"));
        // The failing rider ran once and left nothing; the host's own change was undone.
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(perm_of(&index, ino), 0o600);
        assert_ne!(perm_of(&index, other), 0o640);
    }
}
