//! Reads during hydration and prefetching, on the in-memory and failure-injecting stores.
//! What is pinned is which requests are made and in what order, never how long they take.

use crate::world::{path, read_all, world_with, world_with_capacity};
use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i * 7 % 253) as u8).collect()
}

#[test]
fn open_returns_before_any_data_is_fetched() {
    let mem = MemoryStore::new();
    mem.put("big", pattern(1 << 20), &[]);
    let w = world_with(mem, "", 64 << 10);
    w.store.set_latency(Duration::from_millis(300));
    let ino = path(&w, "big").unwrap().ino;
    let fh = w.fs.open(ino, false, false).unwrap();
    // The fill has started in the background; none of its requests can have been answered.
    assert!(
        w.fs.read_may_wait(fh, 0, 4096),
        "nothing can be present yet"
    );
    w.store.set_latency(Duration::ZERO);
    assert_eq!(w.fs.read(fh, 0, 1 << 20).unwrap(), pattern(1 << 20));
    w.fs.release(fh).unwrap();
}

#[test]
fn a_read_far_into_a_cold_file_jumps_the_queue() {
    let mem = MemoryStore::new();
    let body = pattern(64 * (64 << 10));
    mem.put("shard", body.clone(), &[]);
    let w = world_with(mem, "", 64 << 10);
    w.store.set_latency(Duration::from_millis(20));
    let ino = path(&w, "shard").unwrap().ino;
    let fh = w.fs.open(ino, false, false).unwrap();
    let before = w.store.counters.get.load(Ordering::SeqCst);
    // A random reader: the last chunk first.
    let off = 63 * (64 << 10) + 100;
    assert_eq!(
        w.fs.read(fh, off, 1000).unwrap(),
        &body[off as usize..off as usize + 1000]
    );
    let fetched = w.store.counters.get.load(Ordering::SeqCst) - before;
    assert!(
        fetched < 16,
        "{fetched} of 64 ranges were fetched before the one the reader asked for"
    );
    w.store.set_latency(Duration::ZERO);
    assert_eq!(w.fs.read(fh, 0, body.len() as u32).unwrap(), body);
    w.fs.release(fh).unwrap();
    w.fs.cache().settle();
    assert_eq!(
        w.store.counters.get.load(Ordering::SeqCst) - before,
        64,
        "no range was fetched twice"
    );
}

#[test]
fn a_blob_larger_than_the_cache_streams_through_a_bounded_window() {
    let mem = MemoryStore::new();
    let body = pattern(4 << 20);
    mem.put("huge", body.clone(), &[]);
    let store = Arc::new(FaultyStore::new(mem));
    let w = world_with_capacity(store, tempfile::tempdir().unwrap(), 1 << 20);
    let ino = path(&w, "huge").unwrap().ino;
    let fh = w.fs.open(ino, false, false).unwrap();
    let tmp = w.state.join("cache/tmp");
    let mut got = Vec::new();
    let mut peak = 0;
    while got.len() < body.len() {
        let part = w.fs.read(fh, got.len() as u64, 128 << 10).unwrap();
        assert!(!part.is_empty());
        got.extend_from_slice(&part);
        use std::os::unix::fs::MetadataExt;
        let on_disk: u64 = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
            .sum();
        peak = peak.max(on_disk);
    }
    assert!(got == body, "the streamed blob reads back byte for byte");
    assert!(peak <= 1 << 20, "{peak} bytes on disk for a 1 MiB cache");
    w.fs.release(fh).unwrap();
    assert_eq!(
        std::fs::read_dir(w.state.join("cache/data"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn the_first_small_file_read_fetches_its_siblings_ahead() {
    let mem = MemoryStore::new();
    for i in 0..40 {
        mem.put(&format!("pkg/m{i:02}.py"), format!("module {i}"), &[]);
    }
    mem.put("pkg/big.bin", pattern(2 << 20), &[]);
    mem.put("other/x.py", "elsewhere", &[]);
    let w = world_with(mem, "", 1 << 20);
    let used =
        |m: &simfs::metrics::Metrics| m.prefetch.get_or_create(&vec![("outcome", "used")]).get();
    let used_before = used(simfs::metrics::get());
    assert_eq!(read_all(&w, "pkg/m00.py").unwrap(), b"module 0");
    w.fs.cache().settle();
    let gets = w.store.counters.get.load(Ordering::SeqCst);
    for i in 1..40 {
        assert_eq!(
            read_all(&w, &format!("pkg/m{i:02}.py")).unwrap(),
            format!("module {i}").as_bytes()
        );
    }
    assert_eq!(
        w.store.counters.get.load(Ordering::SeqCst),
        gets,
        "every sibling was already cached"
    );
    // (Other tests in this process count too: at least these 39 were used.)
    assert!(
        used(simfs::metrics::get()) - used_before >= 39,
        "the metrics count each prefetched file read as used"
    );
    // Large files and other directories are not prefetched.
    read_all(&w, "other/x.py").unwrap();
    let big =
        w.fs.index()
            .blob_of(path(&w, "pkg/big.bin").unwrap().ino)
            .unwrap()
            .unwrap();
    assert!(!w.fs.cache().is_hydrated(&big));
}

#[test]
fn prefetching_never_evicts_what_was_read() {
    let mem = MemoryStore::new();
    for i in 0..20 {
        mem.put(&format!("d/f{i:02}"), vec![i as u8; 64 << 10], &[]);
    }
    let store = Arc::new(FaultyStore::new(mem));
    // Room for four files: the demand read takes one, prefetch may fill the rest only.
    let w = world_with_capacity(store.clone(), tempfile::tempdir().unwrap(), 4 * (64 << 10));
    assert_eq!(read_all(&w, "d/f00").unwrap(), vec![0u8; 64 << 10]);
    w.fs.cache().settle();
    let stats = w.fs.cache().stats();
    assert_eq!(stats.evictions, 0, "{stats:?}");
    assert!(stats.used <= 4 * (64 << 10), "{stats:?}");
    // The demand-read file is still cached.
    let gets = store.counters.get.load(Ordering::SeqCst);
    read_all(&w, "d/f00").unwrap();
    assert_eq!(store.counters.get.load(Ordering::SeqCst), gets);
}

#[test]
fn a_cancelled_prefetch_stops_fetching() {
    let mem = MemoryStore::new();
    for i in 0..200 {
        mem.put(&format!("d/f{i:03}"), vec![1u8; 1000], &[]);
    }
    let w = world_with(mem, "", 1 << 20);
    w.store.set_latency(Duration::from_millis(20));
    read_all(&w, "d/f000").unwrap();
    w.fs.cache().cancel_prefetch();
    w.fs.cache().settle();
    let fetched = w.store.counters.get.load(Ordering::SeqCst);
    assert!(
        fetched < 100,
        "{fetched} of 200 files fetched after the cancel"
    );
}

#[test]
fn a_walk_through_many_directories_prefetches_the_ones_read_last() {
    let mem = MemoryStore::new();
    for d in 0..10 {
        for f in 0..200 {
            mem.put(&format!("d{d}/f{f:03}"), vec![d as u8; 500], &[]);
        }
    }
    let w = world_with(mem, "", 1 << 20);
    w.store.set_latency(Duration::from_millis(20));
    for d in 0..10 {
        read_all(&w, &format!("d{d}/f000")).unwrap();
    }
    w.fs.cache().settle();
    let fetched = w.store.counters.get.load(Ordering::SeqCst);
    // Every round left running would fetch all 2,000; the first five stop once five newer
    // ones have started (in 100 ms of demand reads, 32 fills at a time: a few hundred).
    assert!(fetched < 1_500, "{fetched} files fetched");
    for f in 1..200 {
        let blob =
            w.fs.index()
                .blob_of(path(&w, &format!("d9/f{f:03}")).unwrap().ino);
        assert!(
            w.fs.cache().is_hydrated(&blob.unwrap().unwrap()),
            "the last directory read is prefetched whole (f{f:03})"
        );
    }
}

#[test]
fn a_stage_plan_counts_each_file_once_and_forced_keeps_what_fits() {
    let mem = MemoryStore::new();
    for i in 0..6 {
        mem.put(&format!("ds/part-{i}"), vec![i as u8; 100_000], &[]);
    }
    mem.put("ds/sub/deep", vec![9u8; 100_000], &[]);
    mem.put("other", "x", &[]);
    let store = Arc::new(FaultyStore::new(mem));
    let w = world_with_capacity(store.clone(), tempfile::tempdir().unwrap(), 350_000);
    read_all(&w, "ds/part-0").unwrap();
    w.fs.cache().settle();
    let plan = w.fs.stage_plan(&["ds".into(), "ds/part-1".into()]).unwrap();
    assert_eq!(plan.items.len(), 7, "part-1 is named twice, counted once");
    // The room is the high watermark (95%): staging stays where the trim does not reach.
    assert_eq!((plan.bytes, plan.room), (700_000, 332_500));
    assert!(!plan.fits());
    assert!(plan.cached_bytes >= 100_000, "part-0 was read");
    let (todo, skipped) = plan.within_room();
    assert_eq!((todo.len(), skipped.len()), (3, 4));
    for item in &todo {
        w.fs.stage_one(item).unwrap();
    }
    for item in &todo {
        assert!(
            w.fs.cache().is_hydrated(item.blob.as_ref().unwrap()),
            "{}",
            item.path
        );
    }
}

#[test]
fn evicting_a_tree_keeps_open_files() {
    let mem = MemoryStore::new();
    mem.put("d/a", vec![1u8; 5000], &[]);
    mem.put("d/b", vec![2u8; 5000], &[]);
    let w = world_with(mem, "", 1 << 20);
    read_all(&w, "d/a").unwrap();
    let b = path(&w, "d/b").unwrap();
    let held = w.fs.open(b.ino, false, false).unwrap();
    assert_eq!(w.fs.read(held, 0, 10).unwrap(), vec![2u8; 10]);
    w.fs.cache().settle();
    let (files, _) = w.fs.evict_tree(&["d".into()]).unwrap();
    assert_eq!(files, 1, "only the closed file is dropped");
    let blob = |p| {
        w.fs.index()
            .blob_of(path(&w, p).unwrap().ino)
            .unwrap()
            .unwrap()
    };
    assert!(!w.fs.cache().is_hydrated(&blob("d/a")));
    assert!(w.fs.cache().is_hydrated(&blob("d/b")));
    w.fs.release(held).unwrap();
    assert_eq!(read_all(&w, "d/a").unwrap(), vec![1u8; 5000]);
}

#[test]
fn an_empty_blob_opens_reads_and_grows_without_waiting_for_a_fill() {
    let mem = MemoryStore::new();
    mem.put("empty", "", &[]);
    let w = crate::write_tests::rw(mem);
    assert_eq!(read_all(&w, "empty").unwrap(), b"");
    let a = path(&w, "empty").unwrap();
    // Growing it needs its (empty) old content first: that must not wait forever.
    let fh = w.fs.open(a.ino, true, false).unwrap();
    w.fs.write(fh, 10, b"x").unwrap();
    assert_eq!(w.fs.read(fh, 0, 20).unwrap(), b"\0\0\0\0\0\0\0\0\0\0x");
    w.fs.release(fh).unwrap();
}

#[test]
fn a_first_write_covering_the_whole_file_fetches_nothing() {
    let mem = MemoryStore::new();
    mem.put("ckpt", vec![1u8; 300_000], &[]);
    let w = crate::write_tests::rw(mem);
    let a = path(&w, "ckpt").unwrap();
    let gets = w.store.counters.get.load(Ordering::SeqCst);
    let fh = w.fs.open(a.ino, true, false).unwrap();
    w.fs.write(fh, 0, &vec![2u8; 300_000]).unwrap();
    w.fs.write(fh, 300_000, b"tail").unwrap();
    w.fs.release(fh).unwrap();
    assert_eq!(w.store.counters.get.load(Ordering::SeqCst), gets, "no GET");
    let mut want = vec![2u8; 300_000];
    want.extend_from_slice(b"tail");
    assert_eq!(read_all(&w, "ckpt").unwrap(), want);
    // A partial first write needs the old content: that one is fetched.
    let fh = w.fs.open(a.ino, true, false).unwrap();
    w.fs.write(fh, 10, b"x").unwrap();
    w.fs.release(fh).unwrap();
    want[10] = b'x';
    assert_eq!(read_all(&w, "ckpt").unwrap(), want);
}

#[test]
fn reads_racing_evictions_always_see_whole_correct_files() {
    let mem = MemoryStore::new();
    let body = |i: usize| -> Vec<u8> { (0..40_000).map(|j| ((i * 13 + j) % 251) as u8).collect() };
    for i in 0..24 {
        mem.put(&format!("d/f{i:02}"), body(i), &[]);
    }
    let store = Arc::new(FaultyStore::new(mem));
    // Room for about five files: every open evicts what another thread just read.
    let w = world_with_capacity(store, tempfile::tempdir().unwrap(), 5 * 40_960);
    let w = &w;
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for k in 0..60 {
                    let i = (t * 7 + k * 5) % 24;
                    let got = read_all(w, &format!("d/f{i:02}")).unwrap();
                    assert!(got == body(i), "f{i:02} read wrong data");
                }
            });
        }
    });
    w.fs.cache().settle();
    let stats = w.fs.cache().stats();
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.used <= 5 * 40_960, "{stats:?}");
    assert_eq!(w.fs.open_handles(), 0);
}
