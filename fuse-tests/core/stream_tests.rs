//! Checkpoints streamed while written: blocks a sequential writer has finished are staged
//! before its close, each once; the commit stages only the rest, and the committed blob is
//! the file at the commit whatever was rewritten or truncated after staging. (The test world
//! uploads in 16 KiB blocks, files over 64 KiB in blocks.)

use crate::world::{fixture, world_async, World};
use crate::write_tests::ME;
use simfs::blob::faulty::FaultyStore;
use simfs::fs::*;
use simfs::index::ROOT_INO;
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCK: usize = 16 << 10;
/// Twelve whole blocks and a tail.
const SIZE: usize = 12 * BLOCK + 5000;

fn data() -> Vec<u8> {
    (0..SIZE as u32).map(|i| (i % 249) as u8).collect()
}

fn puts(w: &World) -> u64 {
    w.store.counters.put.load(Ordering::SeqCst)
}

fn eventually(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(20), "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Writes `data` sequentially in 4 KiB writes to a new file; returns its inode and handle.
fn write_sequentially(w: &World, data: &[u8]) -> (u64, u64) {
    let (a, fh) =
        w.fs.create(ROOT_INO, OsStr::new("ckpt.pt"), 0o644, ME)
            .unwrap();
    for (i, chunk) in data.chunks(4096).enumerate() {
        w.fs.write(fh, (i * 4096) as u64, chunk).unwrap();
    }
    (a.ino, fh)
}

fn world() -> World {
    let store = Arc::new(FaultyStore::new(fixture()));
    world_async(store, tempfile::tempdir().unwrap(), Duration::ZERO)
}

#[test]
fn a_sequential_writers_blocks_are_staged_before_its_close_and_each_only_once() {
    let w = world();
    let before = puts(&w);
    let data = data();
    let (ino, fh) = write_sequentially(&w, &data);
    eventually(
        "the twelve finished blocks are staged while the file is open",
        || puts(&w) - before == 12,
    );
    assert!(
        w.store.inner().data("ckpt.pt").is_none(),
        "nothing committed yet"
    );
    w.fs.flush(fh).unwrap();
    w.fs.fsync(ino).unwrap();
    assert_eq!(
        puts(&w) - before,
        14,
        "the tail and the commit: no block twice"
    );
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    w.fs.release(fh).unwrap();
}

#[test]
fn a_block_written_again_after_it_was_staged_is_staged_again() {
    let w = world();
    let before = puts(&w);
    let mut data = data();
    let (ino, fh) = write_sequentially(&w, &data);
    eventually("staged", || puts(&w) - before == 12);
    w.fs.write(fh, 100, b"REWRITTEN").unwrap();
    data[100..109].copy_from_slice(b"REWRITTEN");
    w.fs.fsync(ino).unwrap();
    assert_eq!(
        puts(&w) - before,
        15,
        "block 0 again, the tail and the commit"
    );
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn a_truncate_after_staging_commits_the_shorter_file_only() {
    let w = world();
    let before = puts(&w);
    let data = data();
    let (ino, fh) = write_sequentially(&w, &data);
    eventually("staged", || puts(&w) - before == 12);
    let cut = 5 * BLOCK + 123;
    let c = AttrChanges {
        size: Some(cut as u64),
        ..Default::default()
    };
    w.fs.setattr_via(Some(fh), ino, &c).unwrap();
    w.fs.fsync(ino).unwrap();
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), &data[..cut]);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn a_file_renamed_before_its_commit_is_uploaded_whole_at_its_new_name() {
    let w = world();
    let data = data();
    let before = puts(&w);
    let (ino, fh) = write_sequentially(&w, &data);
    eventually("staged", || puts(&w) - before >= 1);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    w.fs.rename(
        ROOT_INO,
        OsStr::new("ckpt.pt"),
        ROOT_INO,
        OsStr::new("final.pt"),
        RenameMode::Replace,
    )
    .unwrap();
    w.fs.fsync(ino).unwrap();
    assert_eq!(w.store.inner().data("final.pt").unwrap(), data);
    assert!(w.store.inner().data("ckpt.pt").is_none());
}

#[test]
fn a_crash_mid_stream_keeps_the_previous_version_and_the_next_mount_uploads_the_file() {
    let mem = simfs::blob::memory::MemoryStore::new();
    mem.put("ckpt.pt", "the previous version", &[]);
    let store = Arc::new(FaultyStore::new(mem));
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().to_path_buf();
    let w = world_async(store.clone(), dir, Duration::ZERO);
    let ino = w.fs.lookup(ROOT_INO, OsStr::new("ckpt.pt")).unwrap().ino;
    let fh = w.fs.open(ino, true, true).unwrap();
    let data = data();
    // Counted before the writes: the blocks may all be staged before the last write returns.
    let before = puts(&w);
    for (i, chunk) in data.chunks(4096).enumerate() {
        w.fs.write(fh, (i * 4096) as u64, chunk).unwrap();
    }
    eventually("blocks staged", || puts(&w) > before);
    // "kill -9" with the blocks staged and nothing committed.
    let copy = tempfile::tempdir().unwrap();
    crate::write_tests::copy_dir(&keep, copy.path());
    std::mem::forget(w);
    assert_eq!(
        store.inner().data("ckpt.pt").unwrap(),
        &b"the previous version"[..]
    );
    // The staged blocks are still on the blob (as the service keeps them for a week): the
    // next upload's blocks must not be refused beside them.
    let again = world_async(store.clone(), copy, Duration::ZERO);
    crate::write_tests::drain(&again);
    assert_eq!(store.inner().data("ckpt.pt").unwrap(), data);
}

#[test]
fn a_writer_that_fsyncs_as_it_goes_pays_each_time_only_what_changed() {
    // A log or a checkpoint fsynced every few blocks while it grows: each fsync stages what
    // was written since the last one (and the tail), and commits a list naming the blocks
    // committed before again, instead of uploading the whole file each time.
    let w = world();
    let data = data();
    let (a, fh) =
        w.fs.create(ROOT_INO, OsStr::new("train.log"), 0o644, ME)
            .unwrap();
    let mut written = 0;
    // Up to each fsync, the requests it and the staging before it made: the blocks
    // finished since the last commit, the tail, the commit. (The first five blocks are
    // staged as the writer passes them, the sixth by the fsync.)
    for (upto, want) in [
        (6 * BLOCK, 5 + 1 + 1),
        (9 * BLOCK + 100, 3 + 1 + 1),
        (SIZE, 3 + 1 + 1),
    ] {
        let before = puts(&w);
        while written < upto {
            let n = 4096.min(upto - written);
            w.fs.write(fh, written as u64, &data[written..written + n])
                .unwrap();
            written += n;
        }
        w.fs.fsync(a.ino).unwrap();
        assert!(
            w.store.inner().data("train.log").unwrap() == data[..upto],
            "the blob is the file at the fsync ({upto} bytes)"
        );
        assert_eq!(
            puts(&w) - before,
            want,
            "requests up to the fsync at {upto}"
        );
    }
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}
