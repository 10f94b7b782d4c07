//! Many threads changing the namespace at once while the service loses answers, then a
//! drain and a fresh node: whatever interleaving happened, the container must end up as the
//! mount sees it. It pins what the single-threaded model test could not reach: a name
//! written by a lost answer while it sat in the trash was left behind for other nodes to
//! see (every run of this test failed that way before the fix). A longer ad hoc storm
//! (20 s, four writers, four readers) also found index writes refused with "database is
//! locked"; the index's unit test pins that one, which this short run rarely meets. The
//! second storm runs the background thread and takes the service offline now and then, as a
//! mount under a flaky link does.
//!
//! Randomness comes from the threads' interleaving, not a seed: the test checks properties
//! that hold for every interleaving, so no legitimate outcome fails it.

use crate::refresh_tests::{tree, Seen};
use crate::world::{world_async, StopOnDrop, World};
use crate::write_tests::{drain, fresh, no_conflicts};
use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use simfs::fs::write::Caller;
use simfs::fs::FsError;
use simfs::index::ROOT_INO;
use simfs::posix::{AttrChanges, RenameMode};
use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ME: Caller = Caller { uid: 0, gid: 0 };
const WORKERS: u32 = 3;
const READERS: u32 = 2;

fn name(s: String) -> OsString {
    OsString::from(s)
}

/// An answer any interleaving may give: the name was taken or removed by another thread.
fn expected(e: &FsError) -> bool {
    matches!(e, FsError::NotFound | FsError::NotDir | FsError::IsDir)
        || matches!(e, FsError::Index(simfs::index::IndexError::Refused(_)))
}

struct Errors(Mutex<Vec<String>>);

impl Errors {
    fn check<T>(&self, what: &str, r: Result<T, FsError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if !expected(&e) {
                    self.0.lock().unwrap().push(format!("{what}: {e:?}"));
                }
                None
            }
        }
    }
}

/// Creates, writes, fsyncs, renames over, links, chmods, rewrites and removes files in its
/// own directory `d{t}`, and moves some into the next worker's directory.
fn worker(w: &World, t: u32, stop: &AtomicBool, errors: &Errors) {
    let d =
        w.fs.mkdir(ROOT_INO, &name(format!("d{t}")), 0o755, ME)
            .unwrap()
            .ino;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (f, g) = (name(format!("f{}", i % 40)), name(format!("g{}", i % 40)));
        if let Some((a, fh)) = errors.check("create", w.fs.create(d, &f, 0o644, ME)) {
            errors.check("write", w.fs.write(fh, 0, format!("{t}:{i}").as_bytes()));
            if i.is_multiple_of(3) {
                // Fails when the service loses its answer: that is fsync's to report.
                let _ = w.fs.fsync(a.ino);
            }
            errors.check("flush", w.fs.flush(fh));
            errors.check("release", w.fs.release(fh));
        }
        errors.check("rename", w.fs.rename(d, &f, d, &g, RenameMode::Replace));
        if i.is_multiple_of(4) {
            if let Ok(a) = w.fs.lookup(d, &g) {
                let l = name(format!("l{}", i % 40));
                errors.check("link", w.fs.link(a.ino, d, &l));
                let chmod = AttrChanges {
                    perm: Some(0o600),
                    ..Default::default()
                };
                errors.check("chmod", w.fs.setattr(a.ino, &chmod));
                if let Some(fh) = errors.check("open", w.fs.open(a.ino, true, false)) {
                    errors.check("rewrite", w.fs.write(fh, 1, b"again"));
                    errors.check("flush", w.fs.flush(fh));
                    errors.check("release", w.fs.release(fh));
                }
            }
        }
        if i.is_multiple_of(5) {
            let s = name(format!("s{}", i % 40));
            errors.check("symlink", w.fs.symlink(d, &s, b"target", ME));
            let _ = w.fs.unlink(d, &name(format!("s{}", (i + 20) % 40)));
            let next = name(format!("d{}", (t + 1) % WORKERS));
            if let Ok(other) = w.fs.lookup(ROOT_INO, &next) {
                let to = name(format!("x{t}-{}", i % 10));
                let _ = w.fs.rename(d, &g, other.ino, &to, RenameMode::Replace);
            }
        }
        if i.is_multiple_of(7) {
            let _ = w.fs.unlink(d, &g);
            let _ = w.fs.unlink(d, &name(format!("l{}", (i + 8) % 40)));
            let _ = w.fs.mkdir(d, &name(format!("sub{}", i % 5)), 0o755, ME);
            let _ = w.fs.rmdir(d, &name(format!("sub{}", (i + 2) % 5)));
        }
    }
}

/// Looks names up, stats them and lists the directories while they change.
fn reader(w: &World, stop: &AtomicBool, errors: &Errors) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        for t in 0..WORKERS {
            let Ok(d) = w.fs.lookup(ROOT_INO, &name(format!("d{t}"))) else {
                continue;
            };
            for n in [format!("f{}", i % 40), format!("g{}", i % 40)] {
                if let Ok(a) = w.fs.lookup(d.ino, &name(n)) {
                    errors.check("getattr", w.fs.getattr(a.ino));
                }
            }
            if i.is_multiple_of(10) {
                if let Some(fh) = errors.check("opendir", w.fs.opendir(d.ino)) {
                    errors.check("readdir", w.fs.readdir(fh, 0));
                    w.fs.releasedir(fh);
                }
            }
        }
    }
}

/// Every entry as a user sees it, without times (uploads do not carry atime, and ctime is
/// the node's own).
type Entry = (String, String, u32, u64, u32, Vec<u8>, Vec<u8>);

fn seen(w: &World) -> Vec<Entry> {
    tree(w)
        .into_iter()
        .map(|e: Seen| (e.0, format!("{:?}", e.1), e.2, e.4, e.6, e.7, e.8))
        .collect()
}

/// Runs the writers and readers for `secs`, calling `fault(k)` every 50 ms (k counts from
/// 1); then a drain, and the container must be what the mount sees, from a fresh node.
fn storm(w: &World, secs: u64, fault: impl Fn(u64)) {
    let (stop, errors) = (AtomicBool::new(false), Errors(Mutex::new(Vec::new())));
    std::thread::scope(|s| {
        let _stopping = StopOnDrop(&stop);
        for t in 0..WORKERS {
            let (stop, errors) = (&stop, &errors);
            s.spawn(move || worker(w, t, stop, errors));
        }
        for _ in 0..READERS {
            let (stop, errors) = (&stop, &errors);
            s.spawn(move || reader(w, stop, errors));
        }
        let started = Instant::now();
        let mut k = 0;
        while started.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(50));
            k += 1;
            fault(k);
        }
        w.store.lose_answers(0);
        w.store.set_offline(false);
    });
    let errors = errors.0.into_inner().unwrap();
    assert!(errors.is_empty(), "unexpected errors: {errors:?}");
    drain(w);
    no_conflicts(w);
    let (mine, theirs) = (seen(w), seen(&fresh(w)));
    let only = |a: &[Entry], b: &[Entry]| -> Vec<String> {
        a.iter()
            .filter(|x| !b.contains(x))
            .map(|x| x.0.clone())
            .collect()
    };
    assert!(
        mine == theirs,
        "only on the writer: {:?}; only on a fresh node: {:?}",
        only(&mine, &theirs),
        only(&theirs, &mine)
    );
    assert!(mine.len() > 50, "the storm made {} entries", mine.len());
    assert_eq!(w.fs.index().open_intents(None).unwrap(), vec![]);
}

#[test]
fn a_storm_of_namespace_changes_with_lost_answers_leaves_the_container_as_the_mount_sees_it() {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let w = world_async(store, tempfile::tempdir().unwrap(), Duration::ZERO);
    w.store.set_latency(Duration::from_millis(1));
    // The next write's answer is lost: the service committed, simfs never heard.
    storm(&w, 4, |_| w.store.lose_answers(1));
}

#[test]
fn a_storm_while_the_background_uploads_through_lost_answers_and_outages_ends_final_at_a_drain() {
    // The background retries failures and settles lost answers while the drain runs. A
    // longer ad hoc storm like this one found three bugs, each now pinned by a test of its
    // own in `write_tests`: the drain returned before a lost answer's blob was deleted (the
    // background did it a moment later), a rewrite's lost answer stayed for good, and a
    // lost delete's answer made a new file conflict with the mount itself. Before those
    // fixes this test failed 3 runs of 8.
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let w = world_async(store, tempfile::tempdir().unwrap(), Duration::ZERO);
    w.store.set_latency(Duration::from_millis(5));
    let _background = w.wb().start();
    storm(&w, 8, |k| {
        if k % 4 == 0 {
            w.store.lose_answers(1);
        }
        // Offline for 150 ms of every 1.5 s.
        match k % 30 {
            0 => w.store.set_offline(true),
            3 => w.store.set_offline(false),
            _ => {}
        }
    });
}
