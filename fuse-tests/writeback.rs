//! Write-back on real mounts: close is local and journaled, `-o sync` makes it wait, the
//! window of uncommitted data is bounded, `simfs sync PATH` is a barrier for PATH only, and
//! a daemon killed right after its last close loses nothing.

use crate::harness::*;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

fn mount_via(proxy: &FaultProxy, container: &str, cache: &Path, extra: &[&str]) -> Mount {
    mount_with(proxy.connection_string(), container, cache, extra)
}

/// PUTs (whole blobs, blocks and block lists) whose path holds `part` (a `/` in a blob name
/// is `%2F` there) are held until the
/// rules change: a service that takes as long as the test wants.
fn hold_puts(proxy: &FaultProxy, part: &str) {
    proxy.set(&format!(
        r#"{{"rules": [{{"method": "PUT", "path": "{part}", "fault": "hang"}}], "log_all": true}}"#
    ));
}

/// Writes `data` to `path` and closes it on a thread of its own.
fn close_in_background(
    path: std::path::PathBuf,
    data: &'static [u8],
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(data).unwrap();
        drop(f);
    })
}

/// `simfs sync PATH`, which must succeed.
fn finishes_within(t: &std::thread::JoinHandle<()>, d: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < d {
        if t.is_finished() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    t.is_finished()
}

#[test]
fn close_returns_before_the_service_answers_and_a_sync_mount_waits_for_it() {
    let az = crate::write::empty_container("close-modes");
    let proxy = FaultProxy::start(&az);
    for (extra, waits) in [(&[][..], false), (&["--sync"][..], true)] {
        let cache = tempfile::tempdir().unwrap();
        let mut m = mount_via(&proxy, "close-modes", cache.path(), extra);
        let dir = m.path().join(if waits { "s" } else { "a" });
        std::fs::create_dir(&dir).unwrap();
        hold_puts(&proxy, "%2Fslow");
        let closer = close_in_background(dir.join("slow"), b"held by the service");
        let returned = finishes_within(&closer, Duration::from_millis(800));
        assert_eq!(
            returned, !waits,
            "close with {extra:?} returned before the service answered: {returned}"
        );
        proxy.set("{}");
        closer.join().unwrap();
        unmount_clean(&mut m);
    }
    let cache = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "close-modes", cache.path(), &[]);
    for d in ["a", "s"] {
        assert_eq!(
            std::fs::read(n.path().join(d).join("slow")).unwrap(),
            b"held by the service"
        );
    }
}

/// The files `simfs status` says are waiting for upload on the mount at `mountpoint`.
fn pending_files_in_status(mountpoint: &Path) -> u64 {
    let out = std::process::Command::new(SIMFS)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let ours = text
        .split_inclusive('\n')
        .skip_while(|l| l.trim_end() != mountpoint.display().to_string())
        .find_map(|l| l.trim().strip_prefix("pending uploads"))
        .unwrap_or_else(|| panic!("no pending uploads for {}: {text}", mountpoint.display()));
    // "N changes; F files (M MiB) of data; ..."
    ours.split(';')
        .nth(1)
        .and_then(|f| f.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable pending uploads: {ours}"))
}

#[test]
fn past_max_pending_files_the_next_close_waits_for_uploads() {
    let az = crate::write::empty_container("window");
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(
        &proxy,
        "window",
        cache.path(),
        &["--max-pending-files", "3"],
    );
    hold_puts(&proxy, "/held-");
    for i in 0..3 {
        let c = close_in_background(m.path().join(format!("held-{i}")), b"x");
        assert!(
            finishes_within(&c, Duration::from_secs(5)),
            "within the window"
        );
    }
    let fourth = close_in_background(m.path().join("held-3"), b"y");
    assert!(
        !finishes_within(&fourth, Duration::from_millis(800)),
        "three files wait for the service: the fourth close waits too"
    );
    // Only the daemon can read its index: `simfs status` asks it, and it answers while its
    // uploads hang and a close waits.
    let files = pending_files_in_status(m.path());
    assert!(files >= 3, "simfs status shows {files} files waiting");
    proxy.set("{}");
    assert!(
        finishes_within(&fourth, Duration::from_secs(20)),
        "uploads made room"
    );
    unmount_clean(&mut m);
}

#[test]
fn simfs_sync_of_a_path_commits_that_path_and_waits_for_nothing_else() {
    let az = crate::write::empty_container("sync-path");
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "sync-path", cache.path(), &[]);
    let (ckpt, other) = (m.path().join("ckpt"), m.path().join("other"));
    std::fs::create_dir(&ckpt).unwrap();
    std::fs::create_dir(&other).unwrap();
    hold_puts(&proxy, "other%2F");
    std::fs::write(other.join("held"), "waits for the service").unwrap();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(ckpt.join("model.pt"), &data).unwrap();
    let start = Instant::now();
    simfs_sync(&ckpt);
    assert!(start.elapsed() < Duration::from_secs(30));
    // Committed: a node with an empty cache reads it now, while other/ is still held.
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "sync-path", fresh.path(), &[]);
    assert_eq!(std::fs::read(n.path().join("ckpt/model.pt")).unwrap(), data);
    assert!(
        !n.path().join("other/held").exists(),
        "other/ was not waited for: {:?}",
        proxy.injected()
    );
    drop(n);
    proxy.set("{}");
    // (The mount, not `simfs sync` of every mount: other tests' mounts may be held.)
    simfs_sync(m.path());
    unmount_clean(&mut m);
}

#[test]
fn a_thousand_files_closed_right_before_a_sigkill_all_reach_a_fresh_node() {
    let az = crate::write::empty_container("kill-after-close");
    let cache = tempfile::tempdir().unwrap();
    let mut m = crate::mount(&az, "kill-after-close", cache.path(), &[]);
    let root = m.path().to_path_buf();
    let body = |i: usize| format!("file {i}: {}", "x".repeat(i % 97)).into_bytes();
    for d in 0..10 {
        std::fs::create_dir(root.join(format!("d{d}"))).unwrap();
    }
    for i in 0..1000 {
        // As editors and pip do: a temporary name, then the final one.
        let tmp = root.join(format!("d{}/.tmp-{i}", i % 10));
        std::fs::write(&tmp, body(i)).unwrap();
        std::fs::rename(&tmp, root.join(format!("d{}/f{i}", i % 10))).unwrap();
    }
    let mut child = m.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    m.unmount();
    // Same cache directory: the journal has all of it; unmount drains.
    let mut again = crate::mount(&az, "kill-after-close", cache.path(), &[]);
    unmount_clean(&mut again);
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "kill-after-close", fresh.path(), &[]);
    for i in 0..1000 {
        let p = n.path().join(format!("d{}/f{i}", i % 10));
        assert_eq!(std::fs::read(&p).unwrap(), body(i), "{}", p.display());
        assert!(!n.path().join(format!("d{}/.tmp-{i}", i % 10)).exists());
    }
}

/// A daemon started under a soft limit of 256 open files (systemd's is 1,024) holds 600
/// files open at once, as a build or a data loader may: it raises its own limit.
#[test]
fn a_mount_started_under_a_low_open_files_limit_holds_hundreds_of_files_open() {
    let az = crate::write::empty_container("many-open");
    let cache = tempfile::tempdir().unwrap();
    let args = ["many-open", "--cache-dir", cache.path().to_str().unwrap()];
    let env = [("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())];
    let mut m = Mount::start_with_open_files(&args, &env, 256).expect("mount");
    let root = m.path().to_path_buf();
    let mut open = Vec::new();
    for i in 0..600 {
        let mut f = std::fs::File::create(root.join(format!("f{i}")))
            .unwrap_or_else(|e| panic!("create f{i} with {i} files open: {e}"));
        writeln!(f, "file {i}").unwrap();
        open.push(f);
    }
    drop(open);
    simfs_sync(&root);
    unmount_clean(&mut m);
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "many-open", fresh.path(), &[]);
    for i in 0..600 {
        let got = std::fs::read_to_string(n.path().join(format!("f{i}"))).unwrap();
        assert_eq!(got, format!("file {i}\n"));
    }
}

/// An empty container `name` behind a proxy that logs every request (what
/// `staged_block_ids` reads).
pub(crate) fn logged_container(name: &str) -> (Azurite, FaultProxy) {
    let az = crate::write::empty_container(name);
    let proxy = FaultProxy::start(&az);
    proxy.set(r#"{"log_all": true}"#);
    (az, proxy)
}

/// Waits (at most a minute) until `n` distinct blocks were staged through `proxy`.
pub(crate) fn waits_for_blocks(proxy: &FaultProxy, n: usize) {
    let start = Instant::now();
    while staged_block_ids(proxy).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "staged: {:?}",
            staged_block_ids(proxy)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The bytes the PUTs through `proxy` carried (blobs, blocks and block lists).
fn bytes_put(proxy: &FaultProxy) -> u64 {
    proxy
        .injected()
        .iter()
        .filter(|l| l.contains(" PUT "))
        .filter_map(|l| l.rsplit(" bytes=").next()?.trim().parse::<u64>().ok())
        .sum()
}

/// The distinct block ids staged through `proxy` (Put Block, not Put Block List), decoded,
/// in the order first seen.
pub(crate) fn staged_block_ids(proxy: &FaultProxy) -> Vec<String> {
    use base64::Engine;
    let mut ids: Vec<String> = Vec::new();
    for line in proxy.injected() {
        if !(line.contains(" PUT ") && line.contains("comp=block")) || line.contains("blocklist") {
            continue;
        }
        let Some(raw) = line.split("blockid=").nth(1) else {
            continue;
        };
        let raw = raw.split(['&', ' ']).next().unwrap_or_default();
        let raw = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let id = base64::engine::general_purpose::STANDARD
            .decode(raw.as_bytes())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|_| raw.into_owned());
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

#[test]
fn a_streamed_checkpoint_stages_each_block_once_and_a_rewritten_block_again() {
    let (az, proxy) = logged_container("stream");
    let cache = tempfile::tempdir().unwrap();
    // Write-back's own decisions are logged, for a failure to explain itself.
    let mut m = Mount::start(
        // (Not staged for pauses: a writer held up on a loaded machine would stage a
        // partial block, and the count here pins the sequential writer's.)
        &[
            "stream",
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--stage-when-quiet",
            "0",
        ],
        &[
            ("AZURE_STORAGE_CONNECTION_STRING", proxy.connection_string()),
            ("SIMFS_LOG", "warn,simfs::writeback=debug".into()),
        ],
    )
    .expect("mount");
    // Distinct block ids staged: a request the client repeated (its answer lost) stages
    // the same id again and is not a second staging.
    let ids = || staged_block_ids(&proxy);
    let blocks = || ids().len();
    // Eight whole 8 MiB blocks and a 1 MiB tail, written as a training loop saves.
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 239) as u8).collect();
    let path = m.path().join("step-100.pt");
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..65 {
        f.write_all(&mib).unwrap();
    }
    waits_for_blocks(&proxy, 8);
    assert_eq!(
        blocks(),
        8,
        "the finished blocks, staged while the file is open: {:?}",
        ids()
    );
    // A block rewritten after it was staged.
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"rewritten", 4096).unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        blocks(),
        10,
        "block 0 again and the tail; no other block twice: {:?}",
        ids()
    );
    drop(f);
    unmount_clean(&mut m);
    let mut want = Vec::with_capacity(65 << 20);
    for _ in 0..65 {
        want.extend_from_slice(&mib);
    }
    want[4096..4105].copy_from_slice(b"rewritten");
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "stream", fresh.path(), &[]);
    assert!(std::fs::read(n.path().join("step-100.pt")).unwrap() == want);
}

#[test]
fn a_writer_that_pauses_before_its_fsync_has_its_tail_staged_and_the_fsync_only_commits() {
    // git's index-pack writes its pack, resolves deltas, then fsyncs the pack; a trainer
    // saves, then syncs. Both ways of writing: through simfs (write-only, seen) and read-write
    // (written by the kernel in place where it can, looked at).
    let (az, proxy) = logged_container("quiet");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "quiet", cache.path(), &[]);
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 229) as u8).collect();
    let mut want = Vec::new();
    for _ in 0..11 {
        want.extend_from_slice(&mib);
    }
    let mut written = Vec::new();
    for (name, read_write) in [("seen.pack", false), ("in-place.pack", true)] {
        let before = staged_block_ids(&proxy).len();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(read_write)
            .open(m.path().join(name))
            .unwrap();
        f.write_all(&want).unwrap();
        // The whole 8 MiB block, and the 3 MiB tail once the writer is quiet.
        waits_for_blocks(&proxy, before + 2);
        let ids = staged_block_ids(&proxy);
        f.sync_all().unwrap();
        assert_eq!(
            staged_block_ids(&proxy),
            ids,
            "{name}: the fsync staged nothing more"
        );
        // Appended after its tail was staged: the next fsync sends only what was added,
        // as a block of its own after the staged part.
        let sent = bytes_put(&proxy);
        f.write_all(b"appended").unwrap();
        f.sync_all().unwrap();
        assert_eq!(
            staged_block_ids(&proxy).len(),
            ids.len() + 1,
            "{name}: one block for the appended bytes"
        );
        assert!(
            bytes_put(&proxy) - sent < 64 << 10,
            "{name}: the staged part was not sent again ({} bytes)",
            bytes_put(&proxy) - sent
        );
        written.push((name, f));
    }
    want.extend_from_slice(b"appended");
    drop(written);
    unmount_clean(&mut m);
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "quiet", fresh.path(), &[]);
    for name in ["seen.pack", "in-place.pack"] {
        assert!(
            std::fs::read(n.path().join(name)).unwrap() == want,
            "{name} reads back whole on a fresh node"
        );
    }
}

#[test]
fn a_pack_written_in_place_fsynced_and_renamed_into_place_goes_up_once() {
    // git's index-pack: a read-write create (written by the kernel in place where it can),
    // written, fsynced and closed, then renamed to its final name. The close takes its writes
    // in again; the copy still holds what the fsync committed, so the rename is a copy made
    // by the service, and no byte of the pack is sent again.
    let (az, proxy) = logged_container("packs");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "packs", cache.path(), &[]);
    let want: Vec<u8> = (0..11u32 << 20).map(|i| (i % 227) as u8).collect();
    let tmp = m.path().join("tmp_pack_1");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)
        .unwrap();
    f.write_all(&want).unwrap();
    f.sync_all().unwrap();
    let sent = bytes_put(&proxy);
    drop(f);
    std::fs::rename(&tmp, m.path().join("pack-1.pack")).unwrap();
    simfs_sync(m.path());
    assert!(
        bytes_put(&proxy) - sent < 64 << 10,
        "the pack went up again: {} bytes after its fsync",
        bytes_put(&proxy) - sent
    );
    unmount_clean(&mut m);
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "packs", fresh.path(), &[]);
    assert!(std::fs::read(n.path().join("pack-1.pack")).unwrap() == want);
    assert!(!n.path().join("tmp_pack_1").exists());
}

#[test]
fn a_file_fsynced_as_it_grows_stages_each_block_once_across_the_fsyncs() {
    // Azurite, like the service, takes a block list naming blocks of the previous commit:
    // the second fsync stages what was written since the first, nothing before it.
    let (az, proxy) = logged_container("grow");
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "grow", cache.path(), &["--stage-when-quiet", "0"]);
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 233) as u8).collect();
    let mut f = std::fs::File::create(m.path().join("train.log")).unwrap();
    for _ in 0..17 {
        f.write_all(&mib).unwrap();
    }
    f.sync_all().unwrap();
    let first = staged_block_ids(&proxy);
    assert_eq!(
        first.len(),
        3,
        "two whole 8 MiB blocks and the tail: {first:?}"
    );
    for _ in 17..33 {
        f.write_all(&mib).unwrap();
    }
    f.sync_all().unwrap();
    let all = staged_block_ids(&proxy);
    assert_eq!(
        all.len(),
        6,
        "the block the tail grew into, the next, and the new tail: {all:?}"
    );
    drop(f);
    unmount_clean(&mut m);
    assert_eq!(
        staged_block_ids(&proxy).len(),
        6,
        "a close after the fsync, with nothing written between, stages nothing"
    );
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "grow", fresh.path(), &[]);
    let got = std::fs::read(n.path().join("train.log")).unwrap();
    assert!(got.len() == 33 << 20 && got.chunks(1 << 20).all(|c| c == &mib[..]));
}

#[test]
fn a_child_process_closing_its_copy_of_a_writers_descriptor_does_not_finish_the_file() {
    // A process writing a file starts another (a shell command, a dataloader worker): the
    // child gets a copy of every descriptor and closes it at its exec, and the kernel
    // flushes the file as for a close. The writer is not done: nothing is uploaded until
    // its own close.
    let az = crate::write::empty_container("forked");
    let proxy = FaultProxy::start(&az);
    proxy.set(r#"{"log_all": true}"#);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "forked", cache.path(), &["--upload-delay", "0"]);
    let puts = || {
        proxy
            .injected()
            .iter()
            .filter(|l| l.contains(" PUT ") && l.contains("log.txt"))
            .count()
    };
    let mut f = std::fs::File::create(m.path().join("log.txt")).unwrap();
    f.write_all(b"first line\n").unwrap();
    for _ in 0..3 {
        let ok = std::process::Command::new("true").status().unwrap();
        assert!(ok.success());
    }
    // What the background would have had time to upload, had it taken those for closes.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(puts(), 0, "uploaded while its writer still writes");
    f.write_all(b"second line\n").unwrap();
    drop(f);
    let start = Instant::now();
    while puts() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never uploaded after its close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    unmount_clean(&mut m);
    let fresh = tempfile::tempdir().unwrap();
    let n = crate::mount(&az, "forked", fresh.path(), &[]);
    assert_eq!(
        std::fs::read_to_string(n.path().join("log.txt")).unwrap(),
        "first line\nsecond line\n"
    );
}
