//! Unit tests of the write path: every change is checked in the container and, where it
//! matters, through a "fresh node" (a new index built from the container alone).

use crate::world::{fixture, path, read_all, world_on, Held, World};
use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use simfs::fs::write::Caller;
use simfs::fs::*;
use simfs::index::ROOT_INO;
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(crate) const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};

pub(crate) fn rw(mem: MemoryStore) -> World {
    let store = Arc::new(FaultyStore::new(mem));
    world_on(
        store,
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        Some(Duration::ZERO),
    )
}

/// A second node with an empty cache over the same container.
pub(crate) fn fresh(w: &World) -> World {
    world_on(
        w.store.clone(),
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        None,
    )
}

fn dir_of(w: &World, p: &str) -> u64 {
    path(w, p).unwrap().ino
}

pub(crate) fn write_file(w: &World, parent: &str, name: &str, data: &[u8]) -> Attr {
    let (a, fh) =
        w.fs.create(dir_of(w, parent), OsStr::new(name), 0o640, ME)
            .unwrap();
    assert_eq!(w.fs.write(fh, 0, data).unwrap(), data.len() as u32);
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    a
}

/// Renames `from` to `to` in the root, replacing what is there.
pub(crate) fn rename_in_root(w: &World, from: &str, to: &str) {
    w.fs.rename(
        ROOT_INO,
        OsStr::new(from),
        ROOT_INO,
        OsStr::new(to),
        RenameMode::Replace,
    )
    .unwrap()
}

pub(crate) fn drain(w: &World) {
    assert_eq!(w.wb().drain(true, |_| {}).unwrap(), 0, "everything uploads");
}

fn errno(r: FsResult<impl std::fmt::Debug>) -> i32 {
    r.unwrap_err().errno()
}

#[test]
fn close_uploads_a_new_file_with_its_attributes_and_a_fresh_node_sees_it() {
    let w = rw(fixture());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    write_file(&w, "ckpt", "step-200.pt", &data);
    assert_eq!(
        w.store.inner().data("ckpt/step-200.pt").unwrap(),
        data,
        "close committed the data (in staged blocks: it is larger than one PUT)"
    );
    let n = fresh(&w);
    let a = path(&n, "ckpt/step-200.pt").unwrap();
    assert_eq!((a.perm, a.uid, a.gid, a.size), (0o640, 1000, 1000, 200_000));
    assert_eq!(a.mtime, path(&w, "ckpt/step-200.pt").unwrap().mtime);
    assert_eq!(read_all(&n, "ckpt/step-200.pt").unwrap(), data);
}

#[test]
fn modes_owners_times_dirs_and_symlinks_persist_for_a_fresh_node() {
    let w = rw(fixture());
    let d = w.fs.mkdir(ROOT_INO, OsStr::new("out"), 0o2750, ME).unwrap();
    let sub = w.fs.mkdir(d.ino, OsStr::new("sub"), 0o700, ME).unwrap();
    assert_eq!(
        sub.perm, 0o2700,
        "a setgid directory passes its bit to new subdirectories"
    );
    w.fs.symlink(d.ino, OsStr::new("link"), b"../venv/bin/python", ME)
        .unwrap();
    let f = write_file(&w, "out", "x.sh", b"echo");
    let t = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123);
    let set = AttrChanges {
        perm: Some(0o4755),
        uid: Some(0),
        gid: Some(42),
        mtime: Some(SetTime::At(t)),
        ..Default::default()
    };
    w.fs.setattr(f.ino, &set).unwrap();
    drain(&w);
    let n = fresh(&w);
    let a = path(&n, "out/x.sh").unwrap();
    assert_eq!((a.perm, a.uid, a.gid, a.mtime), (0o4755, 0, 42, t));
    assert_eq!(path(&n, "out").unwrap().perm, 0o2750);
    assert_eq!(path(&n, "out/sub").unwrap().kind, Kind::Dir);
    let l = path(&n, "out/link").unwrap();
    assert_eq!(n.fs.readlink(l.ino).unwrap(), b"../venv/bin/python");
    assert_eq!(path(&n, "out").unwrap().nlink, 3);
}

#[test]
fn hard_links_survive_a_fresh_node_and_any_name_can_go() {
    let w = rw(fixture());
    let f = write_file(&w, "", "data.bin", b"shared bytes");
    let venv = dir_of(&w, "venv");
    w.fs.link(f.ino, venv, OsStr::new("a")).unwrap();
    let a = w.fs.link(f.ino, ROOT_INO, OsStr::new("b")).unwrap();
    assert_eq!(a.nlink, 3);
    drain(&w);
    let n = fresh(&w);
    let (x, y, z) = (
        path(&n, "data.bin").unwrap(),
        path(&n, "venv/a").unwrap(),
        path(&n, "b").unwrap(),
    );
    assert_eq!((x.ino, x.nlink), (y.ino, 3));
    assert_eq!(y.ino, z.ino);
    assert_eq!(read_all(&n, "venv/a").unwrap(), b"shared bytes");
    // The name holding the data goes first: the others keep it.
    w.fs.unlink(ROOT_INO, OsStr::new("data.bin")).unwrap();
    drain(&w);
    let n = fresh(&w);
    assert_eq!(path(&n, "b").unwrap().nlink, 2);
    assert_eq!(read_all(&n, "venv/a").unwrap(), b"shared bytes");
    assert_eq!(read_all(&n, "b").unwrap(), b"shared bytes");
    w.fs.unlink(venv, OsStr::new("a")).unwrap();
    drain(&w);
    let n = fresh(&w);
    assert_eq!(path(&n, "b").unwrap().nlink, 1);
    assert_eq!(read_all(&n, "b").unwrap(), b"shared bytes");
    assert!(path(&n, "venv/a").is_err());
    assert!(!w
        .store
        .inner()
        .names()
        .iter()
        .any(|b| b.starts_with("data.bin")));
}

/// Gives `ino` the names `STEM-00` to `STEM-{n - 1}` in the root.
fn link_in_root(w: &World, ino: u64, stem: &str, n: usize) {
    for i in 0..n {
        w.fs.link(ino, ROOT_INO, OsStr::new(&format!("{stem}-{i:02}")))
            .unwrap();
    }
}

#[test]
fn a_file_with_many_hard_links_writes_its_stubs_side_by_side() {
    let w = rw(fixture());
    let f = write_file(&w, "", "many.bin", b"linked many times");
    link_in_root(&w, f.ino, "link", 40);
    w.store.set_latency(Duration::from_millis(2));
    w.store.counters.most_at_once.store(0, Ordering::SeqCst);
    drain(&w);
    let at_once = w.store.counters.most_at_once.load(Ordering::SeqCst);
    assert!(
        (2..=16).contains(&at_once),
        "40 stubs of one file went out {at_once} at a time"
    );
    w.store.set_latency(Duration::ZERO);
    let n = fresh(&w);
    assert_eq!(path(&n, "link-39").unwrap().nlink, 41);
    for i in [0, 17, 39] {
        assert_eq!(
            read_all(&n, &format!("link-{i:02}")).unwrap(),
            b"linked many times"
        );
    }
}

#[test]
fn names_removed_while_their_file_uploads_get_no_stub() {
    let w = rw(fixture());
    let f = write_file(&w, "", "held.bin", b"linked, then mostly unlinked");
    link_in_root(&w, f.ino, "held", 40);
    let puts = w.store.counters.put.load(Ordering::SeqCst);
    // The upload has read the file's 41 names and waits for its first request.
    std::thread::scope(|s| {
        let held = Held::new(&w.store);
        let upload = s.spawn(|| w.fs.fsync(f.ino));
        held.wait_for_request(&upload);
        for i in 10..40 {
            w.fs.unlink(ROOT_INO, OsStr::new(&format!("held-{i:02}")))
                .unwrap();
        }
        drop(held);
        upload.join().unwrap().unwrap();
    });
    let stubs = w.store.counters.put.load(Ordering::SeqCst) - puts;
    assert_eq!(stubs, 10, "stubs written for 10 names left of 40");
    let heads = w.store.counters.head.load(Ordering::SeqCst);
    drain(&w);
    let heads = w.store.counters.head.load(Ordering::SeqCst) - heads;
    assert_eq!(
        heads, 0,
        "the names skipped were never written: nothing to look up"
    );
    let n = fresh(&w);
    assert_eq!(path(&n, "held.bin").unwrap().nlink, 11);
    assert!(path(&n, "held-25").is_err());
    assert_eq!(
        read_all(&n, "held-09").unwrap(),
        b"linked, then mostly unlinked"
    );
}

#[test]
fn renaming_a_directory_moves_every_blob_once() {
    let w = rw(fixture());
    let before = read_all(&w, "venv/bin/python3.11").unwrap();
    w.fs.rename(
        ROOT_INO,
        OsStr::new("venv"),
        ROOT_INO,
        OsStr::new("env2"),
        RenameMode::Replace,
    )
    .unwrap();
    // The mount sees the new tree at once.
    assert_eq!(read_all(&w, "env2/bin/python3.11").unwrap(), before);
    drain(&w);
    let names = w.store.inner().names();
    assert!(!names.iter().any(|b| b.starts_with("venv")), "{names:?}");
    for b in [
        "env2",
        "env2/bin/python3.11",
        "env2/bin/python",
        "env2/lib/site.py",
    ] {
        assert!(names.contains(&b.to_string()), "{b} in {names:?}");
    }
    let n = fresh(&w);
    let l = path(&n, "env2/bin/python").unwrap();
    assert_eq!(n.fs.readlink(l.ino).unwrap(), b"python3.11");
    assert_eq!(path(&n, "env2").unwrap().perm, 0o750);
}

#[test]
fn renames_that_swap_two_files_lose_nothing() {
    let w = rw(MemoryStore::new());
    write_file(&w, "", "a", b"AAA");
    write_file(&w, "", "b", b"BBB");
    rename_in_root(&w, "a", "tmp");
    rename_in_root(&w, "b", "a");
    rename_in_root(&w, "tmp", "b");
    drain(&w);
    let m = w.store.inner();
    assert_eq!(m.data("a").unwrap(), "BBB");
    assert_eq!(m.data("b").unwrap(), "AAA");
    assert_eq!(m.names(), vec!["a".to_string(), "b".to_string()]);
    // And with RENAME_EXCHANGE, which the index does in one step.
    w.fs.rename(
        ROOT_INO,
        OsStr::new("a"),
        ROOT_INO,
        OsStr::new("b"),
        RenameMode::Exchange,
    )
    .unwrap();
    drain(&w);
    assert_eq!(m.data("a").unwrap(), "AAA");
    assert_eq!(m.data("b").unwrap(), "BBB");
}

#[test]
fn rename_over_an_existing_file_replaces_it() {
    let w = rw(MemoryStore::new());
    write_file(&w, "", "old", b"old");
    write_file(&w, "", "new.tmp", b"new");
    w.fs.rename(
        ROOT_INO,
        OsStr::new("new.tmp"),
        ROOT_INO,
        OsStr::new("old"),
        RenameMode::Replace,
    )
    .unwrap();
    drain(&w);
    assert_eq!(w.store.inner().names(), vec!["old".to_string()]);
    assert_eq!(w.store.inner().data("old").unwrap(), "new");
}

#[test]
fn posix_errors_match_a_local_filesystem() {
    let w = rw(fixture());
    let venv = dir_of(&w, "venv");
    let e = |s: &str| OsStr::new(s).to_owned();
    assert_eq!(errno(w.fs.rmdir(ROOT_INO, &e("venv"))), libc::ENOTEMPTY);
    assert_eq!(
        errno(w.fs.mkdir(ROOT_INO, &e("venv"), 0o755, ME)),
        libc::EEXIST
    );
    assert_eq!(errno(w.fs.unlink(ROOT_INO, &e("venv"))), libc::EISDIR);
    assert_eq!(errno(w.fs.rmdir(venv, &e("bin/python"))), libc::ENOENT);
    let bin = dir_of(&w, "venv/bin");
    assert_eq!(errno(w.fs.rmdir(bin, &e("python"))), libc::ENOTDIR);
    assert_eq!(errno(w.fs.unlink(ROOT_INO, &e("nope"))), libc::ENOENT);
    let mv = |p, n: &str, q, m: &str, mode| w.fs.rename(p, &e(n), q, &e(m), mode);
    assert_eq!(
        errno(mv(ROOT_INO, "venv", bin, "x", RenameMode::Replace)),
        libc::EINVAL
    );
    assert_eq!(
        errno(mv(ROOT_INO, "empty", bin, "python", RenameMode::Replace)),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(mv(bin, "python", ROOT_INO, "empty", RenameMode::Replace)),
        libc::EISDIR
    );
    assert_eq!(
        errno(mv(ROOT_INO, "empty", ROOT_INO, "venv", RenameMode::Replace)),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(mv(bin, "python", bin, "python3.11", RenameMode::NoReplace)),
        libc::EEXIST
    );
    assert_eq!(errno(w.fs.link(venv, ROOT_INO, &e("v2"))), libc::EPERM);
    let long = "x".repeat(256);
    assert_eq!(
        errno(w.fs.mkdir(ROOT_INO, &e(&long), 0o755, ME)),
        libc::ENAMETOOLONG
    );
    let whiteout = 0o160000 | 0o644;
    assert_eq!(
        errno(w.fs.mknod(ROOT_INO, &e("odd"), whiteout, 0, ME)),
        libc::EINVAL
    );
    // An empty directory can replace another one.
    w.fs.mkdir(ROOT_INO, &e("e2"), 0o755, ME).unwrap();
    mv(ROOT_INO, "e2", ROOT_INO, "empty", RenameMode::Replace).unwrap();
}

#[test]
fn special_files_and_access_times_are_kept() {
    let w = rw(MemoryStore::new());
    let e = |s: &str| OsStr::new(s).to_owned();
    w.fs.mknod(ROOT_INO, &e("pipe"), libc::S_IFIFO | 0o620, 0, ME)
        .unwrap();
    let dev =
        w.fs.mknod(ROOT_INO, &e("null"), libc::S_IFCHR | 0o666, 0x0103, ME)
            .unwrap();
    assert_eq!((dev.kind, dev.rdev), (Kind::CharDevice, 0x0103));
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let set = AttrChanges {
        atime: Some(SetTime::At(t)),
        ..Default::default()
    };
    assert_eq!(w.fs.setattr(dev.ino, &set).unwrap().atime, t);
    drain(&w);
    let n = fresh(&w);
    let p = path(&n, "pipe").unwrap();
    assert_eq!((p.kind, p.perm), (Kind::Fifo, 0o620));
    let d = path(&n, "null").unwrap();
    assert_eq!((d.kind, d.rdev), (Kind::CharDevice, 0x0103));
    assert_eq!(w.store.inner().data("pipe").unwrap().len(), 0);
}

#[test]
fn paths_longer_than_a_blob_name_round_trip_through_a_fresh_node() {
    let w = rw(MemoryStore::new());
    let seg = "d".repeat(250);
    let mut rel = String::new();
    let mut dir = ROOT_INO;
    for _ in 0..8 {
        dir = w.fs.mkdir(dir, OsStr::new(&seg), 0o755, ME).unwrap().ino;
        rel.push_str(&seg);
        rel.push('/');
    }
    let (_, fh) = w.fs.create(dir, OsStr::new("deep.txt"), 0o600, ME).unwrap();
    w.fs.write(fh, 0, b"2 KiB down").unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    drain(&w);
    assert!(w.store.inner().names().iter().all(|n| n.len() <= 1024));
    let n = fresh(&w);
    assert_eq!(
        read_all(&n, &format!("{rel}deep.txt")).unwrap(),
        b"2 KiB down"
    );
    assert_eq!(path(&n, &format!("{rel}deep.txt")).unwrap().perm, 0o600);
}

#[test]
fn link_counts_follow_directories_and_names() {
    let w = rw(fixture());
    let root_links = w.fs.getattr(ROOT_INO).unwrap().nlink;
    let d = w.fs.mkdir(ROOT_INO, OsStr::new("d"), 0o755, ME).unwrap();
    assert_eq!(d.nlink, 2);
    assert_eq!(w.fs.getattr(ROOT_INO).unwrap().nlink, root_links + 1);
    w.fs.mkdir(d.ino, OsStr::new("e"), 0o755, ME).unwrap();
    assert_eq!(w.fs.getattr(d.ino).unwrap().nlink, 3);
    let venv = dir_of(&w, "venv");
    let venv_links = w.fs.getattr(venv).unwrap().nlink;
    w.fs.rename(
        d.ino,
        OsStr::new("e"),
        venv,
        OsStr::new("e"),
        RenameMode::Replace,
    )
    .unwrap();
    assert_eq!(w.fs.getattr(d.ino).unwrap().nlink, 2);
    assert_eq!(w.fs.getattr(venv).unwrap().nlink, venv_links + 1);
    w.fs.rmdir(ROOT_INO, OsStr::new("d")).unwrap();
    assert_eq!(w.fs.getattr(ROOT_INO).unwrap().nlink, root_links);
}

#[test]
fn a_refused_upload_fails_close_with_eio_and_is_retried_later() {
    let w = rw(MemoryStore::new());
    w.store.refuse_writes(true);
    let (a, fh) =
        w.fs.create(ROOT_INO, OsStr::new("ckpt"), 0o644, ME)
            .unwrap();
    w.fs.write(fh, 0, b"weights").unwrap();
    assert_eq!(errno(w.fs.flush(fh)), libc::EIO);
    w.fs.release(fh).unwrap();
    let (pending, failing) = w.wb().pending().unwrap();
    assert_eq!(pending, 1);
    assert_eq!(failing[0].ino, a.ino);
    assert!(w.store.inner().names().is_empty());
    // The data stays readable locally meanwhile.
    assert_eq!(read_all(&w, "ckpt").unwrap(), b"weights");
    w.store.refuse_writes(false);
    drain(&w);
    assert_eq!(w.store.inner().data("ckpt").unwrap(), "weights");
}

#[test]
fn a_blob_changed_by_someone_else_is_kept_and_ours_is_saved_beside_it() {
    let w = rw(MemoryStore::new());
    let a = write_file(&w, "", "f", b"v1");
    w.store.inner().put("f", "theirs", &[]);
    let fh = w.fs.open(a.ino, true, false).unwrap();
    w.fs.write(fh, 0, b"ours").unwrap();
    assert_eq!(errno(w.fs.flush(fh)), libc::EIO);
    w.fs.release(fh).unwrap();
    drain(&w);
    let m = w.store.inner();
    assert_eq!(m.data("f").unwrap(), "theirs");
    let kept: Vec<String> = m
        .names()
        .into_iter()
        .filter(|n| n.starts_with("f.conflict-"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}", m.names());
    assert_eq!(m.data(&kept[0]).unwrap(), "ours");
}

#[test]
fn an_unlinked_open_file_stays_readable_until_closed() {
    let w = rw(MemoryStore::new());
    let a = write_file(&w, "", "tmpfile", b"still here");
    let fh = w.fs.open(a.ino, false, false).unwrap();
    w.fs.unlink(ROOT_INO, OsStr::new("tmpfile")).unwrap();
    drain(&w);
    assert!(w.store.inner().names().is_empty(), "the blob goes at once");
    assert_eq!(w.fs.read(fh, 0, 100).unwrap(), b"still here");
    assert_eq!(w.fs.getattr(a.ino).unwrap().nlink, 0);
    w.fs.release(fh).unwrap();
    assert_eq!(errno(w.fs.getattr(a.ino)), libc::ENOENT);
}

#[test]
fn pending_changes_survive_a_crash_and_the_next_mount_uploads_them() {
    let store = Arc::new(FaultyStore::new(fixture()));
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().to_path_buf();
    let w = world_on(
        store.clone(),
        dir,
        "",
        1 << 20,
        Some(Duration::from_secs(3600)),
    );
    let d =
        w.fs.mkdir(ROOT_INO, OsStr::new("later"), 0o700, ME)
            .unwrap();
    let (_, fh) = w.fs.create(d.ino, OsStr::new("f"), 0o600, ME).unwrap();
    w.fs.write(fh, 0, b"not uploaded").unwrap();
    let venv = dir_of(&w, "venv");
    w.fs.setattr(
        venv,
        &AttrChanges {
            perm: Some(0o711),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        store.counters.writes(),
        0,
        "nothing uploaded yet (the delay is an hour)"
    );
    // "kill -9": the filesystem goes away without draining or closing.
    std::mem::forget(w);
    let dir = tempfile::TempDir::new().unwrap();
    copy_dir(&keep, dir.path());
    let again = world_on(
        store.clone(),
        dir,
        "",
        1 << 20,
        Some(Duration::from_secs(3600)),
    );
    assert!(again.wb().pending().unwrap().0 >= 3);
    drain(&again);
    let n = fresh(&again);
    assert_eq!(read_all(&n, "later/f").unwrap(), b"not uploaded");
    assert_eq!(path(&n, "venv").unwrap().perm, 0o711);
    assert_eq!(path(&n, "later").unwrap().perm, 0o700);
}

#[test]
fn a_directory_rename_interrupted_at_every_step_resumes_without_loss_or_duplicates() {
    // The rename of venv/ (a marker, two files, a symlink) takes 8 writes; cut it after each.
    for cut in 0..8 {
        let store = Arc::new(FaultyStore::new(fixture()));
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().to_path_buf();
        let w = world_on(store.clone(), dir, "", 1 << 20, Some(Duration::ZERO));
        let python = read_all(&w, "venv/bin/python3.11").unwrap();
        let (v, e) = (OsStr::new("venv"), OsStr::new("env2"));
        w.fs.rename(ROOT_INO, v, ROOT_INO, e, RenameMode::Replace)
            .unwrap();
        store.writes_left(cut);
        let _ = w.wb().drain(true, |_| {});
        std::mem::forget(w); // the crash
        store.writes_left(u64::MAX);
        let dir = tempfile::TempDir::new().unwrap();
        copy_dir(&keep, dir.path());
        let again = world_on(store.clone(), dir, "", 1 << 20, Some(Duration::ZERO));
        drain(&again);
        let names = store.inner().names();
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("venv") || n.contains(".simfs-moving")),
            "cut after {cut}: {names:?}"
        );
        let n = fresh(&again);
        assert_eq!(
            read_all(&n, "env2/bin/python3.11").unwrap(),
            python,
            "cut after {cut}"
        );
        assert_eq!(read_all(&n, "env2/lib/site.py").unwrap(), b"print('hi')");
        let l = path(&n, "env2/bin/python").unwrap();
        assert_eq!(n.fs.readlink(l.ino).unwrap(), b"python3.11");
        assert_eq!(path(&n, "env2").unwrap().perm, 0o750);
    }
}

/// Copies the cache directory `from` into `to` as a crash leaves it on its disk: with the
/// extended attributes that mark copies written in place (`cp -a` keeps them).
pub(crate) fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {from:?} {to:?}: {status}");
}

#[test]
fn a_burst_of_attribute_changes_costs_one_request() {
    let w = world_on(
        Arc::new(FaultyStore::new(fixture())),
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        Some(Duration::from_secs(3600)),
    );
    // cp -a: create, write, chown, chmod, utimens, close; then the directory's attributes.
    let d = w.fs.mkdir(ROOT_INO, OsStr::new("copy"), 0o755, ME).unwrap();
    for i in 0..20 {
        let (a, fh) =
            w.fs.create(d.ino, OsStr::new(&format!("f{i}")), 0o600, ME)
                .unwrap();
        w.fs.write(fh, 0, b"x").unwrap();
        let set = AttrChanges {
            perm: Some(0o644),
            uid: Some(1),
            gid: Some(2),
            mtime: Some(SetTime::Now),
            ..Default::default()
        };
        w.fs.setattr(a.ino, &set).unwrap();
        w.fs.flush(fh).unwrap();
        w.fs.release(fh).unwrap();
    }
    for m in [0o700, 0o750, 0o755] {
        w.fs.setattr(
            d.ino,
            &AttrChanges {
                perm: Some(m),
                ..Default::default()
            },
        )
        .unwrap();
    }
    drain(&w);
    // One PUT per file (data and attributes together) and one for the directory marker.
    assert_eq!(w.store.counters.writes(), 21);
    let n = fresh(&w);
    assert_eq!(path(&n, "copy/f7").unwrap().perm, 0o644);
    assert_eq!(path(&n, "copy").unwrap().perm, 0o755);
}

#[test]
fn truncating_to_zero_needs_no_download() {
    let w = rw(fixture());
    let a = path(&w, "ckpt/step-100.pt").unwrap();
    let gets = w
        .store
        .counters
        .get
        .load(std::sync::atomic::Ordering::SeqCst);
    w.fs.setattr(
        a.ino,
        &AttrChanges {
            size: Some(0),
            ..Default::default()
        },
    )
    .unwrap();
    let fh = w.fs.open(a.ino, true, false).unwrap();
    w.fs.write(fh, 0, b"new").unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(
        w.store
            .counters
            .get
            .load(std::sync::atomic::Ordering::SeqCst),
        gets
    );
    assert_eq!(w.store.inner().data("ckpt/step-100.pt").unwrap(), "new");
    assert_eq!(w.fs.getattr(a.ino).unwrap().size, 3);
}

#[test]
fn writing_into_the_middle_of_a_container_file_keeps_the_rest() {
    let w = rw(fixture());
    let a = path(&w, "ckpt/step-100.pt").unwrap();
    let reader = w.fs.open(a.ino, false, false).unwrap();
    let fh = w.fs.open(a.ino, true, false).unwrap();
    w.fs.write(fh, 9_998, b"abcd").unwrap();
    // A reader opened before the writer sees the write, as on a local disk.
    assert_eq!(w.fs.read(reader, 9_998, 10).unwrap(), b"abcd");
    w.fs.fsync(a.ino).unwrap();
    let data = w.store.inner().data("ckpt/step-100.pt").unwrap();
    assert_eq!(data.len(), 10_002);
    assert!(data[..9_998].iter().all(|&b| b == 7));
    w.fs.release(fh).unwrap();
    w.fs.release(reader).unwrap();
}

#[test]
fn the_read_only_mount_refuses_every_change() {
    let w = crate::world::world_on(
        Arc::new(FaultyStore::new(fixture())),
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        None,
    );
    assert_eq!(
        errno(w.fs.mkdir(ROOT_INO, OsStr::new("x"), 0o755, ME)),
        libc::EROFS
    );
    assert_eq!(
        errno(w.fs.unlink(ROOT_INO, OsStr::new("bad-meta"))),
        libc::EROFS
    );
}

#[test]
fn the_background_leaves_a_file_being_written_to_its_close() {
    let w = rw(MemoryStore::new());
    let (_, fh) =
        w.fs.create(ROOT_INO, OsStr::new("growing"), 0o644, ME)
            .unwrap();
    w.fs.write(fh, 0, b"part one").unwrap();
    w.wb().upload_due(false).unwrap();
    assert!(
        w.store.inner().names().is_empty(),
        "no upload while being written"
    );
    w.fs.write(fh, 8, b", part two").unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(
        w.store.inner().data("growing").unwrap(),
        "part one, part two"
    );
    assert_eq!(
        w.store
            .counters
            .put
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn a_rotation_of_many_names_uploaded_in_parallel_loses_nothing() {
    let w = rw(MemoryStore::new());
    let n = 24;
    for i in 0..n {
        write_file(&w, "", &format!("f{i}"), format!("content {i}").as_bytes());
    }
    let mv = |a: &str, b: &str| rename_in_root(&w, a, b);
    // f0 → tmp, f1 → f0, ..., tmp → f(n-1): every name now holds its neighbour's data.
    mv("f0", "tmp");
    for i in 1..n {
        mv(&format!("f{i}"), &format!("f{}", i - 1));
    }
    mv("tmp", &format!("f{}", n - 1));
    drain(&w);
    let m = w.store.inner();
    assert_eq!(m.names().len(), n, "{:?}", m.names());
    for i in 0..n {
        let want = format!("content {}", (i + 1) % n);
        assert_eq!(m.data(&format!("f{i}")).unwrap(), want);
    }
}

/// No name in the container marks a conflict.
pub(crate) fn no_conflicts(w: &World) {
    let names = w.store.inner().names();
    assert!(
        !names.iter().any(|n| n.contains(".conflict-")),
        "a mount conflicted with itself: {names:?}"
    );
}

#[test]
fn a_lost_answer_to_any_write_converges_on_retry_without_a_conflict() {
    let w = rw(MemoryStore::new());
    // A new small file (one PUT), answer lost: close fails, the retry finds its own blob.
    w.store.lose_answers(1);
    let (a, fh) =
        w.fs.create(ROOT_INO, OsStr::new("small"), 0o644, ME)
            .unwrap();
    w.fs.write(fh, 0, b"small data").unwrap();
    assert_eq!(errno(w.fs.flush(fh)), libc::EIO);
    w.fs.release(fh).unwrap();
    drain(&w);
    assert_eq!(w.store.inner().data("small").unwrap(), &b"small data"[..]);
    assert_eq!(path(&w, "small").unwrap().ino, a.ino);
    // A large file (staged blocks and a commit), every answer lost.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    w.store.lose_answers(20);
    let (_, fh) = w.fs.create(ROOT_INO, OsStr::new("big"), 0o644, ME).unwrap();
    w.fs.write(fh, 0, &big).unwrap();
    assert_eq!(errno(w.fs.flush(fh)), libc::EIO);
    w.fs.release(fh).unwrap();
    w.store.lose_answers(0);
    drain(&w);
    assert_eq!(w.store.inner().data("big").unwrap(), &big[..]);
    // A rename (a server-side copy), a chmod (new metadata) and a new directory (a marker).
    for change in 0..3 {
        w.store.lose_answers(1);
        match change {
            0 => {
                w.fs.rename(
                    ROOT_INO,
                    OsStr::new("small"),
                    ROOT_INO,
                    OsStr::new("moved"),
                    RenameMode::Replace,
                )
                .unwrap()
            }
            1 => {
                let ino = path(&w, "big").unwrap().ino;
                let chmod = AttrChanges {
                    perm: Some(0o600),
                    ..Default::default()
                };
                w.fs.setattr(ino, &chmod).unwrap();
            }
            _ => {
                w.fs.mkdir(ROOT_INO, OsStr::new("dir"), 0o700, ME).unwrap();
            }
        }
        let _ = w.wb().drain(true, |_| {});
        drain(&w);
    }
    no_conflicts(&w);
    let n = fresh(&w);
    assert_eq!(read_all(&n, "moved").unwrap(), b"small data");
    assert!(path(&n, "small").is_err());
    assert_eq!(path(&n, "big").unwrap().perm, 0o600);
    assert_eq!(read_all(&n, "big").unwrap(), big);
    assert_eq!(path(&n, "dir").unwrap().perm, 0o700);
}

/// A name in the trash (its file was renamed) is written again by a new file whose answer
/// is lost, and that file is renamed too before its next upload. The trash's delete then
/// finds a version that is not the one it trashed, yet it is this mount's: it must go, or
/// other nodes see a file that no longer exists (before, until this node mounted again).
#[test]
fn a_trashed_name_rewritten_by_a_lost_answer_goes_once_its_file_moves_on() {
    let w = rw(MemoryStore::new());
    let old = write_file(&w, "", "n", b"old");
    drain(&w);
    rename_in_root(&w, "n", "m");
    // Its copy to m, with n left in the trash.
    w.wb().upload(old.ino).unwrap();
    assert!(
        w.store.inner().data("n").is_some(),
        "n is still in the trash"
    );
    let (a, fh) = w.fs.create(ROOT_INO, OsStr::new("n"), 0o644, ME).unwrap();
    w.fs.write(fh, 0, b"new").unwrap();
    w.store.lose_answers(1);
    assert_eq!(errno(w.fs.fsync(a.ino)), libc::EIO);
    assert_eq!(w.store.inner().data("n").unwrap(), &b"new"[..]);
    rename_in_root(&w, "n", "q");
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    drain(&w);
    assert!(w.store.inner().data("n").is_none(), "n is gone");
    no_conflicts(&w);
    let f = fresh(&w);
    assert_eq!(read_all(&f, "m").unwrap(), b"old");
    assert_eq!(read_all(&f, "q").unwrap(), b"new");
    assert!(path(&f, "n").is_err());
}

/// `tmp` is written and fsynced, the service commits but the answer is lost, and the file
/// is renamed to `RECORD` and closed: the blob `tmp` is this mount's, and nothing claims it.
/// Returns the file's inode.
fn fsynced_lost_then_renamed(w: &World) -> u64 {
    let (a, fh) = w.fs.create(ROOT_INO, OsStr::new("tmp"), 0o644, ME).unwrap();
    w.fs.write(fh, 0, b"record").unwrap();
    w.store.lose_answers(1);
    assert_eq!(errno(w.fs.fsync(a.ino)), libc::EIO);
    rename_in_root(w, "tmp", "RECORD");
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    a.ino
}

/// The upload that follows a failed one settles the names the failed one may have written
/// and the file has since left: the blob is trashed then, not at the next drain or mount.
#[test]
fn the_upload_after_a_lost_answer_trashes_the_name_the_file_has_left() {
    let w = rw(MemoryStore::new());
    let ino = fsynced_lost_then_renamed(&w);
    w.wb().upload(ino).unwrap();
    let index = w.fs.index();
    assert_eq!(index.open_intents(None).unwrap(), vec![]);
    let trashed: Vec<String> = index.trash(10).unwrap().into_iter().map(|t| t.0).collect();
    assert_eq!(trashed, vec!["tmp".to_string()]);
    drain(&w);
    assert!(w.store.inner().data("tmp").is_none());
    assert_eq!(w.store.inner().data("RECORD").unwrap(), &b"record"[..]);
}

#[test]
fn a_barrier_returns_after_the_name_an_upload_in_flight_left_behind_is_deleted() {
    // The background's upload after a lost answer records its result first and settles the
    // name the file left afterwards (a HEAD, then the trash): a drain or `simfs sync` that
    // looked only at what is pending returned in between, and a fresh node listed a blob
    // that was deleted a moment later.
    type Barrier = fn(&World);
    let barriers: [(&str, Barrier); 2] = [
        ("drain", drain),
        ("sync", |w| {
            let out = w.wb().sync_paths(&[], &|_, _| {}).unwrap();
            assert!(out.failed.is_empty(), "{out:?}");
        }),
    ];
    for (what, barrier) in barriers {
        let w = crate::world::world_async(
            Arc::new(FaultyStore::new(MemoryStore::new())),
            tempfile::tempdir().unwrap(),
            Duration::ZERO,
        );
        let ino = fsynced_lost_then_renamed(&w);
        // Long enough that this thread sees the upload between its record and its end.
        w.store.set_latency(Duration::from_millis(500));
        let index = w.fs.index();
        std::thread::scope(|s| {
            let upload = s.spawn(|| w.wb().upload(ino));
            // Recorded: the upload is now settling the name it left, its HEAD under way.
            while index.pending_inode(ino).unwrap().is_some() {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                !upload.is_finished(),
                "{what}: the upload ended before this looked"
            );
            assert!(
                w.store.inner().data("tmp").is_some(),
                "the lost answer's blob"
            );
            barrier(&w);
            assert!(
                w.store.inner().data("tmp").is_none(),
                "{what} returned with the lost answer's blob still there"
            );
            upload.join().unwrap().unwrap();
        });
        assert_eq!(w.store.inner().data("RECORD").unwrap(), &b"record"[..]);
        assert_eq!(index.open_intents(None).unwrap(), vec![], "{what}");
    }
}

#[test]
fn a_lost_answer_to_a_rewrite_leaves_no_blob_once_the_file_moves_on() {
    // The file's blob is known; a rewrite's answer is lost (the service has the new version),
    // then the file is renamed or removed before its retry. The old name goes to the trash
    // under the version simfs knew, and the delete finds another version there: this
    // mount's own, which stayed for good.
    for removed in [false, true] {
        let w = rw(MemoryStore::new());
        let a = write_file(&w, "", "old", b"one");
        assert_eq!(w.store.inner().data("old").unwrap(), &b"one"[..]);
        let fh = w.fs.open(a.ino, true, false).unwrap();
        w.fs.write(fh, 0, b"two").unwrap();
        w.store.lose_answers(1);
        assert_eq!(errno(w.fs.fsync(a.ino)), libc::EIO);
        assert_eq!(w.store.inner().data("old").unwrap(), &b"two"[..]);
        match removed {
            false => rename_in_root(&w, "old", "new"),
            true => w.fs.unlink(ROOT_INO, OsStr::new("old")).unwrap(),
        }
        w.fs.flush(fh).unwrap();
        w.fs.release(fh).unwrap();
        drain(&w);
        let expected: &[&str] = if removed { &[] } else { &["new"] };
        assert_eq!(w.store.inner().names(), expected, "removed: {removed}");
        if !removed {
            assert_eq!(w.store.inner().data("new").unwrap(), &b"two"[..]);
        }
    }
}

#[test]
fn a_name_whose_trashed_version_is_gone_takes_a_new_file_without_a_conflict() {
    // The trash's delete of the old version was carried out but its answer was lost, so the
    // name stays in the trash; a file created there since expects that version, finds the
    // name empty, and is uploaded (it is not someone else's change).
    let w = rw(MemoryStore::new());
    let a = write_file(&w, "", "x", b"first");
    rename_in_root(&w, "x", "y");
    w.wb().upload(a.ino).unwrap();
    let index = w.fs.index();
    let trashed: Vec<String> = index.trash(10).unwrap().into_iter().map(|t| t.0).collect();
    assert_eq!(trashed, vec!["x".to_string()]);
    w.store.lose_answers(1);
    w.wb().upload_due(true).unwrap();
    assert!(
        w.store.inner().data("x").is_none(),
        "the delete was carried out"
    );
    assert_eq!(index.trash(10).unwrap().len(), 1, "its answer was lost");
    write_file(&w, "", "x", b"second");
    drain(&w);
    assert_eq!(w.store.inner().data("x").unwrap(), &b"second"[..]);
    assert_eq!(w.store.inner().data("y").unwrap(), &b"first"[..]);
    no_conflicts(&w);
}

#[test]
fn open_with_o_trunc_empties_the_file_without_downloading_it() {
    let w = rw(fixture());
    let gets = || {
        w.store
            .counters
            .get
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    for name in ["ckpt/step-100.pt", "venv/lib/site.py"] {
        let a = path(&w, name).unwrap();
        assert!(a.size > 0);
        let before = gets();
        let fh = w.fs.open(a.ino, true, true).unwrap();
        assert_eq!(gets(), before, "{name}: O_TRUNC downloaded the old data");
        assert_eq!(w.fs.getattr(a.ino).unwrap().size, 0);
        w.fs.write(fh, 0, b"fresh").unwrap();
        w.fs.flush(fh).unwrap();
        w.fs.release(fh).unwrap();
        assert_eq!(w.store.inner().data(name).unwrap(), "fresh");
    }
    // A file already local is truncated too.
    let a = path(&w, "venv/lib/site.py").unwrap();
    let fh = w.fs.open(a.ino, true, true).unwrap();
    assert_eq!(w.fs.getattr(a.ino).unwrap().size, 0);
    w.fs.release(fh).unwrap();
}

#[test]
fn close_waits_for_the_upload_only_when_data_changed_through_the_handle() {
    let store = Arc::new(FaultyStore::new(fixture()));
    let w = world_on(
        store,
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        Some(Duration::from_secs(3600)),
    );
    let root = ROOT_INO;
    // A lock file created, closed unwritten and removed (git's index.lock): no upload waits
    // at close, and the burst leaves nothing to upload.
    let (_, fh) =
        w.fs.create(root, OsStr::new("index.lock"), 0o644, ME)
            .unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(w.store.counters.put.load(Ordering::SeqCst), 0);
    assert!(w.store.inner().data("index.lock").is_none());
    w.fs.unlink(root, OsStr::new("index.lock")).unwrap();
    drain(&w);
    assert_eq!(w.store.counters.put.load(Ordering::SeqCst), 0);
    assert!(w.store.inner().data("index.lock").is_none());
    // Written through the handle: committed by the close.
    write_file(&w, "", "written", b"data");
    assert_eq!(w.store.inner().data("written").unwrap(), "data");
    // Truncated by the open (O_TRUNC) and by ftruncate: committed by the close too.
    let ino = path(&w, "written").unwrap().ino;
    let fh = w.fs.open(ino, true, true).unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(w.store.inner().data("written").unwrap().len(), 0);
    write_file(&w, "", "again", b"more data");
    let ino = path(&w, "again").unwrap().ino;
    let fh = w.fs.open(ino, true, false).unwrap();
    let cut = AttrChanges {
        size: Some(4),
        ..Default::default()
    };
    w.fs.setattr_via(Some(fh), ino, &cut).unwrap();
    w.fs.flush(fh).unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(w.store.inner().data("again").unwrap(), "more");
}

#[test]
fn a_first_write_that_landed_unrecorded_is_deleted_once_the_file_moved_on() {
    // The service commits `.tmp-1`, the answer is lost (as when the daemon is killed before
    // it records the result), and the file is renamed before any retry: the upload then
    // goes to `final`, and the blob at the old name, this mount's own, must not stay behind
    // for other nodes to see.
    let w = rw(MemoryStore::new());
    w.store.lose_answers(1);
    let (_, fh) =
        w.fs.create(ROOT_INO, OsStr::new(".tmp-1"), 0o644, ME)
            .unwrap();
    w.fs.write(fh, 0, b"payload").unwrap();
    assert_eq!(errno(w.fs.flush(fh)), libc::EIO);
    w.fs.release(fh).unwrap();
    assert!(w.store.inner().data(".tmp-1").is_some(), "the write landed");
    w.fs.rename(
        ROOT_INO,
        OsStr::new(".tmp-1"),
        ROOT_INO,
        OsStr::new("final"),
        RenameMode::Replace,
    )
    .unwrap();
    drain(&w);
    assert_eq!(w.store.inner().data("final").unwrap(), &b"payload"[..]);
    assert!(
        w.store.inner().data(".tmp-1").is_none(),
        "the unrecorded first write is gone: {:?}",
        w.store.inner().names()
    );
    // Someone else's blob at a name this mount once meant to write is left alone.
    w.store.lose_answers(1);
    let (_, fh) = w.fs.create(ROOT_INO, OsStr::new("t2"), 0o644, ME).unwrap();
    w.fs.write(fh, 0, b"mine").unwrap();
    assert_eq!(errno(w.fs.flush(fh)), libc::EIO);
    w.fs.release(fh).unwrap();
    w.store.inner().put("t2", "theirs", &[]);
    w.fs.rename(
        ROOT_INO,
        OsStr::new("t2"),
        ROOT_INO,
        OsStr::new("f2"),
        RenameMode::Replace,
    )
    .unwrap();
    drain(&w);
    assert_eq!(w.store.inner().data("t2").unwrap(), &b"theirs"[..]);
    assert_eq!(w.store.inner().data("f2").unwrap(), &b"mine"[..]);
}

#[test]
fn a_directory_renamed_while_its_child_uploads_leaves_nothing_at_the_old_path() {
    // `a/sub`'s marker is on its way when `a` becomes `b`: that upload lands at the old
    // path, and its result must not count as `sub` being up to date at its new one.
    let w = rw(MemoryStore::new());
    let a = w.fs.mkdir(ROOT_INO, OsStr::new("a"), 0o755, ME).unwrap();
    let sub = w.fs.mkdir(a.ino, OsStr::new("sub"), 0o755, ME).unwrap();
    write_file(&w, "a/sub", "f", b"data");
    w.store.set_latency(Duration::from_millis(300));
    let wb = w.wb().clone();
    let in_flight = std::thread::spawn(move || wb.upload(sub.ino));
    std::thread::sleep(Duration::from_millis(100));
    w.fs.rename(
        ROOT_INO,
        OsStr::new("a"),
        ROOT_INO,
        OsStr::new("b"),
        RenameMode::NoReplace,
    )
    .unwrap();
    in_flight.join().unwrap().unwrap();
    w.store.set_latency(Duration::ZERO);
    drain(&w);
    let names = w.store.inner().names();
    assert!(
        names.iter().all(|n| !n.starts_with("a/") && n != "a"),
        "nothing left under the old path: {names:?}"
    );
    let n = fresh(&w);
    assert_eq!(read_all(&n, "b/sub/f").unwrap(), b"data");
    assert!(path(&n, "a").is_err());
}

/// On ext4 the cache's folder asks for its folders (hydrated files, local copies) to be
/// placed away from the folder holding the cache, where the job's own files churn.
#[test]
fn the_cache_folder_spreads_its_folders_on_ext4() {
    let w = rw(fixture());
    let cache = w.state.join("cache");
    // SAFETY: statfs fills the zeroed struct it is given.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(cache.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    const EXT4: libc::c_long = 0xEF53;
    if st.f_type as libc::c_long != EXT4 {
        eprintln!("skipped: {} is not on ext4", cache.display());
        return;
    }
    assert_eq!(simfs::cache::spreads_children(&cache), Some(true));
    // A folder made before it, the state folder, is left as it was.
    assert_eq!(simfs::cache::spreads_children(&w.state), Some(false));
}
