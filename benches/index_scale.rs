//! Indexing and refreshing at scale, from the in-memory store (no network): how long a mount
//! takes to index N blobs, how many blobs a second that is, and how much memory it holds at
//! its peak; then a refresh of the unchanged container and one after 1% of the blobs were
//! rewritten, 1% added and 1% deleted; then a remount that reuses the persisted index, and a
//! walk of every entry through the filesystem core (what `find` asks of a serving mount).
//!
//! `cargo bench --bench index_scale` runs 1,000,000 blobs (`SIMFS_SCALE_BLOBS` sets another
//! count); under `cargo test` it runs 5,000 as a smoke test. Half the blobs sit in one flat
//! directory (a dataset of shards), half in date-partitioned directories. Peak memory is
//! sampled during each step and reported above the process's memory before it, so the
//! in-memory container itself is not counted.

use simfs::blob::memory::MemoryStore;
use simfs::blob::BlobStore;
use simfs::index::build::Defaults;
use simfs::index::ingest::no_progress;
use simfs::index::SourceId;
use simfs::kernel::Kernel;
use simfs::mount::{prepare_with_store, MountConfig};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Instant;

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `f`, returning its result, the seconds it took and its peak memory above what the
/// process held before (MiB): anonymous memory (the heap: what a step really holds) and
/// file-backed pages (SQLite's memory-mapped index files, which the kernel reclaims at will),
/// sampled every 10 ms.
fn measured<T>(f: impl FnOnce() -> T) -> (T, f64, (f64, f64)) {
    let (anon0, file0) = (status_kib("RssAnon:"), status_kib("RssFile:"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = (0, 0);
            loop {
                peak.0 = peak.0.max(status_kib("RssAnon:"));
                peak.1 = peak.1.max(status_kib("RssFile:"));
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let t0 = Instant::now();
    let out = f();
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (anon, file) = sampler.join().unwrap();
    let mib = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1024.0;
    (out, secs, (mib(anon, anon0), mib(file, file0)))
}

fn memory((anon, file): (f64, f64)) -> String {
    format!("peak +{anon:.0} MiB heap, +{file:.0} MiB mapped index pages")
}

fn name(i: usize, n: usize) -> String {
    if i < n / 2 {
        format!("flat/shard-{i:08}.tar")
    } else {
        let d = i % 365;
        format!(
            "dated/2026/{:02}/{:02}/part-{i:08}.parquet",
            d / 31 + 1,
            d % 31 + 1
        )
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("SIMFS_SCALE_BLOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 1_000_000 } else { 5_000 });
    let mem = Arc::new(MemoryStore::with_page_size(5000));
    for i in 0..n {
        MemoryStore::put(&mem, &name(i, n), "", &[]);
    }
    let store: Arc<dyn BlobStore> = mem.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = SourceId {
        container_url: "mem://scale".into(),
        prefix: String::new(),
    };
    let mut cfg = MountConfig::new(dir.path());
    cfg.defaults = Defaults {
        uid: 0,
        gid: 0,
        file_mode: 0o644,
        dir_mode: 0o755,
    };
    cfg.read_only = true;
    let (prepared, secs, mib) = measured(|| {
        prepare_with_store(
            store.clone(),
            &source,
            &cfg,
            &Kernel::none(),
            &rt,
            &no_progress,
        )
        .unwrap()
    });
    println!(
        "index {n} blobs: {secs:.2} s, {:.0} blobs/s, {}",
        n as f64 / secs,
        memory(mib)
    );
    let refresher = prepared.fs.refresher().clone();
    let (r, secs, mib) = measured(|| refresher.refresh_path("").unwrap());
    assert!(!r.changed_anything(), "{r:?}");
    println!(
        "refresh, unchanged: {secs:.2} s, {} ({})",
        memory(mib),
        r.summary()
    );
    let pct = (n / 100).max(1);
    for i in 0..pct {
        MemoryStore::put(&mem, &name(i * 97 % n, n), "new", &[]);
        MemoryStore::put(&mem, &format!("flat/added-{i:08}.tar"), "", &[]);
        mem.remove(&name((i * 89 + 1) % n, n));
    }
    let (r, secs, mib) = measured(|| refresher.refresh_path("").unwrap());
    assert!(
        r.added >= pct as u64 && r.changed > 0 && r.removed > 0,
        "{r:?}"
    );
    println!(
        "refresh, 1% changed, added and deleted: {secs:.2} s, {} ({})",
        memory(mib),
        r.summary()
    );
    drop(refresher);
    drop(prepared);
    let (again, secs, mib) = measured(|| {
        prepare_with_store(
            store.clone(),
            &source,
            &cfg,
            &Kernel::none(),
            &rt,
            &no_progress,
        )
        .unwrap()
    });
    let root = again.fs.index().readdir(simfs::index::ROOT_INO).unwrap();
    assert_eq!(root.len(), 2, "flat and dated");
    println!(
        "remount reusing the index, read-only: {secs:.3} s, {}",
        memory(mib)
    );
    // Serving: what `find` or `ls -lR` asks of the core, every entry once.
    let fs = again.fs.clone();
    let (seen, secs, mib) = measured(|| {
        let mut stack = vec![simfs::index::ROOT_INO];
        let mut seen = 0u64;
        while let Some(dir) = stack.pop() {
            let fh = fs.opendir(dir).unwrap();
            // A page at a time, as the kernel asks: the walk holds one page.
            let mut at = 2;
            loop {
                let page = fs.readdir(fh, at).unwrap();
                let Some(&(last, _)) = page.last() else { break };
                at = last;
                for (_, e) in page {
                    let a = fs
                        .lookup(dir, std::ffi::OsStr::from_bytes(&e.name))
                        .unwrap();
                    fs.getattr(a.ino).unwrap();
                    seen += 1;
                    if a.kind == simfs::fs::Kind::Dir {
                        stack.push(a.ino);
                    }
                }
            }
            fs.releasedir(fh);
        }
        seen
    });
    assert!(seen >= n as u64);
    println!(
        "serving: readdir, lookup and getattr of all {seen} entries: {secs:.2} s, {}",
        memory(mib)
    );
    drop(fs);
    drop(again);
    cfg.read_only = false;
    let (_rw, secs, mib) = measured(|| {
        prepare_with_store(
            store.clone(),
            &source,
            &cfg,
            &Kernel::none(),
            &rt,
            &no_progress,
        )
        .unwrap()
    });
    println!(
        "remount reusing the index, read-write (journal recovery): {secs:.3} s, {}",
        memory(mib)
    );
}
