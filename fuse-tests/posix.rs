//! Third-party suites on a real mount: pjdfstest (POSIX semantics, run as root with its
//! dummy users) and fsx (random reads, writes, truncates, mmap, fsync and reopen, every read
//! checked), both built by setup.sh into target/tools. The file fsx leaves must then read
//! back identically from a fresh node.

use crate::harness::*;
use crate::mount;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tools/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run fuse-tests/setup.sh",
        p.display()
    );
    p
}

const PJDFSTEST_CONFIG: &str = r#"
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
"#;

/// Runs pjdfstest in a fresh directory of mount `m`; returns the passed count and the
/// names of the failed tests.
fn pjdfstest(m: &Mount) -> (usize, Vec<String>, String) {
    let work = m.path().join("pjd");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), PJDFSTEST_CONFIG).unwrap();
    // A second, local filesystem for the EXDEV cases.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(tool("pjdfstest"))
        .arg("-c")
        .arg(cfg.path())
        .arg("-p")
        .arg(&work)
        .arg("-s")
        .arg(other.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut ok = 0;
    let mut failed = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next_back()) {
            (Some(name), Some("ok")) if name.contains("::") => ok += 1,
            (Some(name), Some("FAILED")) => failed.push(name.to_string()),
            _ => {}
        }
    }
    (ok, failed, text)
}

#[test]
fn pjdfstest_passes_on_the_mount() {
    let az = Azurite::start();
    az.seed("posix", &[], 0, 0);
    let cache = tempfile::tempdir().unwrap();
    let m = mount(&az, "posix", cache.path(), &["--allow-other"]);
    let (ok, failed, text) = pjdfstest(&m);
    eprintln!("pjdfstest: {ok} passed, {} failed", failed.len());
    assert!(ok > 350, "pjdfstest ran too few cases:\n{text}");
    assert!(failed.is_empty(), "pjdfstest failures: {failed:?}\n{text}");
}

/// pjdfstest with the service 2 to 10 ms away and uploads racing every change (no upload
/// delay): what fails must be exactly the checked-in list of expected failures, each with
/// its reason, so a new failure and an expected one that starts passing both fail CI.
#[test]
fn pjdfstest_through_a_slow_service_fails_only_as_expected() {
    let az = Azurite::start();
    az.seed("posixslow", &[], 0, 0);
    let proxy = FaultProxy::start(&az);
    proxy.set(r#"{"seed": 3, "delay_ms": [2, 10]}"#);
    let cache = tempfile::tempdir().unwrap();
    let m = Mount::start(
        &[
            "posixslow",
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--allow-other",
            "--upload-delay",
            "0",
        ],
        &[("AZURE_STORAGE_CONNECTION_STRING", proxy.connection_string())],
    )
    .expect("mount through the proxy");
    let (ok, failed, text) = pjdfstest(&m);
    eprintln!(
        "pjdfstest through the slow service: {ok} passed, {} failed",
        failed.len()
    );
    let listed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuse-tests/pjdfstest-expected-failures.txt"),
    )
    .unwrap();
    let mut expected: Vec<String> = listed
        .lines()
        .map(|l| l.split('#').next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    expected.sort();
    let mut got = failed.clone();
    got.sort();
    assert!(ok > 350, "pjdfstest ran too few cases:\n{text}");
    assert_eq!(
        got, expected,
        "failures differ from fuse-tests/pjdfstest-expected-failures.txt\n{text}"
    );
}

#[test]
fn fsx_finds_no_corruption_and_a_fresh_node_reads_the_result() {
    let az = Azurite::start();
    az.seed("fsx", &[], 0, 0);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount(&az, "fsx", cache.path(), &[]);
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        "flen = 1048576\n\
         [opsize]\nmax = 131072\nmin = 0\nalign = 1\n\
         [weights]\nclose_open = 2\nread = 10\nwrite = 10\nmapread = 10\nmapwrite = 10\n\
         invalidate = 1\ntruncate = 2\nfsync = 1\nfdatasync = 1\nposix_fallocate = 1\n\
         sendfile = 1\ncopy_file_range = 1\n",
    )
    .unwrap();
    let artifacts = tempfile::tempdir().unwrap();
    // SIMFS_FSX_OPS raises the count (the README's test command runs a heavier pass too).
    let ops = std::env::var("SIMFS_FSX_OPS").unwrap_or_else(|_| "3000".into());
    let out = Command::new(tool("fsx"))
        .args(["-N", &ops, "-S", "20261121", "-f"])
        .arg(cfg.path())
        .arg("-P")
        .arg(artifacts.path())
        .arg(m.path().join("fsx.bin"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fsx failed:\n{text}");
    let written = std::fs::read(m.path().join("fsx.bin")).unwrap();
    m.unmount();
    let fresh = tempfile::tempdir().unwrap();
    let n = mount(&az, "fsx", fresh.path(), &[]);
    assert_eq!(std::fs::read(n.path().join("fsx.bin")).unwrap(), written);
}
