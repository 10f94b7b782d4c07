//! simfs started the way mount(8) and fstab start it: as `mount.fuse.simfs SOURCE DIR -o
//! OPTIONS` (what `mount -t fuse.simfs` runs), and through Debian's `mount.fuse3` with the
//! `simfs#SOURCE` form, with credentials from a credential file and nothing in the
//! environment.

use crate::harness::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A directory holding `mount.fuse.simfs` and `simfs`, both the built binary.
fn helper_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for name in ["mount.fuse.simfs", "simfs"] {
        std::os::unix::fs::symlink(SIMFS, d.path().join(name)).unwrap();
    }
    d
}

fn credential_file(az: &Azurite, mode: u32) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    let text = format!("connection_string = {:?}\n", az.connection_string());
    std::fs::write(f.path(), text).unwrap();
    std::fs::set_permissions(f.path(), PermissionsExt::from_mode(mode)).unwrap();
    f
}

/// Runs `prog args` with no Azure variables in the environment, as mount(8) at boot would.
fn run(prog: &Path, args: &[&str], path_dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_remove("AZURE_STORAGE_CONNECTION_STRING")
        .env("SIMFS_LOG", "warn");
    if let Some(d) = path_dir {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", d.display()));
    }
    cmd.output().unwrap()
}

/// Unmounts through `simfs unmount` when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new(SIMFS).arg("unmount").arg(&self.0).status();
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The kernel's read-ahead for the mount at `mnt` (its device's `read_ahead_kb`).
fn read_ahead_kb(mnt: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mnt).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    std::fs::read_to_string(&knob)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_mount_helper_takes_fstab_options_and_a_credential_file() {
    let az = Azurite::start();
    az.seed("helper", &[], 0, 0);
    let bin = helper_dir();
    let helper = bin.path().join("mount.fuse.simfs");
    let cred = credential_file(&az, 0o600);
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let opts = format!(
        "rw,_netdev,nofail,noatime,x-systemd.automount,cache_dir={},credential_file={},upload_delay=0.5",
        cache.path().display(),
        cred.path().display()
    );
    let m = mnt.path().to_str().unwrap();
    let out = run(&helper, &["helper", m, "-o", &opts], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let guard = Mounted(mnt.path().to_path_buf());
    assert!(is_mounted(mnt.path()), "the helper returns once mounted");
    assert_eq!(
        read_ahead_kb(mnt.path()),
        1024,
        "1 MiB of read-ahead by default"
    );
    std::fs::write(mnt.path().join("from-fstab.txt"), "hello").unwrap();
    let status = Command::new(SIMFS).arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains(m) && status.contains("helper"), "{status}");
    assert!(status.contains("pending uploads"), "{status}");
    let version = Command::new(SIMFS).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert_eq!(
        version.trim(),
        format!("simfs {}", env!("CARGO_PKG_VERSION"))
    );

    // Mounting again on the same place is refused with the reason.
    let again = run(&helper, &["helper", m, "-o", &opts], None);
    assert_eq!(again.status.code(), Some(32));
    assert!(
        stderr(&again).contains("already a mount point"),
        "{}",
        stderr(&again)
    );
    let out = simfs_unmount(mnt.path());
    assert!(out.status.success(), "{}", stderr(&out));
    drop(guard);
    assert!(!is_mounted(mnt.path()));

    // A fresh mount sees what was written through the helper-started mount.
    let fresh = tempfile::tempdir().unwrap();
    let opts2 = format!(
        "ro,read_ahead=4M,cache_dir={},credential_file={}",
        fresh.path().display(),
        cred.path().display()
    );
    let out = run(&helper, &["helper", m, "-o", &opts2], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let _guard = Mounted(mnt.path().to_path_buf());
    assert_eq!(
        read_ahead_kb(mnt.path()),
        4096,
        "-o read_ahead=4M is honoured"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("from-fstab.txt")).unwrap(),
        "hello"
    );
    let refused = std::fs::write(mnt.path().join("x"), "y").unwrap_err();
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::EROFS),
        "-o ro is honoured"
    );
}

#[test]
fn mount_helper_errors_name_the_cause_and_mount_nothing() {
    let az = Azurite::start();
    az.seed("helper", &[], 0, 0);
    let bin = helper_dir();
    let helper = bin.path().join("mount.fuse.simfs");
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    let c = cache.path().display();
    let good = credential_file(&az, 0o600);
    let readable = credential_file(&az, 0o644);
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "cache_dir={c},credential_file={},cache_sizes=10G",
                good.path().display()
            ),
            "unknown mount option \"cache_sizes\"",
        ),
        (
            format!("credential_file={}", good.path().display()),
            "--cache-dir",
        ),
        (
            format!(
                "cache_dir={c},credential_file={}",
                readable.path().display()
            ),
            "chmod 600",
        ),
        (
            format!("cache_dir={c},credential_file=/nonexistent/simfs.conf"),
            "/nonexistent/simfs.conf",
        ),
    ];
    for (opts, expected) in cases {
        let out = run(&helper, &["helper", m, "-o", &opts], None);
        if out.status.success() {
            // Leave nothing mounted behind for the rest of the suite, then fail.
            let _ = simfs_unmount(mnt.path());
            panic!("{opts} should fail");
        }
        assert!(stderr(&out).contains(expected), "{opts}: {}", stderr(&out));
        assert!(!is_mounted(mnt.path()));
    }
    // A non-empty mountpoint is refused unless asked for.
    std::fs::write(mnt.path().join("local-file"), "x").unwrap();
    let opts = format!("cache_dir={c},credential_file={}", good.path().display());
    let out = run(&helper, &["helper", m, "-o", &opts], None);
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    let out = run(
        &helper,
        &["helper", m, "-o", &format!("{opts},nonempty")],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let _guard = Mounted(mnt.path().to_path_buf());
    assert!(is_mounted(mnt.path()));
}

#[test]
fn debians_mount_fuse3_runs_the_simfs_hash_form() {
    let az = Azurite::start();
    az.seed("hashform", &[], 0, 0);
    let bin = helper_dir();
    let cred = credential_file(&az, 0o600);
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let opts = format!(
        "cache_dir={},credential_file={},allow_other",
        cache.path().display(),
        cred.path().display()
    );
    let m = mnt.path().to_str().unwrap();
    let out = run(
        Path::new("/sbin/mount.fuse3"),
        &["simfs#hashform", m, "-o", &opts],
        Some(bin.path()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let _guard = Mounted(mnt.path().to_path_buf());
    assert!(is_mounted(mnt.path()));
    std::fs::write(mnt.path().join("f"), "via mount.fuse3").unwrap();
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("f")).unwrap(),
        "via mount.fuse3"
    );
}
