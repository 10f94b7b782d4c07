//! Hot metadata paths of the core, without FUSE: lookup, getattr and a directory snapshot on
//! an index of 20,000 files built from the in-memory store.

use criterion::{criterion_group, criterion_main, Criterion};
use simfs::blob::memory::MemoryStore;
use simfs::blob::BlobStore;
use simfs::index::build::Defaults;
use simfs::index::names::Name;
use simfs::index::sync::{build_index, SyncOptions};
use simfs::index::{SourceId, ROOT_INO};
use std::hint::black_box;
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    let mem = MemoryStore::new();
    for i in 0..20_000 {
        mem.put(
            &format!("data/shard-{:03}/sample-{i:06}.bin", i / 500),
            "x",
            &[],
        );
    }
    let store: Arc<dyn BlobStore> = Arc::new(mem);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = SourceId {
        container_url: "mem://bench".into(),
        prefix: String::new(),
    };
    let opts = SyncOptions {
        concurrency: 8,
        defaults: Defaults {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
        },
        progress_after: None,
    };
    let (index, _) = rt
        .block_on(build_index(
            store,
            &source,
            &dir.path().join("index.db"),
            &opts,
        ))
        .unwrap();
    let data = index
        .lookup(ROOT_INO, &Name::new(b"data").unwrap())
        .unwrap()
        .unwrap();
    let shard = index
        .lookup(data.ino, &Name::new(b"shard-017").unwrap())
        .unwrap()
        .unwrap();
    let name = Name::new(b"sample-008765.bin").unwrap();
    c.bench_function("index lookup", |b| {
        b.iter(|| {
            index
                .lookup(black_box(shard.ino), black_box(&name))
                .unwrap()
        })
    });
    let file = index.lookup(shard.ino, &name).unwrap().unwrap();
    c.bench_function("index getattr", |b| {
        b.iter(|| index.getattr(black_box(file.ino)).unwrap())
    });
    c.bench_function("index readdir (500 entries)", |b| {
        b.iter(|| index.readdir(black_box(shard.ino)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
