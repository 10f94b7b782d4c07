//! Reading: the tree a container becomes, names, hydration and its verification, the cache's
//! bounds and eviction, listings.

use crate::world::*;
use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use simfs::fs::*;
use simfs::index::names::Name;
use simfs::index::Index;
use simfs::index::{SourceId, ROOT_INO};
use simfs::mount::MountConfig;
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[test]
fn tree_follows_the_blobfuse2_conventions() {
    let w = world_with(fixture(), "", 1 << 20);
    let venv = path(&w, "venv").unwrap();
    assert_eq!((venv.kind, venv.perm), (Kind::Dir, 0o750));
    let py = path(&w, "venv/bin/python").unwrap();
    assert_eq!(py.kind, Kind::Symlink);
    assert_eq!(w.fs.readlink(py.ino).unwrap(), b"python3.11");
    assert_eq!(py.size, 10);
    assert_eq!(path(&w, "venv/bin/python3.11").unwrap().perm, 0o755);
    let latest = path(&w, "ckpt/latest.pt").unwrap();
    assert_eq!(w.fs.readlink(latest.ino).unwrap(), b"step-100.pt");
    let step = path(&w, "ckpt/step-100.pt").unwrap();
    assert_eq!((step.size, step.perm, step.uid), (10_000, 0o644, 1000));
    let t = step.mtime.duration_since(std::time::UNIX_EPOCH).unwrap();
    assert_eq!((t.as_secs(), t.subsec_millis()), (1_704_164_645, 500));
    // The implicit directory takes the newest mtime below it.
    assert_eq!(path(&w, "ckpt").unwrap().mtime, step.mtime);
    assert_eq!(path(&w, "empty").unwrap().kind, Kind::Dir);
}

#[test]
fn odd_names_are_hidden_and_reported() {
    let w = world_with(fixture(), "", 1 << 20);
    assert_eq!(
        path(&w, "shadow").unwrap().kind,
        Kind::Dir,
        "the directory wins"
    );
    assert_eq!(read_all(&w, "shadow/inner").unwrap(), b"x");
    assert!(matches!(path(&w, "a"), Err(FsError::NotFound)));
    assert!(matches!(path(&w, "broken-link"), Err(FsError::NotFound)));
    let bad = path(&w, "bad-meta").unwrap();
    assert_eq!(
        (bad.perm, bad.uid),
        (0o644, 1000),
        "bad values fall back to defaults"
    );
    let findings = w.fs.index().findings().unwrap();
    let hidden: Vec<_> = findings
        .iter()
        .filter(|f| f.hidden)
        .map(|f| f.blob.as_str())
        .collect();
    for b in ["a//b", "dots/../x", "shadow", "broken-link"] {
        assert!(hidden.contains(&b), "{b} missing from {findings:?}");
    }
    assert!(findings
        .iter()
        .any(|f| !f.hidden && f.blob == "bad-meta" && f.reason.contains("permissions=rwx")));
}

#[test]
fn readdir_lists_dot_entries_then_names_in_order() {
    let w = world_with(fixture(), "", 1 << 20);
    let venv = path(&w, "venv").unwrap();
    let fh = w.fs.opendir(venv.ino).unwrap();
    let names: Vec<String> =
        w.fs.read_dir_all(fh)
            .unwrap()
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
    assert_eq!(names, [".", "..", "bin", "lib"]);
    assert_eq!(w.fs.read_dir_all(fh).unwrap()[1].attr.ino, ROOT_INO);
    w.fs.releasedir(fh);
    assert_eq!(w.fs.open_handles(), 0);
    assert_eq!(venv.nlink, 4, "2 + two subdirectories");
    let file = path(&w, "venv/lib/site.py").unwrap();
    assert!(matches!(w.fs.opendir(file.ino), Err(FsError::NotDir)));
    assert!(matches!(
        w.fs.lookup(file.ino, OsStr::new("x")),
        Err(FsError::NotDir)
    ));
}

#[test]
fn names_are_validated_before_the_index_is_asked() {
    let w = world_with(fixture(), "", 1 << 20);
    let long = "x".repeat(256);
    assert_eq!(
        w.fs.lookup(ROOT_INO, OsStr::new(&long))
            .unwrap_err()
            .errno(),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        w.fs.lookup(ROOT_INO, OsStr::new("nope"))
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
}

#[test]
fn metadata_path_makes_no_request_after_mount() {
    let w = world_with(fixture(), "", 1 << 20);
    let data = read_all(&w, "ckpt/step-100.pt").unwrap();
    assert_eq!(data, vec![7u8; 10_000]);
    let before = w.store.counters.total();
    // Walk the whole tree: lookup + getattr + readdir + readlink of everything.
    let mut stack = vec![ROOT_INO];
    let mut seen = 0;
    while let Some(ino) = stack.pop() {
        let fh = w.fs.opendir(ino).unwrap();
        for e in w.fs.read_dir_all(fh).unwrap().iter().skip(2) {
            let a =
                w.fs.lookup(ino, std::os::unix::ffi::OsStrExt::from_bytes(&e.name[..]))
                    .unwrap();
            assert_eq!(w.fs.getattr(a.ino).unwrap(), a);
            match a.kind {
                Kind::Dir => stack.push(a.ino),
                Kind::Symlink => {
                    w.fs.readlink(a.ino).unwrap();
                }
                _ => {}
            }
            seen += 1;
        }
        w.fs.releasedir(fh);
    }
    w.fs.statfs().unwrap();
    // Re-open of a cached file.
    assert_eq!(read_all(&w, "ckpt/step-100.pt").unwrap().len(), 10_000);
    assert!(seen >= 12);
    assert_eq!(w.store.counters.total(), before, "no request after mount");
}

#[test]
fn large_blobs_hydrate_in_parallel_ranges_and_verify() {
    let mem = MemoryStore::new();
    let big: Vec<u8> = (0..1_000_003u32).map(|i| (i * 31 % 251) as u8).collect();
    mem.put("big.bin", big.clone(), &[]);
    let w = world_with(mem, "", 64 * 1024);
    let gets = w.store.counters.get.load(Ordering::SeqCst);
    let a = path(&w, "big.bin").unwrap();
    let fh = w.fs.open(a.ino, false, false).unwrap();
    let mid = w.fs.read(fh, 500_000, 1000).unwrap();
    assert_eq!(mid, &big[500_000..501_000]);
    let tail = w.fs.read(fh, 1_000_000, 4096).unwrap();
    assert_eq!(tail, &big[1_000_000..]);
    w.fs.release(fh).unwrap();
    w.fs.cache().settle();
    assert_eq!(
        w.store.counters.get.load(Ordering::SeqCst) - gets,
        16,
        "ceil(1_000_003 / 64 KiB), each range fetched once"
    );
    assert!(w
        .fs
        .cache()
        .is_hydrated(&w.fs.index().blob_of(a.ino).unwrap().unwrap()));
}

#[test]
fn concurrent_opens_download_once() {
    let mem = MemoryStore::new();
    mem.put("shared.bin", vec![1u8; 300_000], &[]);
    let w = world_with(mem, "", 1 << 20);
    let ino = path(&w, "shared.bin").unwrap().ino;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let fs = w.fs.clone();
            std::thread::spawn(move || {
                let fh = fs.open(ino, false, false).unwrap();
                let n = fs.read(fh, 0, 400_000).unwrap().len();
                fs.release(fh).unwrap();
                n
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 300_000);
    }
    assert_eq!(w.fs.cache().downloads.load(Ordering::SeqCst), 1);
}

#[test]
fn content_md5_mismatch_fails_the_read_and_caches_nothing() {
    let mem = MemoryStore::new();
    mem.put("f", "payload", &[]);
    mem.set_content_md5("f", Some(vec![0u8; 16]));
    let w = world_with(mem, "", 1 << 20);
    let ino = path(&w, "f").unwrap().ino;
    // open returns before the data is fetched; the read is what fails.
    let fh = w.fs.open(ino, false, false).unwrap();
    let err = w.fs.read(fh, 0, 100).unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("Content-MD5"), "{err}");
    w.fs.release(fh).unwrap();
    w.fs.cache().settle();
    assert_eq!(
        std::fs::read_dir(w.state.join("cache/data"))
            .unwrap()
            .count(),
        0
    );
    // The next open tries again rather than serving a bad copy.
    assert!(read_all(&w, "f").is_err());
    assert_eq!(w.fs.cache().downloads.load(Ordering::SeqCst), 2);
}

#[test]
fn a_multi_chunk_blob_that_fails_verification_is_never_promoted() {
    let mem = MemoryStore::new();
    mem.put("big", vec![5u8; 300_000], &[]);
    mem.set_content_md5("big", Some(vec![0u8; 16]));
    // (`auto` checks each range's CRC64 instead, which this service offers: the blob's
    // bytes are what the service holds, and the whole is not hashed again.)
    let w = verifying(mem, 65_536, simfs::cache::verify::Verify::Md5, |_| {});
    let ino = path(&w, "big").unwrap().ino;
    let fh = w.fs.open(ino, false, false).unwrap();
    // Ranges read before the end are served; the verification at the end then fails
    // every later read and keeps no copy.
    let _ = w.fs.read(fh, 0, 300_000);
    w.fs.cache().settle();
    assert_eq!(w.fs.read(fh, 0, 10).unwrap_err().errno(), libc::EIO);
    w.fs.release(fh).unwrap();
    assert_eq!(
        std::fs::read_dir(w.state.join("cache/data"))
            .unwrap()
            .count(),
        0
    );
    // The partial file goes with the fill's last reference (its worker may still hold one
    // for a moment).
    let tmp = w.state.join("cache/tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(&tmp).unwrap().count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the partial file stayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn service_lost_after_mount_fails_uncached_reads_only() {
    let mem = MemoryStore::new();
    mem.put("cached", "warm", &[]);
    mem.put("cold", "never fetched", &[]);
    let w = world_with(mem, "", 1 << 20);
    // Reading "cached" would otherwise fetch its sibling "cold" ahead of its read.
    w.fs.cache().set_prefetch(false);
    assert_eq!(read_all(&w, "cached").unwrap(), b"warm");
    w.store.set_offline(true);
    assert_eq!(read_all(&w, "cold").unwrap_err().errno(), libc::EIO);
    assert_eq!(read_all(&w, "cached").unwrap(), b"warm");
    assert_eq!(path(&w, "cold").unwrap().size, 13, "metadata still served");
}

#[test]
fn a_failed_range_fails_its_read_and_the_next_read_fetches_it_again() {
    let mem = MemoryStore::new();
    mem.put("f", vec![9u8; 200_000], &[]);
    let w = world_with(mem, "", 65_536);
    w.store.fail_get_at(131_072);
    let ino = path(&w, "f").unwrap().ino;
    let fh = w.fs.open(ino, false, false).unwrap();
    assert_eq!(w.fs.read(fh, 131_072, 100).unwrap_err().errno(), libc::EIO);
    w.store.fail_get_at(u64::MAX);
    assert_eq!(w.fs.read(fh, 0, 300_000).unwrap(), vec![9u8; 200_000]);
    w.fs.release(fh).unwrap();
    assert_eq!(read_all(&w, "f").unwrap(), vec![9u8; 200_000]);
}

#[test]
fn mount_prefix_becomes_the_root() {
    let mem = MemoryStore::new();
    mem.put("train/v1/a.txt", "A", &[]);
    mem.put("train/v1/sub/b.txt", "B", &[]);
    mem.put("train/v2/c.txt", "C", &[]);
    mem.put("other", "O", &[]);
    let w = world_with(mem, "train/v1/", 1 << 20);
    assert_eq!(read_all(&w, "a.txt").unwrap(), b"A");
    assert_eq!(read_all(&w, "sub/b.txt").unwrap(), b"B");
    assert!(path(&w, "c.txt").is_err());
    assert!(path(&w, "other").is_err());
}

#[test]
fn opening_for_write_is_refused_on_the_read_only_mount() {
    let w = world_with(fixture(), "", 1 << 20);
    let a = path(&w, "venv/lib/site.py").unwrap();
    assert_eq!(
        w.fs.open(a.ino, true, false).unwrap_err().errno(),
        libc::EROFS
    );
    let d = path(&w, "venv").unwrap();
    assert_eq!(
        w.fs.open(d.ino, false, false).unwrap_err().errno(),
        libc::EISDIR
    );
}

#[test]
fn index_is_reused_with_stable_inodes_only_for_the_same_source() {
    let w = world_with(fixture(), "", 1 << 20);
    let ino = path(&w, "venv/bin/python").unwrap().ino;
    let db = w.state.join("index.db");
    let same = SourceId {
        container_url: "mem://test".into(),
        prefix: "".into(),
    };
    let reopened = Index::open_existing(&db, &same).unwrap().unwrap();
    let venv = reopened
        .lookup(ROOT_INO, &Name::new(b"venv").unwrap())
        .unwrap()
        .unwrap();
    let bin = reopened
        .lookup(venv.ino, &Name::new(b"bin").unwrap())
        .unwrap()
        .unwrap();
    let py = reopened
        .lookup(bin.ino, &Name::new(b"python").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(py.ino, ino);
    let other = SourceId {
        container_url: "mem://other".into(),
        prefix: "".into(),
    };
    assert!(Index::open_existing(&db, &other).unwrap().is_none());
}

#[test]
fn cached_data_is_private_to_the_mounting_user() {
    use std::os::unix::fs::PermissionsExt;
    let w = world_with(fixture(), "", 1 << 20);
    read_all(&w, "venv/lib/site.py").unwrap();
    w.fs.cache().settle();
    let cache = w.state.join("cache");
    for d in [cache.clone(), cache.join("data"), cache.join("tmp")] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    let files: Vec<_> = std::fs::read_dir(cache.join("data")).unwrap().collect();
    assert_eq!(files.len(), 1);
    for f in files {
        let mode = f.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn a_long_path_blob_never_shadows_the_real_blob_at_its_path() {
    let mem = MemoryStore::new();
    mem.put("data/real.txt", "the real data", &[]);
    // Listed first (".simfs-long" sorts before "data"), claiming the real blob's path.
    mem.put(
        ".simfs-long/0a1b",
        "an impostor",
        &[("simfs_path", "data/real.txt")],
    );
    mem.put(".simfs-long/ffff", "garbage", &[("simfs_path", "%ff%fe")]);
    let w = world_with(mem, "", 1 << 20);
    assert_eq!(read_all(&w, "data/real.txt").unwrap(), b"the real data");
    assert!(
        path(&w, ".simfs-long").is_err(),
        "the reserved prefix stays hidden"
    );
    let findings = w.fs.index().findings().unwrap();
    for blob in [".simfs-long/0a1b", ".simfs-long/ffff"] {
        assert!(
            findings.iter().any(|f| f.blob == blob && f.hidden),
            "{blob} not reported: {findings:?}"
        );
    }
}

/// Allocated bytes of the clean cache files on disk.
fn cached_bytes(w: &World) -> u64 {
    use std::os::unix::fs::MetadataExt;
    // A file may be evicted by the background thread between the listing and its stat.
    std::fs::read_dir(w.state.join("cache/data"))
        .unwrap()
        .filter_map(|e| e.unwrap().metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[test]
fn the_cache_stays_within_its_capacity_and_never_evicts_an_open_file() {
    let mem = MemoryStore::new();
    let body = |i: usize| vec![i as u8; 64 << 10];
    for i in 0..10 {
        mem.put(&format!("d/f{i}"), body(i), &[]);
    }
    let capacity = 4 * (64 << 10);
    let w = world_with_capacity(
        Arc::new(FaultyStore::new(mem)),
        tempfile::tempdir().unwrap(),
        capacity,
    );
    // Eviction order is what is tested: no sibling is fetched ahead of its read.
    w.fs.cache().set_prefetch(false);
    // f9 stays open throughout: it must survive every eviction.
    let f9 = path(&w, "d/f9").unwrap();
    let held = w.fs.open(f9.ino, false, false).unwrap();
    for round in 0..2 {
        for i in 0..9 {
            assert_eq!(
                read_all(&w, &format!("d/f{i}")).unwrap(),
                body(i),
                "round {round}"
            );
            let used = w.fs.cache().stats().used;
            assert!(
                used <= capacity,
                "{used} bytes cached over a {capacity} capacity"
            );
            assert!(cached_bytes(&w) <= capacity);
        }
    }
    let stats = w.fs.cache().stats();
    assert!(stats.evictions >= 14, "{stats:?}");
    // The open file was never evicted: reading it again downloads nothing.
    let gets = w.store.counters.get.load(Ordering::SeqCst);
    assert_eq!(w.fs.read(held, 0, 10).unwrap(), vec![9u8; 10]);
    w.fs.release(held).unwrap();
    assert_eq!(read_all(&w, "d/f9").unwrap(), body(9));
    assert_eq!(w.store.counters.get.load(Ordering::SeqCst), gets);
    // The most recently used files are the ones still cached.
    assert_eq!(read_all(&w, "d/f8").unwrap(), body(8));
    assert_eq!(w.store.counters.get.load(Ordering::SeqCst), gets);
}

/// Waits (up to 10 s) for the background eviction thread to bring about `done`.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed().as_secs() < 10, "never happened: {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn crossing_the_high_watermark_trims_in_the_background_and_spares_open_files() {
    let mem = MemoryStore::new();
    for i in 0..10 {
        mem.put(&format!("d/f{i}"), vec![i as u8; 64 << 10], &[]);
    }
    let w = world_with_capacity(
        Arc::new(FaultyStore::new(mem)),
        tempfile::tempdir().unwrap(),
        10 * (64 << 10),
    );
    w.fs.cache().set_prefetch(false);
    // The oldest file stays open: the trim takes the next oldest instead.
    let f0 = path(&w, "d/f0").unwrap();
    let held = w.fs.open(f0.ino, false, false).unwrap();
    assert_eq!(w.fs.read(held, 0, 1).unwrap(), vec![0]);
    for i in 1..10 {
        read_all(&w, &format!("d/f{i}")).unwrap();
        w.fs.cache().settle();
    }
    // Ten files fill the bound exactly: no open had to evict, yet the cache is over its
    // high watermark (95%) until the thread trims it to the low one (90%).
    // The thread takes its victims off the books before it deletes and counts them: wait for
    // the count (bytes are counted last), not only for the bytes in use.
    eventually("a trim to the low watermark, counted", || {
        let stats = w.fs.cache().stats();
        stats.used <= 9 * (64 << 10) && stats.evicted_bytes >= 64 << 10
    });
    let stats = w.fs.cache().stats();
    assert_eq!((stats.evictions, stats.evicted_bytes), (1, 64 << 10));
    let gets = w.store.counters.get.load(Ordering::SeqCst);
    assert_eq!(w.fs.read(held, 0, 1).unwrap(), vec![0]);
    for i in 2..10 {
        read_all(&w, &format!("d/f{i}")).unwrap();
    }
    assert_eq!(
        w.store.counters.get.load(Ordering::SeqCst),
        gets,
        "only f1 was evicted"
    );
    w.fs.release(held).unwrap();
    read_all(&w, "d/f1").unwrap();
    assert!(w.store.counters.get.load(Ordering::SeqCst) > gets);
}

#[test]
fn a_disk_under_the_free_space_floor_keeps_only_open_files() {
    let mem = MemoryStore::new();
    for i in 0..4 {
        mem.put(&format!("d/f{i}"), vec![i as u8; 5000], &[]);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = MountConfig::new(dir.path());
    cfg.defaults = defaults();
    cfg.read_only = true;
    // No disk has this much free: every clean file is beyond the floor.
    cfg.cache.min_free = u64::MAX / 4;
    let w = world_from(Arc::new(FaultyStore::new(mem)), dir, "", &cfg);
    w.fs.cache().set_prefetch(false);
    let f3 = path(&w, "d/f3").unwrap();
    let held = w.fs.open(f3.ino, false, false).unwrap();
    for i in 0..3 {
        assert_eq!(
            read_all(&w, &format!("d/f{i}")).unwrap(),
            vec![i as u8; 5000]
        );
    }
    assert_eq!(w.fs.read(held, 0, 3).unwrap(), vec![3; 3]);
    w.fs.cache().settle();
    eventually("the closed files evicted and counted", || {
        cached_bytes(&w) <= 8192 && w.fs.cache().stats().evictions >= 3
    });
    assert_eq!(w.fs.cache().stats().evictions, 3);
    let gets = w.store.counters.get.load(Ordering::SeqCst);
    assert_eq!(w.fs.read(held, 4000, 3).unwrap(), vec![3; 3]);
    assert_eq!(w.store.counters.get.load(Ordering::SeqCst), gets);
    w.fs.release(held).unwrap();
}

#[test]
fn hydrated_files_survive_a_restart_and_a_damaged_copy_is_not_trusted() {
    let mem = MemoryStore::new();
    mem.put("a", vec![1u8; 5000], &[]);
    mem.put("b", vec![2u8; 5000], &[]);
    let store = Arc::new(FaultyStore::new(mem));
    let w = world_with_capacity(store.clone(), tempfile::tempdir().unwrap(), 1 << 20);
    read_all(&w, "a").unwrap();
    read_all(&w, "b").unwrap();
    w.fs.cache().settle();
    let data = w.state.join("cache/data");
    let dir = w.crash();
    // One cached copy is cut short while the node is down (a disk filling up, a tool).
    let mut copies: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    copies.sort_by_key(|p| std::fs::read(p).unwrap()[0]);
    std::fs::write(&copies[1], vec![2u8; 10]).unwrap();
    let again = world_with_capacity(store.clone(), dir, 1 << 20);
    let gets = store.counters.get.load(Ordering::SeqCst);
    assert_eq!(read_all(&again, "a").unwrap(), vec![1u8; 5000]);
    assert_eq!(
        store.counters.get.load(Ordering::SeqCst),
        gets,
        "a was reused"
    );
    assert_eq!(again.fs.cache().stats().hits, 1);
    assert_eq!(read_all(&again, "b").unwrap(), vec![2u8; 5000]);
    assert!(
        store.counters.get.load(Ordering::SeqCst) > gets,
        "b was fetched again"
    );
}

/// A writable world with directory `big` of 1,300 files, `f00000` to `f01299` (more than one
/// page of a listing), and its inode.
fn big_dir() -> (World, u64) {
    let mem = MemoryStore::new();
    for i in 0..1300 {
        mem.put(&format!("big/f{i:05}"), "x", &[]);
    }
    let w = crate::write_tests::rw(mem);
    let big = path(&w, "big").unwrap().ino;
    (w, big)
}

#[test]
fn a_large_directory_is_listed_a_page_at_a_time_and_each_entry_once() {
    let (w, big) = big_dir();
    let fh = w.fs.opendir(big).unwrap();
    let first = w.fs.readdir(fh, 0).unwrap();
    assert!(first.len() < 1300, "one page, not the whole directory");
    // The kernel took the first 100; meanwhile names come and go on both sides of it.
    let cookie = first[99].0;
    w.fs.unlink(big, OsStr::new("f00010")).unwrap();
    w.fs.unlink(big, OsStr::new("f01000")).unwrap();
    w.fs.mkdir(big, OsStr::new("f00500x"), 0o755, crate::write_tests::ME)
        .unwrap();
    let mut names: Vec<Vec<u8>> = first[..100].iter().map(|(_, e)| e.name.clone()).collect();
    let mut at = cookie;
    loop {
        let page = w.fs.readdir(fh, at).unwrap();
        let Some(last) = page.last() else { break };
        at = last.0;
        names.extend(page.into_iter().map(|(_, e)| e.name));
    }
    let unique: std::collections::BTreeSet<_> = names.iter().cloned().collect();
    assert_eq!(unique.len(), names.len(), "no entry twice");
    for i in (0..1300).filter(|&i| i != 1000 && i != 10) {
        assert!(
            unique.contains(format!("f{i:05}").as_bytes()),
            "f{i:05} listed"
        );
    }
    assert!(
        !unique.contains(b"f01000".as_slice()),
        "removed before it was reached"
    );
    // A seek back to an old position (telldir/seekdir) still works.
    let again = w.fs.readdir(fh, 2).unwrap();
    assert_eq!(again[0].1.name, b"f00000");
    w.fs.releasedir(fh);
}

#[test]
fn listings_without_a_handle_each_see_every_entry_once_and_start_afresh() {
    let (w, big) = big_dir();
    // Three listings of one directory interleaved, as concurrent `ls` without OPENDIR.
    let mut lists: Vec<(u64, Vec<Vec<u8>>)> = vec![(0, vec![]); 3];
    for round in 0.. {
        if round == 1 {
            // Behind every listing: one that fell back to positions would now skip a name.
            w.fs.unlink(big, OsStr::new("f00001")).unwrap();
        }
        let mut progressed = false;
        for (at, names) in lists.iter_mut() {
            let page = w.fs.readdir_unopened(big, *at).unwrap();
            // The kernel takes part of a page, then continues after what it took.
            let take = page.len().min(300);
            if let Some((cookie, _)) = page.get(take.saturating_sub(1)) {
                *at = *cookie;
                names.extend(page[..take].iter().map(|(_, e)| e.name.clone()));
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    for (_, names) in &lists {
        assert_eq!(names.len(), 1302, "every entry and the dots");
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 1302, "no entry twice");
    }
    // A listing started after a change sees it.
    w.fs.unlink(big, OsStr::new("f00000")).unwrap();
    let first = w.fs.readdir_unopened(big, 0).unwrap();
    assert_eq!(first[2].1.name, b"f00002");
    let file = path(&w, "big/f00002").unwrap().ino;
    assert!(w.fs.readdir_unopened(file, 0).is_err(), "not a directory");
}

/// Lists `dir` as the kernel does without a handle: from 0, then after the last cookie.
fn list_unopened(w: &World, dir: u64) -> Vec<String> {
    let (mut at, mut names) = (0, vec![]);
    loop {
        let page = w.fs.readdir_unopened(dir, at).unwrap();
        let Some((cookie, _)) = page.last() else {
            return names;
        };
        at = *cookie;
        names.extend(
            page.iter()
                .map(|(_, e)| String::from_utf8_lossy(&e.name).into_owned()),
        );
    }
}

#[test]
fn a_listing_without_a_handle_never_continues_in_an_older_listings_window() {
    let mem = MemoryStore::new();
    mem.put("a/one", "1", &[]);
    let w = crate::write_tests::rw(mem);
    let a = path(&w, "a").unwrap().ino;
    // Each listing ends at an offset where an earlier listing's window ended too.
    assert_eq!(list_unopened(&w, a), [".", "..", "one"]);
    let (_, fh) =
        w.fs.create(a, OsStr::new("two"), 0o644, crate::write_tests::ME)
            .unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(list_unopened(&w, a), [".", "..", "one", "two"]);
    w.fs.unlink(a, OsStr::new("one")).unwrap();
    assert_eq!(list_unopened(&w, a), [".", "..", "two"]);
    w.fs.unlink(a, OsStr::new("two")).unwrap();
    assert_eq!(list_unopened(&w, a), [".", ".."]);
}

#[test]
fn an_answer_that_starts_over_lands_only_its_second_delivery() {
    // One chunk, verified as it arrives (Content-MD5), and many chunks (written piece by
    // piece): in both, the garbled first piece of a restarted answer is overwritten and
    // forgotten by the checksum.
    for (len, chunk) in [(200_000usize, 1u64 << 20), (700_000, 65_536)] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mem = MemoryStore::new();
        mem.put("f", data.clone(), &[]);
        let store = Arc::new(FaultyStore::new(mem));
        store.restart_next_read();
        let w = world_on(store.clone(), tempfile::tempdir().unwrap(), "", chunk, None);
        assert!(read_all(&w, "f").unwrap() == data, "{len} bytes");
        w.fs.cache().settle();
        assert!(
            read_all(&w, "f").unwrap() == data,
            "the cached copy, {len} bytes"
        );
    }
}

/// A world over `mem` (chunks of `chunk` bytes) checking with `verify`.
fn verifying(
    mem: MemoryStore,
    chunk: u64,
    verify: simfs::cache::verify::Verify,
    set: impl FnOnce(&FaultyStore<MemoryStore>),
) -> World {
    let store = Arc::new(FaultyStore::new(mem));
    set(&store);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir, chunk, None, true);
    cfg.cache.verify = verify;
    world_from(store, dir, "", &cfg)
}

/// 3 MiB of a pattern in a blob without a Content-MD5 (uploaded in blocks).
fn blocks_blob() -> (MemoryStore, Vec<u8>) {
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    let mem = MemoryStore::new();
    mem.put("f", data.clone(), &[]);
    mem.set_content_md5("f", None);
    (mem, data)
}

#[test]
fn a_range_corrupted_on_the_way_fails_its_crc64_and_is_fetched_again() {
    use simfs::cache::verify::Verify;
    let (mem, data) = blocks_blob();
    let w = verifying(mem, 1 << 20, Verify::Auto, |s| s.corrupt_reads(1));
    assert!(read_all(&w, "f").unwrap() == data, "the bytes as stored");
    let gets = w.store.counters.get.load(Ordering::SeqCst);
    w.fs.cache().settle();
    // The same corruption unchecked lands in the file: `none` serves it.
    let (mem, data) = blocks_blob();
    let none = verifying(mem, 1 << 20, Verify::None, |s| s.corrupt_reads(1));
    assert!(
        read_all(&none, "f").unwrap() != data,
        "unchecked, the flipped bit stays"
    );
    let none_gets = none.store.counters.get.load(Ordering::SeqCst);
    assert_eq!(gets, none_gets + 1, "one range fetched twice");
}

#[test]
fn a_range_that_keeps_arriving_corrupted_fails_the_read_with_eio() {
    use simfs::cache::verify::Verify;
    let (mem, _) = blocks_blob();
    let w = verifying(mem, 1 << 20, Verify::Crc64, |s| s.corrupt_reads(1000));
    assert_eq!(read_all(&w, "f").unwrap_err().errno(), libc::EIO);
}

#[test]
fn auto_checks_md5_per_range_where_the_service_leaves_out_crc64() {
    use simfs::cache::verify::{Checksum, Verify};
    let (mem, data) = blocks_blob();
    let w = verifying(mem, 1 << 20, Verify::Auto, |s| {
        s.omit_sum(Checksum::Crc64, true);
        // Two corrupted answers: whichever ranges they hit, MD5 catches them once the
        // service has shown it gives no CRC64.
        s.corrupt_reads(2);
    });
    assert!(read_all(&w, "f").unwrap() == data);
}

#[test]
fn crc64_left_out_by_the_service_falls_back_to_the_content_md5() {
    use simfs::cache::verify::{Checksum, Verify};
    let data = vec![3u8; 3 << 20];
    let mem = MemoryStore::new();
    mem.put("good", data.clone(), &[]);
    mem.put("bad", data.clone(), &[]);
    mem.set_content_md5("bad", Some(vec![0u8; 16]));
    let w = verifying(mem, 1 << 20, Verify::Crc64, |s| {
        s.omit_sum(Checksum::Crc64, true)
    });
    assert!(read_all(&w, "good").unwrap() == data);
    let ino = path(&w, "bad").unwrap().ino;
    let fh = w.fs.open(ino, false, false).unwrap();
    let _ = w.fs.read(fh, 0, 3 << 20);
    w.fs.cache().settle();
    assert_eq!(
        w.fs.read(fh, 0, 10).unwrap_err().errno(),
        libc::EIO,
        "the whole-blob check ran"
    );
    w.fs.release(fh).unwrap();
}

#[test]
fn verify_none_serves_a_blob_whose_content_md5_is_wrong() {
    use simfs::cache::verify::Verify;
    let mem = MemoryStore::new();
    mem.put("f", "payload", &[]);
    mem.set_content_md5("f", Some(vec![0u8; 16]));
    let w = verifying(mem, 1 << 20, Verify::None, |_| {});
    assert_eq!(read_all(&w, "f").unwrap(), b"payload");
}
