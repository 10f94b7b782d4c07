//! Unit tests of freshness: others' changes to the container reach a mounted index through
//! a refresh, local changes win, open handles keep their version, and the kernel is told
//! exactly what changed.

use crate::world::{fixture, path, read_all, world_on, world_telling, world_with, World};
use crate::write_tests::{drain, fresh, rw, write_file, ME};
use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use simfs::fs::*;
use simfs::index::ingest::{no_progress, write_listing, IngestOptions, Listing};
use simfs::index::refresh::Scope;
use simfs::index::{SourceId, ROOT_INO};
use simfs::kernel::{Kernel, KernelCache};
use simfs::refresh::Report;
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

fn refresh(w: &World, p: &str) -> Report {
    w.fs.refresher().refresh_path(p).unwrap()
}

/// Every entry below the root: (path, kind, mode, owner, size, mtime, links, target,
/// content), as a user would see them through stat, readlink and read.
pub(crate) type Seen = (
    String,
    Kind,
    u32,
    u32,
    u64,
    std::time::SystemTime,
    u32,
    Vec<u8>,
    Vec<u8>,
);

pub(crate) fn tree(w: &World) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((ino, prefix)) = stack.pop() {
        for e in w.fs.index().readdir(ino).unwrap() {
            let p = format!("{prefix}/{}", String::from_utf8_lossy(e.name.as_bytes()));
            let a = e.attr;
            let target = match a.kind {
                Kind::Symlink => w.fs.readlink(a.ino).unwrap(),
                _ => Vec::new(),
            };
            let content = match a.kind {
                Kind::File => read_all(w, &p).unwrap(),
                _ => Vec::new(),
            };
            if a.kind == Kind::Dir {
                stack.push((a.ino, p.clone()));
            }
            let size = if a.kind == Kind::Dir { 0 } else { a.size };
            out.push((
                p, a.kind, a.perm, a.uid, size, a.mtime, a.nlink, target, content,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes `dir/model.pt` with a hard link `best.pt` at the root and a symlink
/// `dir/latest` to it, as a training job leaves a checkpoint.
pub(crate) fn linked_checkpoint(w: &World, dir: &str, dir_ino: u64, data: &[u8]) {
    let f = write_file(w, dir, "model.pt", data);
    w.fs.link(f.ino, ROOT_INO, OsStr::new("best.pt")).unwrap();
    w.fs.symlink(dir_ino, OsStr::new("latest"), b"model.pt", ME)
        .unwrap();
}

/// A read-only mount of `w`'s container with its own cache directory.
fn second_node(store: &Arc<FaultyStore<MemoryStore>>) -> World {
    world_on(
        store.clone(),
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        None,
    )
}

#[test]
fn a_refresh_makes_the_tree_what_a_new_listing_shows() {
    let writer = rw(fixture());
    let reader = second_node(&writer.store);
    let before = tree(&reader);
    // Another node creates, links, chmods, renames and deletes.
    let d = writer
        .fs
        .mkdir(ROOT_INO, OsStr::new("runs"), 0o750, ME)
        .unwrap();
    linked_checkpoint(&writer, "runs", d.ino, b"weights v1");
    let chmod = AttrChanges {
        perm: Some(0o600),
        ..Default::default()
    };
    writer
        .fs
        .setattr(path(&writer, "venv/lib/site.py").unwrap().ino, &chmod)
        .unwrap();
    let venv = path(&writer, "venv").unwrap().ino;
    writer
        .fs
        .rename(
            venv,
            OsStr::new("bin"),
            venv,
            OsStr::new("scripts"),
            RenameMode::Replace,
        )
        .unwrap();
    writer
        .fs
        .unlink(path(&writer, "ckpt").unwrap().ino, OsStr::new("latest.pt"))
        .unwrap();
    drain(&writer);
    assert_eq!(tree(&reader), before, "nothing changes before a refresh");
    let own = refresh(&writer, "");
    assert!(
        !own.changed_anything(),
        "a node's own uploads are no change: {own:?}"
    );

    let r = refresh(&reader, "");
    assert!(r.added > 0 && r.changed > 0 && r.removed > 0, "{r:?}");
    let now = tree(&reader);
    assert_eq!(
        now,
        tree(&fresh(&writer)),
        "the refreshed tree is a new node's tree"
    );
    let best = path(&reader, "best.pt").unwrap();
    assert_eq!(best.nlink, 2);
    assert_eq!(
        best.ino,
        path(&reader, "runs/model.pt").unwrap().ino,
        "one inode"
    );
    assert_eq!(path(&reader, "runs/latest").unwrap().kind, Kind::Symlink);
    assert_eq!(
        reader
            .fs
            .readlink(path(&reader, "runs/latest").unwrap().ino)
            .unwrap(),
        b"model.pt"
    );

    // The writer drops one name of the hard link: the other keeps the data.
    writer.fs.unlink(ROOT_INO, OsStr::new("best.pt")).unwrap();
    drain(&writer);
    refresh(&reader, "");
    assert!(path(&reader, "best.pt").is_err());
    assert_eq!(path(&reader, "runs/model.pt").unwrap().nlink, 1);
    assert_eq!(read_all(&reader, "runs/model.pt").unwrap(), b"weights v1");
    assert_eq!(tree(&reader), tree(&fresh(&writer)));
}

#[test]
fn an_unchanged_container_costs_the_listing_and_changes_nothing() {
    let w = world_with(fixture(), "", 1 << 20);
    let inos: Vec<u64> = ["venv/bin/python3.11", "ckpt/step-100.pt", "empty"]
        .iter()
        .map(|p| path(&w, p).unwrap().ino)
        .collect();
    let before = tree(&w);
    let r = refresh(&w, "");
    assert_eq!((r.added, r.changed, r.removed, r.kept_local), (0, 0, 0, 0));
    assert!(r.list_requests > 0 && r.listed > 0);
    assert_eq!(tree(&w), before);
    let after: Vec<u64> = ["venv/bin/python3.11", "ckpt/step-100.pt", "empty"]
        .iter()
        .map(|p| path(&w, p).unwrap().ino)
        .collect();
    assert_eq!(inos, after, "inode numbers are stable");
}

#[test]
fn a_rewritten_blob_shows_its_new_version_and_an_open_handle_keeps_the_old_one() {
    let mem = MemoryStore::new();
    mem.put("data/shard-0", "version one", &[]);
    let w = world_with(mem, "", 1 << 20);
    let a = path(&w, "data/shard-0").unwrap();
    let fh = w.fs.open(a.ino, false, false).unwrap();
    assert_eq!(w.fs.read(fh, 0, 100).unwrap(), b"version one");
    w.store.inner().put(
        "data/shard-0",
        "version two, longer",
        &[("permissions", "0600")],
    );
    let r = refresh(&w, "");
    // The file, and its directory when the new Last-Modified moves the directory's mtime.
    assert!((1..=2).contains(&r.changed), "{r:?}");
    // The open file keeps its inode (and the kernel its pages); the name has a new one.
    let b = path(&w, "data/shard-0").unwrap();
    assert_ne!(b.ino, a.ino);
    assert_eq!((b.size, b.perm, b.nlink), (19, 0o600, 1));
    assert_eq!(w.fs.getattr(a.ino).unwrap().nlink, 0);
    assert_eq!(
        w.fs.read(fh, 0, 100).unwrap(),
        b"version one",
        "close-to-open"
    );
    w.fs.release(fh).unwrap();
    assert!(
        w.fs.getattr(a.ino).is_err(),
        "the old inode goes with its last handle"
    );
    assert_eq!(
        read_all(&w, "data/shard-0").unwrap(),
        b"version two, longer"
    );
    // Not open: a new version keeps the inode number.
    w.store.inner().put("data/shard-0", "three", &[]);
    refresh(&w, "");
    let c = path(&w, "data/shard-0").unwrap();
    assert_eq!((c.ino, c.size), (b.ino, 5));
    assert_eq!(read_all(&w, "data/shard-0").unwrap(), b"three");
}

#[test]
fn a_deleted_blob_goes_with_the_directories_only_it_implied() {
    let mem = MemoryStore::new();
    mem.put("keep/a", "a", &[]);
    mem.put("gone/deep/x", "x", &[]);
    let w = world_with(mem, "", 1 << 20);
    let x = path(&w, "gone/deep/x").unwrap();
    let fh = w.fs.open(x.ino, false, false).unwrap();
    assert_eq!(w.fs.read(fh, 0, 10).unwrap(), b"x");
    assert!(w.store.inner().remove("gone/deep/x"));
    let r = refresh(&w, "");
    assert_eq!(r.removed, 3, "{r:?}");
    assert!(matches!(path(&w, "gone"), Err(FsError::NotFound)));
    assert_eq!(read_all(&w, "keep/a").unwrap(), b"a");
    assert_eq!(
        w.fs.read(fh, 0, 10).unwrap(),
        b"x",
        "an open handle still reads"
    );
    w.fs.release(fh).unwrap();
    assert_eq!(
        w.fs.getattr(ROOT_INO).unwrap().nlink,
        3,
        "root: . .. and keep"
    );
}

#[test]
fn local_changes_not_yet_uploaded_win_over_the_container() {
    let store = Arc::new(FaultyStore::new(fixture()));
    // Uploads wait an hour: everything below stays pending.
    let w = world_on(
        store.clone(),
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        Some(Duration::from_secs(3600)),
    );
    let site = path(&w, "venv/lib/site.py").unwrap();
    let fh = w.fs.open(site.ino, true, true).unwrap();
    w.fs.write(fh, 0, b"mine").unwrap();
    w.fs.release(fh).unwrap();
    w.fs.unlink(path(&w, "ckpt").unwrap().ino, OsStr::new("step-100.pt"))
        .unwrap();
    w.fs.mkdir(ROOT_INO, OsStr::new("mine"), 0o755, ME).unwrap();
    // Meanwhile others rewrite the file, rewrite the one deleted here, and add a sibling.
    let mem = store.inner();
    mem.put("venv/lib/site.py", "theirs", &[]);
    mem.put("ckpt/step-100.pt", "theirs too", &[]);
    mem.put("venv/lib/new.py", "new", &[]);
    let r = refresh(&w, "");
    assert!(r.kept_local >= 2, "{r:?}");
    assert_eq!(read_all(&w, "venv/lib/site.py").unwrap(), b"mine");
    assert!(path(&w, "ckpt/step-100.pt").is_err(), "not brought back");
    assert_eq!(path(&w, "mine").unwrap().kind, Kind::Dir);
    assert_eq!(
        read_all(&w, "venv/lib/new.py").unwrap(),
        b"new",
        "the rest applies"
    );
}

#[test]
fn a_name_deleted_here_while_the_listing_ran_is_not_brought_back() {
    let w = rw(fixture());
    let index = w.fs.index();
    let watching = index.watch_changes();
    // The listing sees ckpt/step-100.pt ...
    let side = w.state.join("side.db");
    let source = SourceId {
        container_url: "mem://test".into(),
        prefix: String::new(),
    };
    let opts = IngestOptions {
        concurrency: 2,
        defaults: crate::world::defaults(),
    };
    let listing = Listing {
        under: "",
        known_target: &|_, _| None,
    };
    let store: Arc<dyn simfs::blob::BlobStore> = w.store.clone();
    w._rt
        .block_on(write_listing(
            store,
            &source,
            &side,
            &opts,
            &listing,
            &no_progress,
        ))
        .unwrap();
    // ... then this node deletes it and the delete reaches the container, and writes a new
    // file that is uploaded too (the listing never saw it).
    w.fs.unlink(path(&w, "ckpt").unwrap().ino, OsStr::new("step-100.pt"))
        .unwrap();
    write_file(&w, "", "new.txt", b"fresh");
    drain(&w);
    let fresh_index = simfs::index::Index::open_read_only(&side).unwrap();
    let applied = index
        .refresh_from(&fresh_index, &Scope::Dir(Vec::new()), &|_| false, true)
        .unwrap();
    drop(watching);
    assert_eq!(applied.removed, 0, "{applied:?}");
    assert!(path(&w, "ckpt/step-100.pt").is_err());
    assert_eq!(read_all(&w, "new.txt").unwrap(), b"fresh");
}

#[test]
fn a_subtree_refresh_lists_and_changes_only_that_subtree() {
    let mem = MemoryStore::new();
    mem.put("a/1", "1", &[]);
    mem.put("b/1", "1", &[]);
    let w = world_with(mem, "", 1 << 20);
    w.store.inner().put("a/2", "2", &[]);
    w.store.inner().put("b/2", "2", &[]);
    w.store.inner().remove("b/1");
    let r = refresh(&w, "a");
    assert_eq!((r.scope.as_str(), r.added, r.removed), ("a/", 1, 0));
    assert_eq!(read_all(&w, "a/2").unwrap(), b"2");
    assert!(path(&w, "b/2").is_err());
    assert!(path(&w, "b/1").is_ok());
    // A path not on the mount yet: the entry below its deepest existing directory.
    w.store.inner().put("c/d/e", "e", &[]);
    let r = refresh(&w, "c/d/e");
    assert_eq!((r.scope.as_str(), r.added), ("c", 3));
    assert_eq!(read_all(&w, "c/d/e").unwrap(), b"e");
    assert!(
        path(&w, "b/2").is_err(),
        "still outside every scope refreshed"
    );
}

#[test]
fn a_blob_rewritten_elsewhere_is_read_at_its_new_version_instead_of_estale() {
    let mem = MemoryStore::new();
    mem.put("f", "old", &[]);
    let w = world_with(mem, "", 1 << 20);
    w.store.inner().put("f", "new!", &[]);
    // The index still has the old ETag: the download is refused (412), the entry is
    // refreshed, and the handle, which had shown nothing yet, reads the new version.
    let a = path(&w, "f").unwrap();
    let fh = w.fs.open(a.ino, false, false).unwrap();
    assert_eq!(w.fs.read(fh, 0, 100).unwrap(), b"new!");
    w.fs.release(fh).unwrap();
    assert_eq!(path(&w, "f").unwrap().size, 4);
}

#[derive(Default, Clone)]
struct Told(Arc<Mutex<Vec<String>>>);

impl KernelCache for Told {
    fn inval_entry(&self, parent: u64, name: &[u8]) {
        let n = String::from_utf8_lossy(name);
        self.0.lock().unwrap().push(format!("entry {parent}/{n}"));
    }
    fn inval_inode(&self, ino: u64) {
        self.0.lock().unwrap().push(format!("inode {ino}"));
    }
}

#[test]
fn the_kernel_is_told_exactly_what_changed() {
    let mem = MemoryStore::new();
    mem.put("d/keep", "k", &[]);
    mem.put("d/edit", "1", &[]);
    mem.put("other/x", "x", &[]);
    let told = Told::default();
    let store = Arc::new(FaultyStore::new(mem));
    let dir = tempfile::tempdir().unwrap();
    let kernel = Kernel::new(told.clone());
    let w = world_telling(store, dir, "", 1 << 20, None, kernel);
    let d = path(&w, "d").unwrap().ino;
    let edit = path(&w, "d/edit").unwrap().ino;
    refresh(&w, "");
    assert!(
        told.0.lock().unwrap().is_empty(),
        "an unchanged container: nothing"
    );
    w.store.inner().put("d/edit", "22", &[]);
    w.store.inner().put("d/new", "n", &[]);
    refresh(&w, "");
    let mut got = told.0.lock().unwrap().clone();
    got.sort();
    let root = ROOT_INO;
    let mut want = vec![
        format!("entry {d}/new"),
        format!("inode {d}"),
        format!("inode {edit}"),
    ];
    // The directory's mtime changed with its new entry: its parent's view of it too.
    want.push(format!("inode {d}"));
    want.sort();
    want.dedup();
    got.dedup();
    assert_eq!(got, want, "root {root} and other/ untouched");
}

#[test]
fn a_refresh_against_a_dead_service_fails_clearly_and_changes_nothing() {
    let w = world_with(fixture(), "", 1 << 20);
    let before = tree(&w);
    w.store.inner().put("new.txt", "n", &[]);
    w.store.set_offline(true);
    let err = w.fs.refresher().refresh_path("").unwrap_err();
    assert!(err.to_string().contains("listing the container"), "{err}");
    w.store.set_offline(false);
    assert_eq!(tree(&w), before, "nothing applied");
    assert!(w
        .fs
        .index()
        .meta(simfs::refresh::LAST_REFRESH)
        .unwrap()
        .is_none());
    // The next refresh works and brings the change.
    assert_eq!(refresh(&w, "").added, 1);
    assert_eq!(read_all(&w, "new.txt").unwrap(), b"n");
}

/// `rm -rf` of `dir` through the core, deepest entries first.
fn remove_tree(w: &World, parent: u64, name: &str) {
    let a = w.fs.lookup(parent, OsStr::new(name)).unwrap();
    if a.kind == Kind::Dir {
        let names: Vec<String> =
            w.fs.index()
                .readdir(a.ino)
                .unwrap()
                .into_iter()
                .map(|e| String::from_utf8_lossy(e.name.as_bytes()).into_owned())
                .collect();
        for n in names {
            remove_tree(w, a.ino, &n);
        }
        w.fs.rmdir(parent, OsStr::new(name)).unwrap();
    } else {
        w.fs.unlink(parent, OsStr::new(name)).unwrap();
    }
}

/// A world whose namespace changes wait an hour for write-back.
fn held(store: &Arc<FaultyStore<MemoryStore>>) -> World {
    world_on(
        store.clone(),
        tempfile::tempdir().unwrap(),
        "",
        1 << 20,
        Some(Duration::from_secs(3600)),
    )
}

#[test]
fn a_tree_removed_here_stays_gone_while_its_deletions_are_on_their_way() {
    let store = Arc::new(FaultyStore::new(fixture()));
    let w = held(&store);
    remove_tree(&w, ROOT_INO, "ckpt");
    remove_tree(&w, ROOT_INO, "venv");
    let before = tree(&w);
    assert!(
        store.inner().data("ckpt/step-100.pt").is_some()
            && store.inner().data("venv/lib/site.py").is_some(),
        "the deletions have not reached the container yet"
    );
    let r = refresh(&w, "");
    assert_eq!(r.added, 0, "{r:?}");
    assert!(
        path(&w, "ckpt").is_err(),
        "an implied directory is not brought back"
    );
    assert!(path(&w, "venv").is_err(), "nor one with a marker");
    assert_eq!(tree(&w), before);
    drain(&w);
    assert!(store.inner().data("ckpt/step-100.pt").is_none());
    refresh(&w, "");
    assert_eq!(tree(&w), before);
}

#[test]
fn a_file_renamed_here_before_its_blob_moved_is_not_listed_twice() {
    let store = Arc::new(FaultyStore::new(fixture()));
    let w = held(&store);
    let lib = path(&w, "venv/lib").unwrap().ino;
    w.fs.rename(
        lib,
        OsStr::new("site.py"),
        lib,
        OsStr::new("moved.py"),
        RenameMode::Replace,
    )
    .unwrap();
    assert!(store.inner().data("venv/lib/site.py").is_some());
    let r = refresh(&w, "");
    assert_eq!(r.added, 0, "{r:?}");
    assert!(
        path(&w, "venv/lib/site.py").is_err(),
        "the old name stays gone"
    );
    assert_eq!(read_all(&w, "venv/lib/moved.py").unwrap(), b"print('hi')");
    drain(&w);
    assert!(store.inner().data("venv/lib/site.py").is_none());
    assert_eq!(
        store.inner().data("venv/lib/moved.py").unwrap(),
        &b"print('hi')"[..]
    );
}

#[test]
fn a_blob_being_written_here_is_not_taken_for_someone_elses_until_recorded() {
    let w = rw(fixture());
    // Write-back's PUT has landed; its result is not recorded yet (the inode may have been
    // unlinked or renamed meanwhile).
    w.store.inner().put("landed.txt", "x", &[]);
    let writing = w.fs.index().writing(vec!["landed.txt".into()]);
    refresh(&w, "");
    assert!(
        path(&w, "landed.txt").is_err(),
        "not while it is being written"
    );
    drop(writing);
    // Nobody here claims it now: it is someone else's blob.
    refresh(&w, "");
    assert_eq!(read_all(&w, "landed.txt").unwrap(), b"x");
}
