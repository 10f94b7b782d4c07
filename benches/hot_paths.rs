//! The hot paths, fastest layer first: index lookup, getattr and a directory page on an
//! index of 20,000 files; a hit in the cache of hydrated files; and a stat through a live
//! FUSE mount of the same core, once as a real round trip to the daemon (kernel caching off)
//! and once answered from the kernel's caches (the default long timeouts).
//!
//! The mounts need /dev/fuse and root (the test suite runs as root); without them those two
//! benchmarks are skipped with a note. Each mount is a background session unmounted on drop.

use criterion::{criterion_group, criterion_main, Criterion};
use simfs::blob::memory::MemoryStore;
use simfs::blob::BlobStore;
use simfs::cache::Cache;
use simfs::fs::SimFs;
use simfs::index::build::Defaults;
use simfs::index::ingest::no_progress;
use simfs::index::names::Name;
use simfs::index::{Index, SourceId, ROOT_INO};
use simfs::kernel::Kernel;
use simfs::mount::{prepare_with_store, session, MountConfig, Prepared, ServeOptions};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Files in the index: 20,000, or `SIMFS_BENCH_FILES` (the 1M-entry figures in
/// docs/BENCHMARKS.md: the same paths, in 2,000 directories of 500).
fn files() -> usize {
    std::env::var("SIMFS_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 10_000)
        .unwrap_or(20_000)
}

fn store() -> Arc<dyn BlobStore> {
    let mem = MemoryStore::new();
    for i in 0..files() {
        mem.put(
            &format!("data/shard-{:03}/sample-{i:06}.bin", i / 500),
            "x",
            &[],
        );
    }
    mem.put("top.bin", vec![7u8; 4096], &[]);
    Arc::new(mem)
}

/// The filesystem over `store`, wired as a read-only mount is (state under `dir`).
fn prepare(store: &Arc<dyn BlobStore>, rt: &tokio::runtime::Runtime, dir: &Path) -> Prepared {
    let source = SourceId {
        container_url: "mem://bench".into(),
        prefix: String::new(),
    };
    let mut cfg = MountConfig::new(dir);
    cfg.defaults = Defaults {
        uid: 0,
        gid: 0,
        file_mode: 0o644,
        dir_mode: 0o755,
    };
    cfg.list_concurrency = 8;
    cfg.read_only = true;
    prepare_with_store(
        store.clone(),
        &source,
        &cfg,
        &Kernel::none(),
        rt,
        &no_progress,
    )
    .unwrap()
}

fn name(s: &str) -> Name {
    Name::new(s.as_bytes()).unwrap()
}

fn index_paths(c: &mut Criterion, index: &Index) {
    let data = index.lookup(ROOT_INO, &name("data")).unwrap().unwrap();
    let shard = index.lookup(data.ino, &name("shard-017")).unwrap().unwrap();
    let sample = name("sample-008765.bin");
    c.bench_function("index lookup", |b| {
        b.iter(|| {
            index
                .lookup(black_box(shard.ino), black_box(&sample))
                .unwrap()
        })
    });
    let file = index.lookup(shard.ino, &sample).unwrap().unwrap();
    c.bench_function("index getattr", |b| {
        b.iter(|| index.getattr(black_box(file.ino)).unwrap())
    });
    c.bench_function("index readdir (500 entries)", |b| {
        b.iter(|| index.readdir(black_box(shard.ino)).unwrap())
    });
}

fn cache_hit(c: &mut Criterion, index: &Index, cache: &Cache) {
    let top = index.lookup(ROOT_INO, &name("top.bin")).unwrap().unwrap();
    let blob = index.blob_of(top.ino).unwrap().unwrap();
    drop(cache.open(top.ino, &blob).unwrap()); // hydrate once; every iteration below is a hit
    let downloads = cache.downloads.load(std::sync::atomic::Ordering::Relaxed);
    c.bench_function("cache hit (open of a hydrated blob)", |b| {
        b.iter(|| cache.open(top.ino, black_box(&blob)).unwrap())
    });
    assert_eq!(
        cache.downloads.load(std::sync::atomic::Ordering::Relaxed),
        downloads,
        "a cache hit must not download"
    );
}

/// Mounts `fs` at a fresh directory with kernel timeouts `ttl`; None when this machine cannot
/// mount (no /dev/fuse, not root).
fn mount(
    fs: Arc<SimFs>,
    ttl: Duration,
    rt: &tokio::runtime::Handle,
) -> Option<(fuser::BackgroundSession, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let opts = ServeOptions {
        fsname: "simfs-bench".into(),
        allow_other: false,
        ttl,
        threads: 2,
        noexec: false,
        kernel_features: simfs::fuse::KernelFeatures {
            passthrough: false,
            list_unopened: true,
            direct_writes: true,
            in_place_writes: false,
        },
        refresh_interval: Duration::ZERO,
        prime_entries: 0,
        read_ahead: 0,
        metrics_address: None,
    };
    let s = session(fs, Kernel::for_session(), dir.path(), &opts, rt)
        .map_err(|e| eprintln!("skipping the FUSE benchmarks: {e}"))
        .ok()?;
    Some((s.spawn().unwrap(), dir))
}

fn fuse_stat(c: &mut Criterion, fs: Arc<SimFs>, rt: &tokio::runtime::Handle) {
    for (label, ttl) in [
        ("fuse stat, round trip to the daemon", Duration::ZERO),
        ("fuse stat, kernel-cached", Duration::from_secs(86_400)),
    ] {
        let Some((session, dir)) = mount(fs.clone(), ttl, rt) else {
            return;
        };
        let path = dir.path().join("top.bin");
        assert_eq!(std::fs::symlink_metadata(&path).unwrap().len(), 4096);
        c.bench_function(label, |b| {
            b.iter(|| std::fs::symlink_metadata(black_box(&path)).unwrap())
        });
        drop(session); // unmounts
    }
}

/// What `--verify` costs per 4 MiB range: CRC64 (Azure's, per range) and MD5 (the blob's
/// Content-MD5, or per range where the service has no CRC64). Throughput in bytes.
fn checksums(c: &mut Criterion) {
    use simfs::cache::verify::{sum_of, Checksum};
    let range = vec![0x5au8; 4 << 20];
    let mut g = c.benchmark_group("checksum 4 MiB");
    g.throughput(criterion::Throughput::Bytes(range.len() as u64));
    for (name, sum) in [("crc64", Checksum::Crc64), ("md5", Checksum::Md5)] {
        g.bench_function(name, |b| b.iter(|| sum_of(sum, &range)));
    }
    g.finish();
}

/// What the metrics add to each FUSE request and each request to the service.
fn metrics_cost(c: &mut Criterion) {
    let m = simfs::metrics::get();
    c.bench_function("metrics: one FUSE request timed", |b| {
        b.iter(|| drop(m.fuse("getattr")))
    });
    c.bench_function("metrics: one service request counted", |b| {
        b.iter(|| {
            m.blob_requests
                .get_or_create(&vec![("op", "get"), ("outcome", "ok")])
                .inc()
        })
    });
}

fn bench(c: &mut Criterion) {
    checksums(c);
    metrics_cost(c);
    let store = store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prepared = prepare(&store, &rt, dir.path());
    let fs = prepared.fs.clone();
    index_paths(c, fs.index());
    cache_hit(c, fs.index(), fs.cache());
    fuse_stat(c, fs, rt.handle());
}

criterion_group!(benches, bench);
criterion_main!(benches);
