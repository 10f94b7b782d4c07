//! Real mounts of simfs over /dev/fuse against a real Azurite (see harness.rs).

mod faults;
mod fresh;
mod harness;
mod helper;
mod in_place;
mod limits;
mod metrics;
mod posix;
mod write;
mod writeback;

use harness::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A local tree in the shapes ML users store: nested dirs, a symlinked executable, a
/// checkpoint directory with a `latest.pt` link, modes that are not the defaults, and a venv.
fn fixture() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    std::fs::create_dir_all(r.join("proj/src/pkg/deep")).unwrap();
    std::fs::write(r.join("proj/src/pkg/__init__.py"), "VALUE = 42\n").unwrap();
    std::fs::write(r.join("proj/src/pkg/deep/data.txt"), "deep data\n").unwrap();
    std::fs::write(r.join("proj/tool.sh"), "#!/bin/sh\necho tool-ran \"$@\"\n").unwrap();
    std::fs::set_permissions(r.join("proj/tool.sh"), PermissionsExt::from_mode(0o750)).unwrap();
    std::fs::create_dir_all(r.join("proj/bin")).unwrap();
    std::os::unix::fs::symlink("../tool.sh", r.join("proj/bin/tool")).unwrap();
    std::fs::set_permissions(r.join("proj/src"), PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::create_dir_all(r.join("ckpt")).unwrap();
    std::fs::write(r.join("ckpt/step-1.pt"), vec![1u8; 100_000]).unwrap();
    std::fs::write(r.join("ckpt/step-2.pt"), vec![2u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("step-2.pt", r.join("ckpt/latest.pt")).unwrap();
    std::fs::create_dir_all(r.join("empty-dir")).unwrap();
    let venv = r.join("venv");
    let ok = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "python3 -m venv failed (fuse-tests/setup.sh installs python3-venv)"
    );
    t
}

fn seeded(container: &str, files: usize, big_mib: usize) -> (Azurite, tempfile::TempDir) {
    let az = Azurite::start();
    let fx = fixture();
    az.seed(
        container,
        &[format!("{}=", fx.path().display())],
        files,
        big_mib,
    );
    (az, fx)
}

fn mount(az: &Azurite, source: &str, cache: &Path, extra: &[&str]) -> Mount {
    mount_with(az.connection_string(), source, cache, extra)
}

/// A container SAS for Azurite's development account, valid for an hour.
fn dev_sas(container: &str, permissions: &str) -> String {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(simfs::blob::auth::DEV_KEY)
        .unwrap();
    let now = std::time::SystemTime::now();
    simfs::blob::sas::sign_container_sas(
        "devstoreaccount1",
        &key,
        container,
        permissions,
        now - Duration::from_secs(300),
        now + Duration::from_secs(3600),
    )
}

fn big_expected(mib: usize) -> Vec<u8> {
    (0..mib << 20).map(|j| (j % 253) as u8).collect()
}

#[test]
fn mount_shows_the_container_as_the_same_posix_tree() {
    let (az, fx) = seeded("data", 50, 20);
    let cache = tempfile::tempdir().unwrap();
    let m = mount(&az, "data", cache.path(), &[]);
    let local = fx.path();
    for p in walk(local) {
        let rel = p.strip_prefix(local).unwrap();
        let q = m.path().join(rel);
        let a = std::fs::symlink_metadata(&p).unwrap();
        let b = std::fs::symlink_metadata(&q).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert_eq!(a.file_type(), b.file_type(), "{}", rel.display());
        assert_eq!(
            a.mode() & 0o7777,
            b.mode() & 0o7777,
            "mode of {}",
            rel.display()
        );
        assert_eq!(
            (a.uid(), a.gid()),
            (b.uid(), b.gid()),
            "owner of {}",
            rel.display()
        );
        if a.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&p).unwrap(),
                std::fs::read_link(&q).unwrap()
            );
        } else if a.is_file() {
            assert_eq!(a.mtime(), b.mtime(), "mtime of {}", rel.display());
            assert_eq!(
                std::fs::read(&p).unwrap(),
                std::fs::read(&q).unwrap(),
                "{}",
                rel.display()
            );
        }
    }
    // The symlinked executable runs, the checkpoint link resolves, the venv's python runs.
    let out = Command::new(m.path().join("proj/bin/tool"))
        .arg("x")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tool-ran x\n");
    assert_eq!(
        std::fs::read(m.path().join("ckpt/latest.pt")).unwrap(),
        vec![2u8; 100_000]
    );
    let out = Command::new(m.path().join("venv/bin/python"))
        .args(["-c", "import sys, os; print(sys.prefix)"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        m.path().join("venv").to_str().unwrap()
    );
    // A large file arrives byte for byte (parallel ranged GETs).
    assert!(std::fs::read(m.path().join("big/large.bin")).unwrap() == big_expected(20));
    let shards = walk(&m.path().join("data"))
        .iter()
        .filter(|p| p.is_file())
        .count();
    assert_eq!(shards, 50);
    let st = std::fs::metadata(m.path().join("data")).unwrap();
    assert!(st.is_dir());
}

#[test]
fn metadata_and_cached_files_need_no_service_after_mount() {
    let (mut az, _fx) = seeded("data", 200, 0);
    let cache = tempfile::tempdir().unwrap();
    let m = mount(&az, "data", cache.path(), &[]);
    let warm = std::fs::read(m.path().join("proj/src/pkg/__init__.py")).unwrap();
    az.stop();
    // With the service gone: every stat, readdir and readlink still answers...
    let paths = walk(m.path());
    assert!(paths.len() > 200);
    for p in &paths {
        let md = std::fs::symlink_metadata(p).unwrap();
        if md.file_type().is_symlink() {
            std::fs::read_link(p).unwrap();
        }
    }
    // ...the cached file still reads...
    assert_eq!(
        std::fs::read(m.path().join("proj/src/pkg/__init__.py")).unwrap(),
        warm
    );
    // ...and an uncached one fails with EIO instead of hanging or lying.
    let err = std::fs::read(m.path().join("ckpt/step-1.pt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

#[test]
fn remount_reuses_the_index_and_keeps_inode_numbers() {
    let (az, _fx) = seeded("data", 20, 0);
    let cache = tempfile::tempdir().unwrap();
    let inodes = |root: &Path| -> Vec<(String, u64)> {
        walk(root)
            .iter()
            .map(|p| {
                let ino = std::fs::symlink_metadata(p).unwrap().ino();
                (p.strip_prefix(root).unwrap().display().to_string(), ino)
            })
            .collect()
    };
    let mut m = mount(&az, "data", cache.path(), &[]);
    let first = inodes(m.path());
    m.unmount();
    assert!(!is_mounted(m.path()));
    // A blob added since: the reused index does not show it, --reindex does.
    az.seed("data", &[], 0, 1);
    let m = mount(&az, "data", cache.path(), &[]);
    assert_eq!(inodes(m.path()), first);
    assert!(!m.path().join("big").exists());
    drop(m);
    let m = mount(&az, "data", cache.path(), &["--reindex"]);
    assert!(m.path().join("big/large.bin").exists());
}

#[test]
fn a_sas_token_file_authenticates_an_az_source() {
    let (az, _fx) = seeded("data", 5, 0);
    let sas = dev_sas("data", "rl");
    let secrets = tempfile::tempdir().unwrap();
    let sas_file = secrets.path().join("sas");
    std::fs::write(&sas_file, &sas).unwrap();
    std::fs::set_permissions(&sas_file, PermissionsExt::from_mode(0o644)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let endpoint = az.endpoint();
    let args = [
        "az://devstoreaccount1/data/proj",
        "--endpoint",
        &endpoint,
        "--sas-token-file",
        sas_file.to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    // A secret file others can read is refused, as the credential file is.
    let err = Mount::start(&args, &[])
        .err()
        .expect("a readable SAS file is refused");
    assert!(err.contains("readable by others"), "{err}");
    std::fs::set_permissions(&sas_file, PermissionsExt::from_mode(0o600)).unwrap();
    let m = Mount::start(&args, &[]).expect("mount with SAS");
    assert_eq!(
        std::fs::read_to_string(m.path().join("src/pkg/__init__.py")).unwrap(),
        "VALUE = 42\n",
        "the prefix is the root"
    );
    // The SAS never reaches the log or the index.
    let mut found = false;
    for p in walk(cache.path()) {
        if p.is_file() {
            let data = std::fs::read(&p).unwrap();
            let sig = sas.rsplit("sig=").next().unwrap();
            found |= data.windows(sig.len()).any(|w| w == sig.as_bytes());
        }
    }
    assert!(!found, "the SAS signature was written to the cache dir");
    // Everything simfs keeps there is its owner's alone.
    for p in walk(cache.path()) {
        let mode = std::fs::symlink_metadata(&p).unwrap().mode() & 0o777;
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{}", p.display());
    }
}

#[test]
fn secrets_leave_the_daemons_environment_and_an_empty_one_is_named() {
    let (az, _fx) = seeded("data", 2, 0);
    let sas = dev_sas("data", "rl");
    let cache = tempfile::tempdir().unwrap();
    let endpoint = az.endpoint();
    let args = [
        "az://devstoreaccount1/data",
        "--endpoint",
        &endpoint,
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let err = Mount::start(&args, &[("AZURE_STORAGE_SAS_TOKEN", String::new())])
        .err()
        .expect("an empty SAS variable is refused");
    assert!(
        err.contains("AZURE_STORAGE_SAS_TOKEN is set but empty"),
        "{err}"
    );
    let m = Mount::start(&args, &[("AZURE_STORAGE_SAS_TOKEN", sas.clone())]).expect("mount");
    let pid = m.child.as_ref().unwrap().id();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let sig = sas.rsplit("sig=").next().unwrap();
    assert!(
        !environ.windows(sig.len()).any(|w| w == sig.as_bytes()),
        "the SAS is still in the daemon's environment"
    );
    assert!(m.path().join("proj").exists());
}

fn mount_error(args: &[&str], env: &[(&str, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = mount_command(args, dir.path(), env);
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "mount should have failed");
    assert!(
        !is_mounted(dir.path()),
        "a failed mount left a mount behind"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn mount_errors_name_the_cause_and_leave_no_mount() {
    let az = Azurite::start();
    az.seed("data", &[], 1, 0);
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path().to_str().unwrap();
    let conn = [("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())];
    let e = mount_error(&["missing", "--cache-dir", c], &conn);
    assert!(e.contains("container not found"), "{e}");
    let endpoint = az.endpoint();
    let bad_sas = [(
        "AZURE_STORAGE_SAS_TOKEN",
        "sv=2022-11-02&sr=c&sp=rl&se=2030-01-01T00%3A00%3A00Z&sig=AAAA".to_string(),
    )];
    let e = mount_error(
        &[
            "az://devstoreaccount1/data",
            "--endpoint",
            &endpoint,
            "--cache-dir",
            c,
        ],
        &bad_sas,
    );
    assert!(e.contains("access denied"), "{e}");
    let dead = format!("http://127.0.0.1:{}/devstoreaccount1", free_port());
    let e = mount_error(
        &[
            "az://devstoreaccount1/data",
            "--endpoint",
            &dead,
            "--cache-dir",
            c,
        ],
        &bad_sas,
    );
    assert!(e.contains("cannot reach"), "{e}");
    let e = mount_error(&["az://devstoreaccount1/Bad_Name", "--cache-dir", c], &[]);
    assert!(e.contains("not a valid container name"), "{e}");
}

#[test]
fn background_mount_returns_serving_and_unmount_leaves_nothing() {
    let (az, _fx) = seeded("data", 3, 0);
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let out = mount_command(
        &["data", "--cache-dir", cache.path().to_str().unwrap()],
        mnt.path(),
        &[("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())],
    )
    .output()
    .unwrap();
    // Guard first, so a failing assertion below still unmounts.
    let guard = Mount {
        at: mnt.path().to_path_buf(),
        dir: Some(mnt),
        child: None,
        log: tempfile::NamedTempFile::new().unwrap(),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(guard.path()), "mount returned before serving");
    assert_eq!(
        std::fs::read_to_string(guard.path().join("proj/src/pkg/deep/data.txt")).unwrap(),
        "deep data\n"
    );
    let st = Command::new(SIMFS)
        .arg("unmount")
        .arg(guard.path())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!is_mounted(guard.path()));
    // The background process exits once unmounted.
    let needle = guard.path().to_str().unwrap().to_string();
    let mut alive = true;
    for _ in 0..100 {
        let ps = Command::new("pgrep")
            .args(["-f", &needle])
            .output()
            .unwrap();
        alive = !String::from_utf8_lossy(&ps.stdout).trim().is_empty();
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive, "the simfs process outlived its mount");
}

#[test]
fn check_lists_what_the_mount_hides() {
    let az = Azurite::start();
    let odd: Vec<String> = ["ok/file", "a//b", "x/./y", "shadow", "shadow/inner"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut cmd = Command::new(SEED);
    cmd.args(["--endpoint", &az.endpoint(), "--container", "odd"]);
    for n in &odd {
        cmd.args(["--raw", n]);
    }
    assert!(cmd.status().unwrap().success());
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(SIMFS)
        .args([
            "check",
            "odd",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ])
        .env("AZURE_STORAGE_CONNECTION_STRING", az.connection_string())
        .env("SIMFS_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 blob(s) hidden"), "{text}");
    for line in [
        "hidden\ta//b\tname not representable: empty path segment",
        "hidden\tx/./y",
        "hidden\tshadow\ta directory of the same name exists",
    ] {
        assert!(text.contains(line), "missing {line:?} in {text}");
    }
    let m = mount(&az, "odd", cache.path(), &[]);
    assert!(m.path().join("shadow").is_dir());
    assert_eq!(std::fs::read(m.path().join("ok/file")).unwrap(), b"raw");
}

/// The clean copies in the cache directory `cache` (under `cache/data`). The cache evicts
/// while this looks: a file listed may be gone by the time of its stat, and is not counted.
fn clean_copies(cache: &Path) -> Vec<std::fs::Metadata> {
    let mut out = Vec::new();
    let mut stack = vec![cache.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for p in entries.flatten().map(|e| e.path()) {
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if d.ends_with("cache/data") => out.push(m),
                _ => {}
            }
        }
    }
    out
}

#[test]
fn a_data_set_twice_the_cache_size_reads_whole_twice_within_the_bound() {
    let az = Azurite::start();
    let data = tempfile::tempdir().unwrap();
    let body =
        |i: usize| -> Vec<u8> { (0..512 << 10).map(|j| ((i * 31 + j) % 251) as u8).collect() };
    std::fs::create_dir(data.path().join("shards")).unwrap();
    for i in 0..20 {
        std::fs::write(data.path().join(format!("shards/s{i:02}")), body(i)).unwrap();
    }
    az.seed("evict", &[format!("{}=", data.path().display())], 0, 0);
    let cache = tempfile::tempdir().unwrap();
    let m = mount(&az, "evict", cache.path(), &["--cache-size", "5M"]);
    let clean_bytes = || -> u64 {
        clean_copies(cache.path())
            .iter()
            .map(|m| m.blocks() * 512)
            .sum()
    };
    for round in 0..2 {
        for i in 0..20 {
            let got = std::fs::read(m.path().join(format!("shards/s{i:02}"))).unwrap();
            assert!(got == body(i), "shard {i} differs in round {round}");
            let used = clean_bytes();
            assert!(used <= 5 << 20, "{used} bytes cached over a 5 MiB bound");
        }
    }
    let status = Command::new(SIMFS).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("5.0 MiB allowed"), "{text}");
}

#[test]
fn stage_hydrates_a_tree_refuses_what_does_not_fit_and_evicts() {
    let az = Azurite::start();
    let data = tempfile::tempdir().unwrap();
    let body =
        |i: usize| -> Vec<u8> { (0..256 << 10).map(|j| ((i * 7 + j) % 253) as u8).collect() };
    for dir in ["train", "val"] {
        std::fs::create_dir(data.path().join(dir)).unwrap();
    }
    for i in 0..16 {
        std::fs::write(data.path().join(format!("train/t{i:02}")), body(i)).unwrap();
    }
    for i in 0..4 {
        std::fs::write(data.path().join(format!("val/v{i}")), body(100 + i)).unwrap();
    }
    az.seed("stage", &[format!("{}=", data.path().display())], 0, 0);
    let cache = tempfile::tempdir().unwrap();
    // Room for 8 of the 16 training shards under the high watermark (95%).
    let m = mount(&az, "stage", cache.path(), &["--cache-size", "2.2M"]);
    let clean_files = || clean_copies(cache.path()).len();
    let stage = |args: &[&str]| {
        let out = Command::new(SIMFS)
            .arg("stage")
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let val = m.path().join("val");
    let (ok, text) = stage(&[val.to_str().unwrap(), "--jobs", "2"]);
    assert!(ok, "{text}");
    assert!(text.contains("staged 4 files"), "{text}");
    assert_eq!(clean_files(), 4);
    // Staged means cached: reading them downloads nothing (no fill is started).
    let before = clean_files();
    for i in 0..4 {
        assert_eq!(
            std::fs::read(val.join(format!("v{i}"))).unwrap(),
            body(100 + i)
        );
    }
    assert_eq!(clean_files(), before);
    // 4 MiB of shards do not fit in a 2 MiB cache: refused before anything is fetched.
    let train = m.path().join("train");
    let (ok, text) = stage(&[train.to_str().unwrap()]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("refused") && text.contains("4194304 bytes"),
        "{text}"
    );
    assert_eq!(clean_files(), 4);
    // Forced, it stages what fits and says what it skipped.
    let (ok, text) = stage(&[train.to_str().unwrap(), "--force"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("staged 8 files") && text.contains("skipped 8 files"),
        "{text}"
    );
    // Dropping the training tree from the cache.
    let (ok, text) = stage(&["--evict", train.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(text.contains("dropped 8 files"), "{text}");
    assert_eq!(
        clean_files(),
        0,
        "the val files were evicted to make room for train"
    );
    // A path outside any mount is named.
    let (ok, text) = stage(&[data.path().to_str().unwrap()]);
    assert!(!ok && text.contains("not on a simfs mount"), "{text}");
    for i in 0..16 {
        assert_eq!(
            std::fs::read(train.join(format!("t{i:02}"))).unwrap(),
            body(i)
        );
    }
}

/// Maps the first `len` bytes of `f` with `prot` and `flags`, hands the mapping to `use_it`,
/// and unmaps it after.
pub(crate) fn with_mapping<T>(
    f: &std::fs::File,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    use_it: impl FnOnce(*mut u8) -> T,
) -> T {
    // SAFETY: a mapping of a file the caller holds open, used only inside `use_it` and
    // unmapped before return.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            flags,
            std::os::fd::AsRawFd::as_raw_fd(f),
            0,
        );
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        let out = use_it(addr as *mut u8);
        libc::munmap(addr, len);
        out
    }
}

/// Reads `p` through mmap.
fn mmap_read(p: &Path) -> Vec<u8> {
    let f = std::fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    with_mapping(&f, len, libc::PROT_READ, libc::MAP_PRIVATE, |addr| {
        // SAFETY: `len` bytes of a private read-only mapping of that length.
        unsafe { std::slice::from_raw_parts(addr, len).to_vec() }
    })
}

/// Writes `data` at `offset` of `f` through a shared mapping, synced and unmapped.
pub(crate) fn mmap_write(f: &std::fs::File, offset: usize, data: &[u8]) {
    let len = f.metadata().unwrap().len() as usize;
    assert!(offset + data.len() <= len);
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    with_mapping(f, len, prot, libc::MAP_SHARED, |addr| {
        // SAFETY: written within the mapping's length, then synced.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), addr.add(offset), data.len());
            assert_eq!(libc::msync(addr.cast(), len, libc::MS_SYNC), 0);
        }
    })
}

#[test]
fn cached_files_read_and_map_correctly_with_and_without_passthrough() {
    let az = Azurite::start();
    let data = tempfile::tempdir().unwrap();
    let body = |i: usize| -> Vec<u8> {
        (0..(1 << 20) + 17)
            .map(|j| ((i * 3 + j) % 249) as u8)
            .collect()
    };
    // One tree per run: the writable run writes to its files.
    let runs: [(&str, &[&str]); 3] = [
        ("pt", &["--read-only"]),
        ("nopt", &["--read-only", "--no-passthrough"]),
        ("rw", &[]),
    ];
    for (dir, _) in runs {
        std::fs::create_dir(data.path().join(dir)).unwrap();
        for i in 0..6 {
            std::fs::write(data.path().join(format!("{dir}/f{i}")), body(i)).unwrap();
        }
    }
    az.seed(
        "passthrough",
        &[format!("{}=", data.path().display())],
        0,
        0,
    );
    for (dir, extra) in runs {
        let cache = tempfile::tempdir().unwrap();
        let mut args = vec!["passthrough", "--cache-dir", cache.path().to_str().unwrap()];
        args.extend_from_slice(&["--cache-size", "3M"]);
        args.extend_from_slice(extra);
        // fuser's request log shows whether the kernel wrote through simfs or in place.
        let env = [
            ("AZURE_STORAGE_CONNECTION_STRING", az.connection_string()),
            (
                "SIMFS_LOG",
                "warn,simfs::fuse=info,fuser::request=debug".to_string(),
            ),
        ];
        let m = Mount::start(&args, &env).expect("mount");
        let f0 = m.path().join(dir).join("f0");
        // The first read hydrates; later opens find a whole cached file (passthrough on the
        // read-only mount where the kernel offers it).
        assert!(std::fs::read(&f0).unwrap() == body(0), "{dir}");
        std::thread::sleep(Duration::from_millis(300));
        let mut held = std::fs::File::open(&f0).unwrap();
        let other = std::fs::File::open(&f0).unwrap();
        assert!(mmap_read(&f0) == body(0), "mmap {dir}");
        // Evictions all around: the open file stays readable and whole.
        for i in 1..6 {
            let p = m.path().join(dir).join(format!("f{i}"));
            assert!(std::fs::read(p).unwrap() == body(i), "{dir}");
        }
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut held, &mut got).unwrap();
        assert!(got == body(0), "held handle after evictions {dir}");
        drop(other);
        assert!(
            !m.log_text().contains("not available"),
            "{dir}: {}",
            m.log_text()
        );
        if dir != "rw" {
            continue;
        }
        // A writer beside the reader. Where the reader is in passthrough, the kernel makes
        // the writer share its backing file and write it directly: the reader, a new open,
        // stat, fsync and the container must all see the writes anyway.
        let in_place = m
            .log_text()
            .contains("cached files are read by the kernel directly");
        let mut w = std::fs::OpenOptions::new().write(true).open(&f0).unwrap();
        std::io::Write::write_all(&mut w, b"NEW").unwrap();
        std::os::unix::fs::FileExt::write_all_at(&w, b"TAIL", body(0).len() as u64).unwrap();
        let mut want = body(0);
        want[..3].copy_from_slice(b"NEW");
        want.extend_from_slice(b"TAIL");
        assert_eq!(
            std::fs::metadata(&f0).unwrap().len(),
            want.len() as u64,
            "stat while the writer is open"
        );
        w.sync_all().unwrap();
        drop(w);
        let mut head = [0u8; 3];
        std::os::unix::fs::FileExt::read_exact_at(&held, &mut head, 0).unwrap();
        assert_eq!(&head, b"NEW", "the open reader sees the write");
        assert!(std::fs::read(&f0).unwrap() == want);
        assert!(mmap_read(&f0) == want, "mmap after the write");
        // A writer through a shared mapping beside the reader (numpy's memmap): its close
        // journals that too, and `simfs sync` commits it (close itself is local: a fresh
        // node reading before the upload ends could see the version before).
        let mw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f0)
            .unwrap();
        mmap_write(&mw, 3, b"MAP");
        drop(mw);
        // The kernel sends the RELEASE after close(2) returns, and its last look at the
        // writes made in place journals the file once more: let it land before the barrier.
        std::thread::sleep(Duration::from_millis(200));
        let synced = Command::new(SIMFS)
            .arg("sync")
            .arg(m.path())
            .output()
            .unwrap();
        assert!(synced.status.success(), "{synced:?}");
        want[3..6].copy_from_slice(b"MAP");
        std::os::unix::fs::FileExt::read_exact_at(&held, &mut head, 3).unwrap();
        assert_eq!(&head, b"MAP", "the open reader sees the mapped write");
        let writes = m
            .log_text()
            .lines()
            .filter(|l| l.contains(" WRITE "))
            .count();
        if in_place {
            assert_eq!(writes, 0, "the writer joined the reader in place");
        }
        drop(held);
        // fsync and simfs sync committed the writes made in place: a node with an empty
        // cache reads them.
        let other_cache = tempfile::tempdir().unwrap();
        let fresh = mount(&az, "passthrough", other_cache.path(), &["--read-only"]);
        assert!(std::fs::read(fresh.path().join(dir).join("f0")).unwrap() == want);
    }
}

#[test]
fn a_primed_mount_answers_the_first_stat_of_its_tree_without_a_lookup() {
    let (az, fx) = seeded("primed", 200, 0);
    let paths: Vec<PathBuf> = walk(fx.path())
        .into_iter()
        .map(|p| p.strip_prefix(fx.path()).unwrap().to_path_buf())
        .collect();
    assert!(paths.len() > 20);
    // fuser's request log counts the lookups; simfs's says when priming is done.
    let env = [
        ("AZURE_STORAGE_CONNECTION_STRING", az.connection_string()),
        (
            "SIMFS_LOG",
            "warn,simfs::mount=info,fuser::request=debug".to_string(),
        ),
    ];
    for entries in ["100000", "0"] {
        let cache = tempfile::tempdir().unwrap();
        let args = [
            "primed",
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--prime-entries",
            entries,
        ];
        let m = Mount::start(&args, &env).expect("mount");
        if entries != "0" {
            // In the foreground the mount appears before priming ends (in the background
            // `simfs mount` returns after it).
            let t = Instant::now();
            while !m.log_text().contains("primed the kernel's dentry cache") {
                assert!(t.elapsed() < Duration::from_secs(30), "{}", m.log_text());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let before = m.log_text().matches(" LOOKUP ").count();
        for p in &paths {
            std::fs::symlink_metadata(m.path().join(p)).unwrap();
        }
        let lookups = m.log_text().matches(" LOOKUP ").count() - before;
        if entries == "0" {
            assert!(lookups >= paths.len(), "unprimed: {lookups} lookups");
        } else {
            assert_eq!(lookups, 0, "primed: {lookups} lookups");
        }
    }
}
