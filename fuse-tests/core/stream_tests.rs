//! Checkpoints streamed while written: blocks a sequential writer has finished are staged
//! before its close, each once; the commit stages only the rest, and the committed blob is
//! the file at the commit whatever was rewritten or truncated after staging. (The test world
//! uploads in 16 KiB blocks, files over 64 KiB in blocks.)

use crate::world::{fixture, world_async, Held, World};
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

/// Hands `write` each 4 KiB of `data` and its offset, in order: a sequential writer.
fn in_order(data: &[u8], mut write: impl FnMut(u64, &[u8])) {
    for (i, chunk) in data.chunks(4096).enumerate() {
        write((i * 4096) as u64, chunk);
    }
}

/// Writes `data` sequentially in 4 KiB writes to a new file; returns its inode and handle.
fn write_sequentially(w: &World, data: &[u8]) -> (u64, u64) {
    let (a, fh) =
        w.fs.create(ROOT_INO, OsStr::new("ckpt.pt"), 0o644, ME)
            .unwrap();
    in_order(data, |at, chunk| {
        w.fs.write(fh, at, chunk).unwrap();
    });
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

/// `ino` cut (or extended) to `size` bytes through handle `fh`.
fn truncate(w: &World, fh: u64, ino: u64, size: usize) {
    let c = AttrChanges {
        size: Some(size as u64),
        ..Default::default()
    };
    w.fs.setattr_via(Some(fh), ino, &c).unwrap();
}

/// Writes `data()` sequentially to a new file and waits until its twelve blocks and its
/// tail are staged (the writer gone quiet); the data, the inode and the handle.
fn written_until_quiet(w: &World) -> (Vec<u8>, u64, u64) {
    let before = puts(w);
    let data = data();
    let (ino, fh) = write_sequentially(w, &data);
    eventually("the twelve blocks and the partial tail are staged", || {
        puts(w) - before == 13
    });
    (data, ino, fh)
}

/// A world whose writers count as quiet after 30 ms without a write.
fn quick_world() -> World {
    let store = Arc::new(FaultyStore::new(fixture()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::world::config(&dir, 1 << 20, Some(Duration::ZERO), false);
    cfg.writeback.quiet = Some(Duration::from_millis(30));
    crate::world::world_from(store, dir, "", &cfg)
}

#[test]
fn a_writer_gone_quiet_has_its_tail_staged_so_its_fsync_only_commits() {
    let w = quick_world();
    let before = puts(&w);
    let data = data();
    let (ino, fh) = write_sequentially(&w, &data);
    eventually("the twelve blocks and the partial tail are staged", || {
        puts(&w) - before == 13
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        puts(&w) - before,
        13,
        "a quiet writer's tail is staged once"
    );
    w.fs.fsync(ino).unwrap();
    assert_eq!(puts(&w) - before, 14, "the fsync only commits the list");
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

fn bytes_sent(w: &World) -> u64 {
    w.store.counters.put_bytes.load(Ordering::SeqCst)
}

#[test]
fn a_write_into_the_last_block_while_the_fsync_sends_it_is_committed_by_the_next_fsync() {
    let w = world();
    let before = puts(&w);
    let mut data = data();
    let (ino, fh) = write_sequentially(&w, &data);
    eventually("the twelve whole blocks are staged", || {
        puts(&w) - before >= 12
    });
    // The fsync has read the partial last block and waits to send it; a write lands in it.
    std::thread::scope(|s| {
        let held = Held::new(&w.store);
        let fsync = s.spawn(|| w.fs.fsync(ino));
        held.wait_for_request(&fsync);
        let at = 12 * BLOCK + 7;
        w.fs.write(fh, at as u64, b"LATE").unwrap();
        data[at..at + 4].copy_from_slice(b"LATE");
        drop(held);
        fsync.join().unwrap().unwrap();
    });
    w.fs.fsync(ino).unwrap();
    assert!(
        w.store.inner().data("ckpt.pt").unwrap() == data,
        "the second fsync commits the write the first one missed"
    );
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn a_tail_staged_while_quiet_is_staged_again_only_once_it_has_doubled() {
    // A log appended now and then: its partial last block is not sent again for every
    // line; the commit sends what was appended after the part staged.
    let w = quick_world();
    let (mut data, ino, fh) = written_until_quiet(&w);
    let before = puts(&w);
    let line = b"one more line\n";
    let end = data.len() as u64;
    w.fs.write(fh, end, line).unwrap();
    data.extend_from_slice(line);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        puts(&w),
        before,
        "a tail grown by a line is left for the commit"
    );
    let sent = bytes_sent(&w);
    w.fs.fsync(ino).unwrap();
    assert_eq!(puts(&w) - before, 2, "the line, as a block, and the commit");
    assert_eq!(
        bytes_sent(&w) - sent,
        line.len() as u64,
        "only the line is sent"
    );
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    // Grown to twice what was staged of it, it is staged ahead again.
    let more = vec![7u8; 2 * (SIZE % BLOCK)];
    let end = data.len() as u64;
    w.fs.write(fh, end, &more).unwrap();
    data.extend_from_slice(&more);
    let before = puts(&w);
    eventually("the doubled tail is staged", || puts(&w) - before == 1);
    w.fs.fsync(ino).unwrap();
    assert_eq!(puts(&w) - before, 2, "then only the commit");
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn a_tail_staged_while_quiet_and_then_rewritten_is_staged_again_for_the_commit() {
    let w = quick_world();
    let (mut data, ino, fh) = written_until_quiet(&w);
    // Rewritten in its staged part, then cut shorter, before a quiet spell could stage it.
    let at = 12 * BLOCK + 10;
    w.fs.write(fh, at as u64, b"CHANGED").unwrap();
    data[at..at + 7].copy_from_slice(b"CHANGED");
    truncate(&w, fh, ino, SIZE - 1000);
    data.truncate(SIZE - 1000);
    w.fs.fsync(ino).unwrap();
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn a_tail_staged_while_quiet_then_cut_and_grown_again_is_not_taken_for_the_file() {
    // The staged part's bytes are gone by the truncate, even though the file is as long.
    let w = quick_world();
    let (mut data, ino, fh) = written_until_quiet(&w);
    let cut = 12 * BLOCK + 100;
    truncate(&w, fh, ino, cut);
    let again = vec![9u8; SIZE - cut];
    w.fs.write(fh, cut as u64, &again).unwrap();
    data[cut..].copy_from_slice(&again);
    w.fs.fsync(ino).unwrap();
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn a_writer_rewriting_the_middle_of_its_file_has_nothing_staged_when_quiet() {
    // A database's pages: staged at its fsync, not at every pause between its writes.
    let w = quick_world();
    let data = data();
    let (ino, fh) = write_sequentially(&w, &data);
    w.fs.fsync(ino).unwrap();
    let before = puts(&w);
    w.fs.write(fh, 100, b"page").unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        puts(&w),
        before,
        "nothing staged for a rewrite in the middle"
    );
    w.fs.flush(fh).unwrap();
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
    truncate(&w, fh, ino, cut);
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
    in_order(&data, |at, chunk| {
        w.fs.write(fh, at, chunk).unwrap();
    });
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

/// A new file written in place, as `fuse.rs` opens a read-write create in passthrough: its
/// handle, and the backing file the kernel would write.
fn create_in_place(w: &World, name: &str) -> (u64, u64, std::fs::File) {
    let (a, fh) = w.fs.create(ROOT_INO, OsStr::new(name), 0o644, ME).unwrap();
    let backing = w.fs.in_place_file(fh, 0).expect("a new file's local copy");
    w.fs.write_in_place(fh, &backing).unwrap();
    (a.ino, fh, backing)
}

#[test]
fn a_file_written_in_place_is_staged_as_it_grows_and_a_block_rewritten_unseen_is_staged_again() {
    use std::os::unix::fs::FileExt;
    let w = world();
    let before = puts(&w);
    let mut data = data();
    let (ino, fh, backing) = create_in_place(&w, "model.h5");
    // The kernel's writes: simfs is not told.
    in_order(&data, |at, chunk| backing.write_all_at(chunk, at).unwrap());
    eventually("the twelve whole blocks are staged by looking", || {
        puts(&w) - before == 12
    });
    backing.write_all_at(b"REWRITTEN", 100).unwrap();
    data[100..109].copy_from_slice(b"REWRITTEN");
    w.fs.fsync(ino).unwrap();
    assert_eq!(
        puts(&w) - before,
        15,
        "block 0 again (its checksum moved), the tail and the commit"
    );
    assert_eq!(w.store.inner().data("model.h5").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(w.fs.getattr(ino).unwrap().size, SIZE as u64);
}

#[test]
fn a_file_written_in_place_has_its_tail_staged_when_quiet_and_checked_at_the_commit() {
    use std::os::unix::fs::FileExt;
    let w = quick_world();
    let before = puts(&w);
    let mut data = data();
    let (ino, fh, backing) = create_in_place(&w, "pack");
    in_order(&data, |at, chunk| backing.write_all_at(chunk, at).unwrap());
    eventually(
        "the twelve blocks and the tail are staged by looking",
        || puts(&w) - before == 13,
    );
    w.fs.fsync(ino).unwrap();
    assert_eq!(puts(&w) - before, 14, "the fsync only commits the list");
    assert_eq!(w.store.inner().data("pack").unwrap(), data);
    // Rewritten in place in its staged tail, the length unchanged: the checksum tells.
    let at = 12 * BLOCK + 7;
    backing.write_all_at(b"HEADER", at as u64).unwrap();
    data[at..at + 6].copy_from_slice(b"HEADER");
    w.fs.fsync(ino).unwrap();
    assert_eq!(w.store.inner().data("pack").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn a_pack_staged_ahead_fsynced_closed_and_renamed_is_copied_to_its_name_not_sent_again() {
    use simfs::posix::RenameMode;
    use std::os::unix::fs::FileExt;
    let w = quick_world();
    let c = &w.store.counters;
    let data = data();
    // git's index-pack: written in place, fsynced, closed, renamed into place.
    let (ino, fh, backing) = create_in_place(&w, "tmp_pack");
    in_order(&data, |at, chunk| backing.write_all_at(chunk, at).unwrap());
    let before = puts(&w);
    eventually("the blocks and the tail are staged by looking", || {
        puts(&w) - before == 13
    });
    w.fs.fsync(ino).unwrap();
    assert_eq!(puts(&w) - before, 14, "the fsync only commits the list");
    let sent = c.put_bytes.load(Ordering::SeqCst);
    let copies = c.copy.load(Ordering::SeqCst);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    w.fs.rename(
        ROOT_INO,
        OsStr::new("tmp_pack"),
        ROOT_INO,
        OsStr::new("pack-1.pack"),
        RenameMode::Replace,
    )
    .unwrap();
    crate::write_tests::drain(&w);
    assert_eq!(w.store.inner().data("pack-1.pack").unwrap(), data);
    assert!(w.store.inner().data("tmp_pack").is_none());
    assert_eq!(
        c.put_bytes.load(Ordering::SeqCst) - sent,
        0,
        "no data sent again"
    );
    assert_eq!(
        c.copy.load(Ordering::SeqCst) - copies,
        1,
        "copied to its name"
    );
}

#[test]
fn a_file_written_in_place_fsynced_then_closed_keeps_the_version_its_fsync_committed() {
    use std::os::unix::fs::FileExt;
    // A checkpoint created read-write, written by the kernel, fsynced, closed. The close
    // takes the writes in again and finds what the fsync committed: another node may be
    // reading that version already, and a new ETag would tell it the blob changed.
    let w = quick_world();
    let c = &w.store.counters;
    let data = data();
    let (ino, fh, backing) = create_in_place(&w, "step-1000.pt");
    in_order(&data, |at, chunk| backing.write_all_at(chunk, at).unwrap());
    w.fs.fsync(ino).unwrap();
    let etag = w
        .store
        .inner()
        .etag("step-1000.pt")
        .expect("committed by the fsync");
    let writes = c.writes();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    crate::write_tests::drain(&w);
    assert_eq!(
        c.writes() - writes,
        0,
        "no request after the fsync (puts {}, metadata sets {}, copies {})",
        c.put.load(Ordering::SeqCst),
        c.set_metadata.load(Ordering::SeqCst),
        c.copy.load(Ordering::SeqCst)
    );
    assert_eq!(
        w.store.inner().etag("step-1000.pt").as_deref(),
        Some(etag.as_str())
    );
    assert_eq!(w.store.inner().data("step-1000.pt").unwrap(), data);
}

#[test]
fn a_file_laid_out_then_written_in_place_is_staged_by_its_fsync_and_then_only_what_changed() {
    use std::os::unix::fs::FileExt;
    let w = world();
    let mut data = data();
    let (ino, fh, backing) = create_in_place(&w, "table.db");
    truncate(&w, fh, ino, SIZE);
    let before = puts(&w);
    in_order(&data, |at, chunk| backing.write_all_at(chunk, at).unwrap());
    // Several looks: the file never grew, so nothing is staged before it is written.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(puts(&w), before, "nothing staged ahead");
    w.fs.fsync(ino).unwrap();
    assert_eq!(puts(&w) - before, 14, "every block and the commit");
    backing.write_all_at(b"ROW", 5 * BLOCK as u64 + 7).unwrap();
    data[5 * BLOCK + 7..5 * BLOCK + 10].copy_from_slice(b"ROW");
    w.fs.fsync(ino).unwrap();
    assert_eq!(
        puts(&w) - before,
        14 + 2,
        "the block written and the commit: the tail, unchanged, is named again"
    );
    assert_eq!(w.store.inner().data("table.db").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}

#[test]
fn times_set_after_writes_in_place_are_kept_through_the_close() {
    use std::os::unix::fs::FileExt;
    let w = world();
    let (ino, fh, backing) = create_in_place(&w, "copied");
    backing.write_all_at(b"rsync's temporary file", 0).unwrap();
    // rsync and `cp -p` set the source's times once the data is written.
    let then = std::time::UNIX_EPOCH + Duration::from_secs(1_577_934_245);
    let c = AttrChanges {
        mtime: Some(SetTime::At(then)),
        ..Default::default()
    };
    w.fs.setattr_via(Some(fh), ino, &c).unwrap();
    assert_eq!(w.fs.getattr(ino).unwrap().mtime, then, "while open");
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    let a = w.fs.getattr(ino).unwrap();
    assert_eq!(a.mtime, then, "after the close's look at the writes");
    assert_eq!(a.size, 22);
}

#[test]
fn blocks_staged_through_simfs_still_serve_the_commit_once_a_writer_goes_in_place() {
    use std::os::unix::fs::FileExt;
    // The README's checkpoint recipe: saved through simfs (its blocks staged as written),
    // then opened read-write, in place, to be fsynced.
    let w = world();
    let before = puts(&w);
    let mut data = data();
    let (ino, saver) = write_sequentially(&w, &data);
    eventually("staged through simfs", || puts(&w) - before == 12);
    let fh = w.fs.open(ino, true, false).unwrap();
    let backing = w.fs.in_place_file(fh, 0).expect("a local copy");
    w.fs.write_in_place(fh, &backing).unwrap();
    w.fs.flush(saver).unwrap();
    w.fs.release(saver).unwrap();
    // One block rewritten in place, unseen.
    backing
        .write_all_at(b"IN PLACE", 3 * BLOCK as u64 + 5)
        .unwrap();
    data[3 * BLOCK + 5..3 * BLOCK + 13].copy_from_slice(b"IN PLACE");
    w.fs.fsync(ino).unwrap();
    assert_eq!(
        puts(&w) - before,
        15,
        "block 3 again, the tail and the commit; the other eleven reused"
    );
    assert_eq!(w.store.inner().data("ckpt.pt").unwrap(), data);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
}
