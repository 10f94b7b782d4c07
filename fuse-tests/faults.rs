//! Faults between the mount and the service, injected by `fault_proxy.py`: every one is
//! either retried to success or surfaces as EIO with nothing lost, and the journal
//! converges once the fault stops.

use crate::harness::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn mount_via(proxy: &FaultProxy, container: &str, cache: &Path, extra: &[&str]) -> Mount {
    mount_with(proxy.connection_string(), container, cache, extra)
}

#[test]
fn a_truncated_answer_is_retried_and_the_file_reads_whole() {
    let (az, _fx) = crate::seeded("trunc", 2, 3);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let m = mount_via(&proxy, "trunc", cache.path(), &[]);
    proxy.set(
        r#"{"rules": [{"method": "GET", "path": "large.bin", "fault": "truncate", "times": 2}]}"#,
    );
    let got = std::fs::read(m.path().join("big/large.bin")).unwrap();
    assert_eq!(got, crate::big_expected(3));
    assert_eq!(proxy.injected().len(), 2, "{:?}", proxy.injected());
}

#[test]
fn answers_lost_after_the_service_committed_converge_without_conflicts() {
    let (az, _fx) = crate::seeded("lost", 2, 0);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "lost", cache.path(), &["--upload-delay", "0.2"]);
    // Every first PUT of a name is carried out, and its answer lost.
    proxy.set(
        r#"{"rules": [
            {"method": "PUT", "path": "ckpt", "fault": "reset_after", "times": 6},
            {"method": "PUT", "path": "newdir", "fault": "reset_after", "times": 1}]}"#,
    );
    std::fs::create_dir(m.path().join("newdir")).unwrap();
    for i in 0..3 {
        let p = m.path().join(format!("ckpt-{i}.pt"));
        // close() either succeeds (the retry found its own blob) or fails with EIO (kept
        // for the background): never a conflict, never lost.
        match std::fs::write(&p, vec![i as u8; 100_000 + i]) {
            Ok(()) => {}
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
        }
    }
    std::fs::rename(
        m.path().join("ckpt-0.pt"),
        m.path().join("newdir/ckpt-0.pt"),
    )
    .unwrap();
    unmount_clean(&mut m);
    assert!(!proxy.injected().is_empty());
    // A fresh node sees exactly what was written, and no conflict copy.
    proxy.set("{}");
    let fresh = tempfile::tempdir().unwrap();
    let n = mount_via(&proxy, "lost", fresh.path(), &[]);
    let names: Vec<_> = walk(n.path())
        .iter()
        .map(|p| p.strip_prefix(n.path()).unwrap().display().to_string())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".conflict-")), "{names:?}");
    assert_eq!(
        std::fs::read(n.path().join("newdir/ckpt-0.pt")).unwrap(),
        vec![0u8; 100_000]
    );
    for i in 1..3 {
        let p = n.path().join(format!("ckpt-{i}.pt"));
        assert_eq!(std::fs::read(p).unwrap(), vec![i as u8; 100_000 + i]);
    }
}

#[test]
fn busy_answers_resets_and_delays_at_random_are_retried_to_success() {
    let (az, _fx) = crate::seeded("flaky", 40, 0);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "flaky", cache.path(), &["--upload-delay", "0.1"]);
    proxy.set(
        r#"{"seed": 11, "rates": {"503": 0.08, "reset_before": 0.04, "truncate": 0.03},
            "delay_ms": [0, 15]}"#,
    );
    let started = Instant::now();
    // Reads of cold files and writes of new ones, all through the faults.
    let files: Vec<_> = walk(m.path()).into_iter().filter(|p| p.is_file()).collect();
    for p in &files {
        std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for i in 0..20 {
        std::fs::write(m.path().join(format!("out-{i}")), vec![i as u8; 5000]).unwrap();
    }
    unmount_clean(&mut m);
    assert!(proxy.injected().len() >= 5, "{:?}", proxy.injected());
    assert!(started.elapsed() < Duration::from_secs(120));
    proxy.set("{}");
    let fresh = tempfile::tempdir().unwrap();
    let n = mount_via(&proxy, "flaky", fresh.path(), &[]);
    for i in 0..20 {
        let p = n.path().join(format!("out-{i}"));
        assert_eq!(std::fs::read(p).unwrap(), vec![i as u8; 5000]);
    }
}

#[test]
fn metadata_is_answered_while_the_service_is_frozen_and_cold_opens_wait() {
    let (az, _fx) = crate::seeded("frozen", 30, 0);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let m = mount_via(&proxy, "frozen", cache.path(), &["--threads", "2"]);
    let files: Vec<_> = walk(m.path()).into_iter().filter(|p| p.is_file()).collect();
    // Every read request hangs; more cold opens wait than there are FUSE worker threads.
    proxy.set(r#"{"rules": [{"method": "GET", "fault": "hang"}]}"#);
    let readers: Vec<_> = files[..6]
        .iter()
        .cloned()
        .map(|p| std::thread::spawn(move || std::fs::read(p)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut lat = Vec::new();
    for p in walk(m.path()) {
        let t = Instant::now();
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap();
        }
        if md.is_dir() {
            std::fs::read_dir(&p).unwrap().count();
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let p99 = lat[lat.len() * 99 / 100];
    eprintln!("metadata while frozen: {} calls, p99 {p99:?}", lat.len());
    assert!(
        p99 < Duration::from_secs(1),
        "metadata waited for the frozen service: p99 {p99:?}"
    );
    // The service thaws: the waiting opens complete with the right data.
    proxy.set("{}");
    for (r, p) in readers.into_iter().zip(&files) {
        let data = r
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!data.is_empty() || p.metadata().unwrap().len() == 0);
    }
}

#[test]
fn truncating_an_uncached_file_downloads_nothing() {
    let (az, _fx) = crate::seeded("otrunc", 1, 8);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_via(&proxy, "otrunc", cache.path(), &[]);
    proxy.set(r#"{"log_all": true}"#);
    // open(O_TRUNC), as a checkpoint writer does: the kernel sends OPEN then SETATTR(size 0).
    let big = m.path().join("big/large.bin");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&big)
        .unwrap();
    std::io::Write::write_all(&mut f, b"new checkpoint").unwrap();
    drop(f);
    // truncate(1) opens without O_TRUNC and then sets the size to 0.
    let sample = m.path().join("data/shard-000/sample-000000.bin");
    let status = std::process::Command::new("truncate")
        .args(["-s", "0"])
        .arg(&sample)
        .status()
        .unwrap();
    assert!(status.success());
    let gets: Vec<_> = proxy
        .injected()
        .into_iter()
        .filter(|l| l.contains(" GET ") && (l.contains("large.bin") || l.contains("sample-")))
        .collect();
    assert!(
        gets.is_empty(),
        "a truncate downloaded the old data: {gets:?}"
    );
    assert_eq!(std::fs::read(&big).unwrap(), b"new checkpoint");
    assert_eq!(std::fs::metadata(&sample).unwrap().len(), 0);
    unmount_clean(&mut m);
}
