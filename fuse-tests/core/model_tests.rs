//! Model-based test: random sequences of namespace and data operations run against simfs
//! (with the background write-back running and a store latency, so uploads race with the
//! next operations) and against a plain in-memory model of a POSIX directory, compared
//! after every step; a crash-and-remount is one of the operations, and at the end a fresh
//! node built from the container alone must show the same tree. One mount's own operations
//! must never conflict with each other: no `.conflict-` name may ever appear, and no close
//! or fsync may fail.
//!
//! `SIMFS_MODEL_CASES` and `SIMFS_MODEL_OPS` scale it up (CI's heavier stage).

use crate::world::{world_async, world_on, World};
use proptest::prelude::*;
use simfs::blob::faulty::FaultyStore;
use simfs::blob::memory::MemoryStore;
use simfs::fs::write::Caller;
use simfs::fs::*;
use simfs::index::ROOT_INO;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

#[derive(Clone, Debug)]
enum Op {
    /// Open (creating if missing), write at `at` (clamped to the size), close.
    Write {
        f: usize,
        at: usize,
        data: Vec<u8>,
    },
    Unlink(usize),
    Rename(usize, usize),
    Link(usize, usize),
    Truncate(usize, usize),
    Chmod(usize, u32),
    Fsync(usize),
    Mkdir(usize),
    Rmdir(usize),
    /// kill -9 and mount again from the same cache directory.
    Crash,
}

/// A few bytes mostly; sometimes a checkpoint of five blocks and more (the test world
/// uploads files over 64 KiB in 16 KiB blocks), which is staged while it is written.
fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        5 => proptest::collection::vec(any::<u8>(), 1..24),
        1 => (70_000..90_000usize, any::<u8>()).prop_map(|(n, seed)| {
            (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..NAMES.len();
    prop_oneof![
        6 => (f.clone(), 0..40usize, data()).prop_map(|(f, at, data)| Op::Write { f, at, data }),
        3 => f.clone().prop_map(Op::Unlink),
        3 => (f.clone(), f.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (f.clone(), f.clone()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => (f.clone(), 0..30usize).prop_map(|(a, n)| Op::Truncate(a, n)),
        1 => (f.clone(), prop_oneof![Just(0o600u32), Just(0o644), Just(0o755)])
            .prop_map(|(a, m)| Op::Chmod(a, m)),
        1 => f.clone().prop_map(Op::Fsync),
        1 => f.clone().prop_map(Op::Mkdir),
        1 => f.clone().prop_map(Op::Rmdir),
        1 => Just(Op::Crash),
    ]
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileData {
    data: Vec<u8>,
    mode: u32,
}

#[derive(Clone, Debug)]
enum Node {
    File(Rc<RefCell<FileData>>),
    Dir(u32),
}

/// What a POSIX directory of files and empty subdirectories does.
#[derive(Default)]
struct Model {
    names: BTreeMap<&'static str, Node>,
}

impl Model {
    /// Applies `op`; returns the errno it fails with (0: success).
    fn apply(&mut self, op: &Op) -> i32 {
        match op {
            Op::Write { f, at, data } => match self.names.get(NAMES[*f]) {
                Some(Node::Dir(_)) => libc::EISDIR,
                Some(Node::File(d)) => {
                    let mut d = d.borrow_mut();
                    let at = (*at).min(d.data.len());
                    let end = at + data.len();
                    if d.data.len() < end {
                        d.data.resize(end, 0);
                    }
                    d.data[at..end].copy_from_slice(data);
                    0
                }
                None => {
                    let file = FileData {
                        data: data.clone(),
                        mode: 0o640,
                    };
                    self.names
                        .insert(NAMES[*f], Node::File(Rc::new(RefCell::new(file))));
                    0
                }
            },
            Op::Unlink(f) => match self.names.get(NAMES[*f]) {
                None => libc::ENOENT,
                Some(Node::Dir(_)) => libc::EISDIR,
                Some(Node::File(_)) => {
                    self.names.remove(NAMES[*f]);
                    0
                }
            },
            Op::Rename(a, b) => {
                let (from, to) = (NAMES[*a], NAMES[*b]);
                let Some(src) = self.names.get(from).cloned() else {
                    return libc::ENOENT;
                };
                match (&src, self.names.get(to)) {
                    _ if from == to => return 0,
                    (Node::File(x), Some(Node::File(y))) if Rc::ptr_eq(x, y) => return 0,
                    (Node::File(_), Some(Node::Dir(_))) => return libc::EISDIR,
                    (Node::Dir(_), Some(Node::File(_))) => return libc::ENOTDIR,
                    _ => {}
                }
                self.names.remove(from);
                self.names.insert(to, src);
                0
            }
            Op::Link(a, b) => match (
                self.names.get(NAMES[*a]).cloned(),
                self.names.get(NAMES[*b]),
            ) {
                (None, _) => libc::ENOENT,
                (Some(_), Some(_)) => libc::EEXIST,
                (Some(Node::Dir(_)), None) => libc::EPERM,
                (Some(n), None) => {
                    self.names.insert(NAMES[*b], n);
                    0
                }
            },
            Op::Truncate(f, n) => match self.names.get(NAMES[*f]) {
                None => libc::ENOENT,
                Some(Node::Dir(_)) => libc::EISDIR,
                Some(Node::File(d)) => {
                    d.borrow_mut().data.resize(*n, 0);
                    0
                }
            },
            Op::Chmod(f, m) => match self.names.get_mut(NAMES[*f]) {
                None => libc::ENOENT,
                Some(Node::Dir(mode)) => {
                    *mode = *m;
                    0
                }
                Some(Node::File(d)) => {
                    d.borrow_mut().mode = *m;
                    0
                }
            },
            Op::Fsync(f) => match self.names.get(NAMES[*f]) {
                None => libc::ENOENT,
                Some(_) => 0,
            },
            Op::Mkdir(f) => match self.names.get(NAMES[*f]) {
                Some(_) => libc::EEXIST,
                None => {
                    self.names.insert(NAMES[*f], Node::Dir(0o755));
                    0
                }
            },
            Op::Rmdir(f) => match self.names.get(NAMES[*f]) {
                None => libc::ENOENT,
                Some(Node::File(_)) => libc::ENOTDIR,
                Some(Node::Dir(_)) => {
                    self.names.remove(NAMES[*f]);
                    0
                }
            },
            Op::Crash => 0,
        }
    }
}

/// A read-write mount with its background write-back thread.
struct Mount {
    // Stopped before the world (and its runtime) goes.
    _background: simfs::writeback::Background,
    w: World,
}

fn mount(store: Arc<FaultyStore<MemoryStore>>, dir: tempfile::TempDir) -> Mount {
    // The default mount: close only journals, the background uploads at once.
    let w = world_async(store, dir, Duration::ZERO);
    let background = w.wb().start();
    Mount {
        w,
        _background: background,
    }
}

fn errno_of<T>(r: FsResult<T>) -> i32 {
    r.err().map_or(0, |e| e.errno())
}

/// Runs `op` on simfs; returns its errno (0: success).
fn run(w: &World, op: &Op) -> i32 {
    let fs = &w.fs;
    let name = |i: &usize| OsStr::new(NAMES[*i]);
    match op {
        Op::Write { f, at, data } => {
            let (ino, fh) = match fs.lookup(ROOT_INO, name(f)) {
                Ok(a) if a.kind == Kind::Dir => return libc::EISDIR,
                Ok(a) => match fs.open(a.ino, true, false) {
                    Ok(fh) => (a.ino, fh),
                    Err(e) => return e.errno(),
                },
                Err(_) => match fs.create(ROOT_INO, name(f), 0o640, ME) {
                    Ok((a, fh)) => (a.ino, fh),
                    Err(e) => return e.errno(),
                },
            };
            let size = fs.getattr(ino).map(|a| a.size).unwrap_or(0);
            let at = (*at as u64).min(size);
            // In 4 KiB writes, as a writer streams a file.
            let wrote = data
                .chunks(4096)
                .enumerate()
                .map(|(i, c)| errno_of(fs.write(fh, at + (i * 4096) as u64, c)))
                .find(|e| *e != 0)
                .unwrap_or(0);
            let flushed = fs.flush(fh);
            if let Err(e) = &flushed {
                eprintln!("close of {}: {e}", NAMES[*f]);
            }
            let flushed = errno_of(flushed);
            let released = errno_of(fs.release(fh));
            [wrote, flushed, released]
                .into_iter()
                .find(|e| *e != 0)
                .unwrap_or(0)
        }
        Op::Unlink(f) => errno_of(fs.unlink(ROOT_INO, name(f))),
        Op::Rename(a, b) => {
            errno_of(fs.rename(ROOT_INO, name(a), ROOT_INO, name(b), RenameMode::Replace))
        }
        Op::Link(a, b) => match fs.lookup(ROOT_INO, name(a)) {
            Ok(x) => errno_of(fs.link(x.ino, ROOT_INO, name(b))),
            Err(e) => e.errno(),
        },
        Op::Truncate(f, n) => match fs.lookup(ROOT_INO, name(f)) {
            Ok(x) => errno_of(fs.setattr(
                x.ino,
                &AttrChanges {
                    size: Some(*n as u64),
                    ..Default::default()
                },
            )),
            Err(e) => e.errno(),
        },
        Op::Chmod(f, m) => match fs.lookup(ROOT_INO, name(f)) {
            Ok(x) => errno_of(fs.setattr(
                x.ino,
                &AttrChanges {
                    perm: Some(*m),
                    ..Default::default()
                },
            )),
            Err(e) => e.errno(),
        },
        Op::Fsync(f) => match fs.lookup(ROOT_INO, name(f)) {
            Ok(x) => {
                let r = fs.fsync(x.ino);
                if let Err(e) = &r {
                    eprintln!("fsync of {}: {e}", NAMES[*f]);
                }
                errno_of(r)
            }
            Err(e) => e.errno(),
        },
        Op::Mkdir(f) => errno_of(fs.mkdir(ROOT_INO, name(f), 0o755, ME)),
        Op::Rmdir(f) => errno_of(fs.rmdir(ROOT_INO, name(f))),
        Op::Crash => 0,
    }
}

/// The tree simfs shows equals the model's: names, kinds, modes, contents, link counts.
fn compare(w: &World, model: &Model, step: &str) {
    let fh = w.fs.opendir(ROOT_INO).unwrap();
    let listed: Vec<String> =
        w.fs.read_dir_all(fh)
            .unwrap()
            .iter()
            .skip(2)
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
    w.fs.releasedir(fh);
    let expected: Vec<String> = model.names.keys().map(|k| k.to_string()).collect();
    assert_eq!(listed, expected, "names after {step}");
    for (name, node) in &model.names {
        let a = w.fs.lookup(ROOT_INO, OsStr::new(name)).unwrap();
        match node {
            Node::Dir(mode) => {
                assert_eq!(a.kind, Kind::Dir, "{name} after {step}");
                assert_eq!(a.perm, *mode, "mode of {name} after {step}");
            }
            Node::File(d) => {
                let d = d.borrow();
                assert_eq!(a.kind, Kind::File, "{name} after {step}");
                assert_eq!(a.perm, d.mode, "mode of {name} after {step}");
                let links = model
                    .names
                    .values()
                    .filter(|n| matches!(n, Node::File(x) if std::ptr::eq(x.as_ptr(), &*d)))
                    .count();
                assert_eq!(a.nlink as usize, links, "links of {name} after {step}");
                let fh = w.fs.open(a.ino, false, false).unwrap();
                let mut got = Vec::new();
                loop {
                    let part = w.fs.read(fh, got.len() as u64, 1 << 16).unwrap();
                    if part.is_empty() {
                        break;
                    }
                    got.extend_from_slice(&part);
                }
                w.fs.release(fh).unwrap();
                assert_eq!(got, d.data, "content of {name} after {step}");
            }
        }
    }
}

fn check(ops: &[Op], latency: Duration) {
    let store = Arc::new(FaultyStore::new(MemoryStore::new()));
    let mut m = Some(mount(store.clone(), tempfile::tempdir().unwrap()));
    m.as_ref().unwrap().w.store.set_latency(latency);
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let step = format!("step {i}: {op:?}");
        if let Op::Crash = op {
            let Mount { w, _background } = m.take().unwrap();
            drop(_background);
            m = Some(mount(store.clone(), w.crash()));
        } else {
            let want = model.apply(op);
            let got = run(&m.as_ref().unwrap().w, op);
            assert_eq!(got, want, "errno of {step}");
        }
        compare(&m.as_ref().unwrap().w, &model, &step);
    }
    let Mount { w, _background } = m.take().unwrap();
    drop(_background);
    w.store.set_latency(Duration::ZERO);
    assert_eq!(w.wb().drain(true, |_| {}).unwrap(), 0, "everything uploads");
    crate::write_tests::no_conflicts(&w);
    let fresh = world_on(store, tempfile::tempdir().unwrap(), "", 1 << 20, None);
    compare(&fresh, &model, "a fresh node");
}

fn env(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env("SIMFS_MODEL_CASES", 24),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operations_with_background_uploads_match_a_posix_model(
        ops in proptest::collection::vec(op(), 1..env("SIMFS_MODEL_OPS", 40) as usize)
    ) {
        check(&ops, Duration::from_millis(2));
    }
}
