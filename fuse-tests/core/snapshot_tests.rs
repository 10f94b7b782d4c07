//! Unit tests of index snapshots: a fleet node mounts from the snapshot another published
//! (same tree, no listing), refuses one it cannot use (and lists instead), and of two
//! publishers racing exactly one commits.

use crate::refresh_tests::{linked_checkpoint, tree};
use crate::world::{defaults, fixture, path, read_all, world_from, World};
use crate::write_tests::{drain, fresh, rw, write_file, ME};
use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use simfs::index::ingest::IngestOptions;
use simfs::index::snapshot::{self, Published, SnapshotError};
use simfs::index::{SourceId, ROOT_INO};
use simfs::mount::MountConfig;
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn source(prefix: &str) -> SourceId {
    SourceId {
        container_url: "mem://test".into(),
        prefix: prefix.into(),
    }
}

fn publish(w: &World, prefix: &str) -> Result<Published, SnapshotError> {
    let work = tempfile::tempdir().unwrap();
    let opts = IngestOptions {
        concurrency: 4,
        defaults: defaults(),
    };
    w._rt.block_on(snapshot::publish(
        w.store.clone(),
        &source(prefix),
        &opts,
        work.path(),
    ))
}

/// A read-only mount with an empty cache that starts from the container's snapshot.
fn from_snapshot(store: &Arc<FaultyStore<MemoryStore>>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = MountConfig::new(dir.path());
    cfg.defaults = defaults();
    cfg.list_concurrency = 4;
    cfg.read_only = true;
    cfg.index_from_container = true;
    world_from(store.clone(), dir, "", &cfg)
}

/// A snapshot blob put in place: what it is, its bytes and its metadata.
type Case<'a> = (&'a str, Vec<u8>, &'a [(&'a str, &'a str)]);

fn lists(w: &World) -> u64 {
    w.store.counters.list.load(Ordering::SeqCst)
}

#[test]
fn a_published_snapshot_mounts_the_same_tree_without_a_listing() {
    let writer = rw(fixture());
    linked_checkpoint(&writer, "", ROOT_INO, b"weights");
    drain(&writer);
    let p = publish(&writer, "").unwrap();
    assert_eq!(p.blob, ".simfs/index/snapshot.db.gz");
    assert!(p.entries > 10 && p.snapshot_bytes > 0 && p.snapshot_bytes < p.index_bytes);
    let before = lists(&writer);
    let node = from_snapshot(&writer.store);
    assert_eq!(lists(&writer), before, "no listing at mount");
    let listed = fresh(&writer);
    assert_eq!(tree(&node), tree(&listed), "what a listing shows");
    assert!(
        path(&node, ".simfs").is_err(),
        "the reserved prefix is hidden"
    );
    assert!(path(&listed, ".simfs").is_err());
    assert_eq!(read_all(&node, "best.pt").unwrap(), b"weights");
    // Changes after the publish arrive with the refresh.
    write_file(&writer, "", "after.txt", b"later");
    drain(&writer);
    assert!(path(&node, "after.txt").is_err());
    node.fs.refresher().refresh_path("").unwrap();
    assert_eq!(read_all(&node, "after.txt").unwrap(), b"later");
}

#[test]
fn a_snapshot_this_mount_cannot_use_is_refused_and_the_container_listed() {
    let writer = rw(fixture());
    publish(&writer, "venv/").unwrap();
    let mem = writer.store.inner();
    let theirs = mem.data("venv/.simfs/index/snapshot.db.gz").unwrap();
    let cases: [Case; 3] = [
        // Another prefix's snapshot copied to this prefix's name.
        (
            "another prefix",
            theirs.to_vec(),
            &[("simfs_index_schema", "2"), ("simfs_index_prefix", "venv/")],
        ),
        // Another simfs version.
        (
            "another schema",
            theirs.to_vec(),
            &[("simfs_index_schema", "1"), ("simfs_index_prefix", "")],
        ),
        // Damaged.
        (
            "not gzip",
            b"garbage".to_vec(),
            &[("simfs_index_schema", "2"), ("simfs_index_prefix", "")],
        ),
    ];
    let listed = tree(&fresh(&writer));
    for (what, data, meta) in cases {
        mem.put(".simfs/index/snapshot.db.gz", data, meta);
        let before = lists(&writer);
        let node = from_snapshot(&writer.store);
        assert!(lists(&writer) > before, "{what}: the mount lists instead");
        assert_eq!(tree(&node), listed, "{what}");
    }
}

#[test]
fn of_two_publishers_racing_one_commits_and_the_other_changes_nothing() {
    let writer = rw(fixture());
    // Every request takes a while: both publishers read the old version before either
    // uploads.
    writer
        .store
        .set_latency(std::time::Duration::from_millis(20));
    let work = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let opts = IngestOptions {
        concurrency: 4,
        defaults: defaults(),
    };
    let src = source("");
    let store: Arc<dyn simfs::blob::BlobStore> = writer.store.clone();
    let (a, b) = writer._rt.block_on(async {
        tokio::join!(
            snapshot::publish(store.clone(), &src, &opts, work.0.path()),
            snapshot::publish(store.clone(), &src, &opts, work.1.path())
        )
    });
    writer.store.set_latency(std::time::Duration::ZERO);
    let raced = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(SnapshotError::Raced(_))))
        .count();
    assert_eq!(
        (a.is_ok() as u8 + b.is_ok() as u8, raced),
        (1, 1),
        "{a:?} {b:?}"
    );
    let node = from_snapshot(&writer.store);
    assert_eq!(tree(&node), tree(&fresh(&writer)));
}

#[test]
fn the_reserved_name_cannot_be_made_at_the_root() {
    let w = rw(fixture());
    let err =
        w.fs.mkdir(ROOT_INO, OsStr::new(".simfs"), 0o755, ME)
            .unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    let venv = path(&w, "venv").unwrap().ino;
    w.fs.mkdir(venv, OsStr::new(".simfs"), 0o755, ME).unwrap();
}
