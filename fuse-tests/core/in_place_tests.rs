//! Writers the kernel serves in place (FUSE passthrough): their writes, found afterwards,
//! are uploaded, and a crash mid-write is recovered by the next mount.

use crate::world::{fixture, path, read_all, World};
use crate::write_tests::rw;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const CKPT: &str = "ckpt/step-100.pt";

/// A reader of the whole cached checkpoint as the kernel reads it in passthrough: its
/// handle and the backing file registered for it.
fn read_in_place(w: &World) -> (u64, u64, File) {
    // The first read hydrates; a later open finds the whole cached copy.
    read_all(w, CKPT).unwrap();
    w.fs.cache().settle();
    let ino = path(w, CKPT).unwrap().ino;
    let fh = w.fs.open(ino, false, false).unwrap();
    assert!(
        w.fs.passthrough_file(fh, 10_001).is_none(),
        "under the minimum"
    );
    let backing =
        w.fs.passthrough_file(fh, 10_000)
            .expect("a whole cached copy");
    (ino, fh, backing)
}

/// A writer of `ino` that joins the reader in place, as `fuse.rs` opens one.
fn writer_in_place(w: &World, ino: u64, backing: &File, truncate: bool) -> u64 {
    let fh = w.fs.open(ino, true, truncate).unwrap();
    w.fs.write_in_place(fh, backing).unwrap();
    fh
}

#[test]
fn a_writer_joining_a_file_read_in_place_writes_that_file_and_its_close_uploads() {
    let w = rw(fixture());
    let (ino, reader, backing) = read_in_place(&w);
    let writer = writer_in_place(&w, ino, &backing, false);
    // The kernel writes the backing file directly, past simfs.
    backing.write_all_at(b"NEW", 0).unwrap();
    backing.write_all_at(b"TAIL", 10_000).unwrap();
    assert_eq!(
        w.fs.getattr(ino).unwrap().size,
        10_004,
        "stat follows the writer before its close"
    );
    w.fs.flush(writer).unwrap();
    let mut want = vec![7u8; 10_000];
    want[..3].copy_from_slice(b"NEW");
    want.extend_from_slice(b"TAIL");
    assert_eq!(w.store.inner().data(CKPT).unwrap(), want, "close uploaded");
    assert_eq!(w.fs.read(reader, 0, 20_000).unwrap(), want);
    w.fs.release(writer).unwrap();
    w.fs.release(reader).unwrap();
    assert_eq!(read_all(&w, CKPT).unwrap(), want);
    assert_eq!(path(&w, CKPT).unwrap().size, 10_004);
}

#[test]
fn a_writer_in_place_that_writes_nothing_uploads_nothing() {
    let w = rw(fixture());
    let (ino, reader, backing) = read_in_place(&w);
    let puts = || w.store.counters.put.load(Ordering::SeqCst);
    let before = puts();
    let writer = writer_in_place(&w, ino, &backing, false);
    w.fs.flush(writer).unwrap();
    w.fs.release(writer).unwrap();
    w.fs.fsync(ino).unwrap();
    assert_eq!(puts(), before);
    w.fs.release(reader).unwrap();
}

#[test]
fn a_second_writer_in_place_never_hides_what_the_first_wrote() {
    let w = rw(fixture());
    let (ino, reader, backing) = read_in_place(&w);
    let first = writer_in_place(&w, ino, &backing, false);
    backing.write_all_at(b"ONE", 0).unwrap();
    // A second writer arrives before anyone looked: the evidence must survive it.
    let second = writer_in_place(&w, ino, &backing, false);
    w.fs.flush(second).unwrap();
    w.fs.release(second).unwrap();
    assert_eq!(&w.store.inner().data(CKPT).unwrap()[..3], b"ONE");
    // A write after the first look is found by the next one (fsync here).
    backing.write_all_at(b"TWO", 3).unwrap();
    w.fs.fsync(ino).unwrap();
    assert_eq!(&w.store.inner().data(CKPT).unwrap()[..6], b"ONETWO");
    w.fs.release(first).unwrap();
    w.fs.release(reader).unwrap();
}

#[test]
fn o_trunc_in_place_empties_the_very_file_the_kernel_reads() {
    let w = rw(fixture());
    let (ino, reader, backing) = read_in_place(&w);
    let writer = writer_in_place(&w, ino, &backing, true);
    assert_eq!(backing.metadata().unwrap().len(), 0);
    backing.write_all_at(b"fresh", 0).unwrap();
    w.fs.flush(writer).unwrap();
    assert_eq!(w.store.inner().data(CKPT).unwrap(), "fresh");
    w.fs.release(writer).unwrap();
    w.fs.release(reader).unwrap();
}

#[test]
fn a_writer_whose_copy_is_not_the_kernels_file_is_refused() {
    let w = rw(fixture());
    let (ino, reader, _) = read_in_place(&w);
    let elsewhere = tempfile::tempfile().unwrap();
    let writer = w.fs.open(ino, true, false).unwrap();
    let e = w.fs.write_in_place(writer, &elsewhere).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    w.fs.release(writer).unwrap();
    w.fs.release(reader).unwrap();
    assert_eq!(read_all(&w, CKPT).unwrap(), vec![7u8; 10_000]);
}

#[test]
fn truncating_a_file_read_in_place_by_path_truncates_the_file_the_kernel_reads() {
    let w = rw(fixture());
    let (ino, reader, backing) = read_in_place(&w);
    let empty = simfs::posix::AttrChanges {
        size: Some(0),
        ..Default::default()
    };
    w.fs.setattr(ino, &empty).unwrap();
    assert_eq!(backing.metadata().unwrap().len(), 0, "the readers see it");
    // A writer joining later shares that same file.
    let writer = writer_in_place(&w, ino, &backing, false);
    w.fs.release(writer).unwrap();
    w.fs.release(reader).unwrap();
}

/// A mount over the fixture whose uploads wait an hour (nothing goes up by itself), `act`
/// on it, then "kill -9" before any close, fsync or release: returns a fresh node's view
/// once the next mount, on a copy of the same cache directory, has drained.
fn crash_after(act: impl FnOnce(&World)) -> World {
    use crate::world::world_on;
    use crate::write_tests::{copy_dir, drain, fresh};
    let store = Arc::new(simfs::blob::faulty::FaultyStore::new(fixture()));
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().to_path_buf();
    let hour = Some(std::time::Duration::from_secs(3600));
    let w = world_on(store.clone(), dir, "", 1 << 20, hour);
    act(&w);
    std::mem::forget(w);
    let dir = tempfile::TempDir::new().unwrap();
    copy_dir(&keep, dir.path());
    let again = world_on(store, dir, "", 1 << 20, hour);
    drain(&again);
    fresh(&again)
}

#[test]
fn writes_in_place_cut_short_by_a_crash_are_uploaded_by_the_next_mount() {
    let n = crash_after(|w| {
        let (ino, _reader, backing) = read_in_place(w);
        writer_in_place(w, ino, &backing, false);
        backing.write_all_at(b"CUT", 0).unwrap();
    });
    let mut want = vec![7u8; 10_000];
    want[..3].copy_from_slice(b"CUT");
    assert_eq!(read_all(&n, CKPT).unwrap(), want);
}

#[test]
fn only_files_written_on_this_node_are_opened_read_write_in_place() {
    let w = rw(fixture());
    // A clean cached copy: taking it over would keep it on the cache disk for good (a
    // local copy is never evicted), even for a writer that only reads.
    read_all(&w, CKPT).unwrap();
    w.fs.cache().settle();
    let ino = path(&w, CKPT).unwrap().ino;
    let fh = w.fs.open(ino, true, false).unwrap();
    assert!(w.fs.in_place_file(fh, 0).is_none(), "a clean copy");
    // Once written here, the file has a local copy, which the kernel may write itself.
    w.fs.write(fh, 0, b"NEW").unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    let fh = w.fs.open(ino, true, false).unwrap();
    assert!(
        w.fs.in_place_file(fh, 10_001).is_none(),
        "under the minimum"
    );
    let backing = w.fs.in_place_file(fh, 10_000).expect("a local copy");
    w.fs.write_in_place(fh, &backing).unwrap();
    backing.write_all_at(b"OLD", 0).unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(&w.store.inner().data(CKPT).unwrap()[..3], b"OLD");
}

#[test]
fn a_new_file_written_in_place_and_cut_short_by_a_crash_is_uploaded_whole_by_the_next_mount() {
    use crate::write_tests::ME;
    use simfs::index::ROOT_INO;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let n = crash_after(|w| {
        // A read-write create, as `fuse.rs` answers it in passthrough: the index holds an
        // empty file, and only the copy knows what the kernel wrote.
        let (_, fh) =
            w.fs.create(ROOT_INO, std::ffi::OsStr::new("new.db"), 0o644, ME)
                .unwrap();
        let backing = w.fs.in_place_file(fh, 0).expect("a new file's local copy");
        w.fs.write_in_place(fh, &backing).unwrap();
        backing.write_all_at(&body, 0).unwrap();
    });
    assert_eq!(read_all(&n, "new.db").unwrap(), body);
    assert_eq!(path(&n, "new.db").unwrap().size, 100_000);
}

/// A small file written in place by a read-write create (git's `.idx` and `.rev`, pip's
/// RECORD): its handle and the file the kernel writes.
fn created_in_place(w: &World, name: &str) -> (u64, u64, File) {
    use crate::write_tests::ME;
    use simfs::index::ROOT_INO;
    let (a, fh) =
        w.fs.create(ROOT_INO, std::ffi::OsStr::new(name), 0o644, ME)
            .unwrap();
    let backing = w.fs.in_place_file(fh, 0).expect("a new file's local copy");
    w.fs.write_in_place(fh, &backing).unwrap();
    (a.ino, fh, backing)
}

#[test]
fn a_file_written_in_place_fsynced_closed_and_renamed_sends_its_bytes_once_in_one_put_or_in_blocks()
{
    let w = rw(fixture());
    let c = &w.store.counters;
    let sent = || c.put_bytes.load(Ordering::SeqCst);
    // One PUT's worth, and a file committed in blocks (this world's single PUT is 64 KiB).
    for (tmp, done, rewrite, len) in [
        ("tmp_idx", "pack.idx", false, 50_000),
        ("tmp_rev", "pack.rev", true, 50_000),
        ("tmp_pack", "pack.pack", false, 150_000),
        ("tmp_pack2", "pack2.pack", true, 150_000),
    ] {
        let body: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
        let before = (sent(), c.copy.load(Ordering::SeqCst));
        let (ino, fh, backing) = created_in_place(&w, tmp);
        backing.write_all_at(&body, 0).unwrap();
        w.fs.fsync(ino).unwrap();
        assert_eq!(sent() - before.0, len, "{tmp}: the fsync sends the file");
        if rewrite {
            // A write after the fsync, the length unchanged: it goes up.
            backing.write_all_at(b"X", 7).unwrap();
        }
        w.fs.flush(fh).unwrap();
        w.fs.release(fh).unwrap();
        crate::write_tests::rename_in_root(&w, tmp, done);
        crate::write_tests::drain(&w);
        let mut want = body.clone();
        if rewrite {
            want[7] = b'X';
        }
        assert_eq!(w.store.inner().data(done).unwrap(), want, "{done}");
        assert!(w.store.inner().data(tmp).is_none(), "{tmp} is gone");
        if rewrite {
            assert!(
                sent() - before.0 >= 2 * len,
                "{tmp}: the rewritten file went up again"
            );
        } else {
            assert_eq!(sent() - before.0, len, "{tmp}: its bytes went up once");
            assert_eq!(
                c.copy.load(Ordering::SeqCst) - before.1,
                1,
                "copied to {done}"
            );
        }
    }
}

/// rsync, and programs that copy with Python's `os.utime`, set a file's times right after
/// closing it. The kernel sends the release of the writer's handle after close has
/// returned, so it can reach simfs while that setattr is under way, on another thread: the
/// release's last look at the copy must never put the time of the write back over the time
/// just set.
#[test]
fn a_time_set_right_after_close_is_kept_against_the_release_racing_it() {
    use simfs::posix::{AttrChanges, SetTime};
    use std::time::{Duration, SystemTime};
    let w = rw(fixture());
    for i in 0..200u64 {
        let name = format!("copied-{i}");
        let (ino, fh, backing) = created_in_place(&w, &name);
        backing.write_all_at(b"copied bytes", 0).unwrap();
        w.fs.flush(fh).unwrap();
        let set = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000 + i);
        let times = AttrChanges {
            mtime: Some(SetTime::At(set)),
            ..Default::default()
        };
        let start = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                start.wait();
                w.fs.release(fh).unwrap();
            });
            s.spawn(|| {
                start.wait();
                w.fs.setattr(ino, &times).unwrap();
            });
        });
        assert_eq!(w.fs.getattr(ino).unwrap().mtime, set, "{name}");
    }
}
