//! Freshness on real mounts: what a second simfs mount (its own cache directory) writes to
//! the container appears on the first within the refresh interval, at once after `simfs
//! refresh`, with the kernel's cached entries, listings and pages invalidated; a file the
//! first mount holds open keeps reading the version it opened.

use crate::harness::*;
use crate::mount;
use crate::write::{empty_container, snapshot};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn write_synced(p: &Path, data: &[u8]) {
    let f = std::fs::File::create(p).unwrap();
    std::io::Write::write_all(&mut &f, data).unwrap();
    // fsync returns once the blob is committed in the container.
    f.sync_all().unwrap();
}

fn simfs_refresh(args: &[&Path]) -> String {
    let out = Command::new(SIMFS)
        .arg("refresh")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "simfs refresh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `cond` holds, up to `limit`; how long it took.
fn within(limit: Duration, cond: impl Fn() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn a_second_mounts_changes_appear_within_the_interval_and_at_once_on_refresh() {
    let az = empty_container("fresh");
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = mount(&az, "fresh", ca.path(), &["--refresh-interval", "2"]);
    let b = mount(
        &az,
        "fresh",
        cb.path(),
        &["--refresh-interval", "0", "--upload-delay", "0"],
    );
    let (ra, rb) = (a.path(), b.path());
    std::fs::create_dir(rb.join("ckpt")).unwrap();
    write_synced(&rb.join("ckpt/step-1.pt"), b"version one");
    // The kernel on A caches the listing and a negative entry for the name to come.
    assert_eq!(std::fs::read_dir(ra).unwrap().count(), 0);
    assert!(!ra.join("ckpt").exists());
    let _ = std::fs::read_dir(ra).unwrap().count();

    // 1. The timer: visible within the interval (2 s, jittered) plus the listing.
    let took = within(Duration::from_secs(20), || {
        std::fs::read(ra.join("ckpt/step-1.pt")).is_ok_and(|d| d == b"version one")
    });
    assert!(took.is_some(), "not visible after 20 s: {}", a.log_text());
    let names: Vec<_> = std::fs::read_dir(ra)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ckpt"], "the cached listing was invalidated");

    // 2. On demand, with A reading the old version through an open handle.
    let mut held = std::fs::File::open(ra.join("ckpt/step-1.pt")).unwrap();
    let mut buf = Vec::new();
    held.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"version one");
    write_synced(&rb.join("ckpt/step-1.pt"), b"version two, longer");
    write_synced(&rb.join("ckpt/step-2.pt"), b"second");
    std::os::unix::fs::symlink("step-2.pt", rb.join("ckpt/latest.pt")).unwrap();
    std::fs::hard_link(rb.join("ckpt/step-2.pt"), rb.join("best.pt")).unwrap();
    std::fs::set_permissions(
        rb.join("ckpt/step-2.pt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    std::fs::create_dir_all(rb.join("logs/run1")).unwrap();
    // Once B's changes are up, a refresh of B finds nothing new: its own uploads (ETags
    // as the upload returned them, metadata as written) match the listing.
    let settled = within(Duration::from_secs(20), || {
        let said = simfs_refresh(&[rb]);
        assert!(
            said.contains(": 0 added, 0 changed, 0 removed"),
            "B's own uploads looked like changes: {said}"
        );
        said.contains(", 0 kept")
    });
    assert!(settled.is_some(), "{}", simfs_refresh(&[rb]));
    let mut b = b;
    unmount_clean(&mut b);
    let said = simfs_refresh(&[ra]);
    assert!(said.contains("added"), "{said}");
    assert_eq!(
        std::fs::read(ra.join("ckpt/step-1.pt")).unwrap(),
        b"version two, longer"
    );
    assert_eq!(
        std::fs::metadata(ra.join("ckpt/step-1.pt")).unwrap().len(),
        19
    );
    assert_eq!(std::fs::read(ra.join("ckpt/latest.pt")).unwrap(), b"second");
    held.seek(SeekFrom::Start(0)).unwrap();
    buf.clear();
    held.read_to_end(&mut buf).unwrap();
    assert_eq!(
        buf, b"version one",
        "the open handle keeps the version it opened"
    );
    drop(held);

    // 3. A refreshed mount shows what a new mount of the container shows.
    let cc = tempfile::tempdir().unwrap();
    let c = mount(&az, "fresh", cc.path(), &["--refresh-interval", "0"]);
    assert_eq!(snapshot(ra), snapshot(c.path()));

    // 4. A deletion, and a subtree refresh of a path that is not there yet.
    let mut b = mount(
        &az,
        "fresh",
        cb.path(),
        &["--refresh-interval", "0", "--upload-delay", "0"],
    );
    std::fs::remove_file(b.path().join("ckpt/step-1.pt")).unwrap();
    std::fs::create_dir_all(b.path().join("new/deep")).unwrap();
    write_synced(&b.path().join("new/deep/file"), b"deep");
    unmount_clean(&mut b);
    let said = simfs_refresh(&[ra, Path::new("new/deep/file")]);
    assert!(said.contains("refreshed /new/deep/file"), "{said}");
    assert_eq!(std::fs::read(ra.join("new/deep/file")).unwrap(), b"deep");
    simfs_refresh(&[&ra.join("ckpt")]);
    assert!(!ra.join("ckpt/step-1.pt").exists());
    let status = Command::new(SIMFS).arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("last refresh") && status.contains("(ckpt/)"),
        "{status}"
    );
}

#[test]
fn a_mount_from_the_published_snapshot_sees_what_a_listing_sees() {
    let az = empty_container("snap");
    let (cw, cp, cs, cl) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut w = mount(&az, "snap", cw.path(), &["--upload-delay", "0"]);
    let r = w.path().to_path_buf();
    std::fs::create_dir_all(r.join("data/train")).unwrap();
    for i in 0..50 {
        std::fs::write(r.join(format!("data/train/shard-{i:03}")), format!("{i}")).unwrap();
    }
    std::os::unix::fs::symlink("train/shard-007", r.join("data/latest")).unwrap();
    std::fs::hard_link(r.join("data/train/shard-001"), r.join("data/first")).unwrap();
    unmount_clean(&mut w);
    let publish = Command::new(SIMFS)
        .args(["index", "publish", "snap", "--cache-dir"])
        .arg(cp.path())
        .env("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&publish.stdout);
    assert!(
        publish.status.success() && said.contains("published"),
        "{said} {}",
        String::from_utf8_lossy(&publish.stderr)
    );
    let from = Mount::start(
        &[
            "snap",
            "--cache-dir",
            cs.path().to_str().unwrap(),
            "--index-from-container",
        ],
        &[
            ("AZURE_STORAGE_CONNECTION_STRING", az.connection_string()),
            ("SIMFS_LOG", "info".into()),
        ],
    )
    .expect("mount");
    assert!(
        from.log_text().contains("started from the index snapshot"),
        "{}",
        from.log_text()
    );
    let listed = mount(&az, "snap", cl.path(), &[]);
    assert_eq!(snapshot(from.path()), snapshot(listed.path()));
    assert!(
        !from.path().join(".simfs").exists(),
        "the snapshot itself is hidden"
    );
    assert_eq!(
        std::fs::read(from.path().join("data/latest")).unwrap(),
        b"7"
    );
}

#[test]
fn a_blob_rewritten_elsewhere_is_read_at_its_new_version_without_a_hang() {
    let az = empty_container("stale");
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut b = mount(
        &az,
        "stale",
        cb.path(),
        &["--refresh-interval", "0", "--upload-delay", "0"],
    );
    write_synced(&b.path().join("f"), b"old version");
    let a = mount(&az, "stale", ca.path(), &["--refresh-interval", "0"]);
    let f = a.path().join("f");
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 11);
    write_synced(&b.path().join("f"), b"the new version, longer");
    unmount_clean(&mut b);
    // A's index still has the old ETag: the download is refused (412), simfs refreshes the
    // entry while the kernel waits on that very read, and tells the kernel afterwards.
    let (tx, rx) = std::sync::mpsc::channel();
    let g = f.clone();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(&g).map_err(|e| e.to_string()));
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the read answers instead of hanging");
    assert!(first.is_ok(), "{first:?}");
    let new = within(Duration::from_secs(10), || {
        std::fs::read(&f).is_ok_and(|d| d == b"the new version, longer")
    });
    assert!(new.is_some(), "now {:?}", std::fs::read(&f));
}
