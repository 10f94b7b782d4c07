//! The real parts the fuse-tests need, each behind a guard that cleans up on drop: an Azurite
//! on a free loopback port with a temporary data folder, a seeded container, and a simfs
//! mount that is always unmounted (even when the test panics).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SIMFS: &str = env!("CARGO_BIN_EXE_simfs");
pub const SEED: &str = env!("CARGO_BIN_EXE_simfs-seed");

fn azurite_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuse-tests/node_modules/.bin/azurite-blob");
    assert!(
        p.exists(),
        "Azurite is not installed: run fuse-tests/setup.sh (the README's test command does)"
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Azurite {
    child: Child,
    pub port: u16,
    _data: tempfile::TempDir,
}

impl Azurite {
    pub fn start() -> Azurite {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(port, data.path());
        Azurite {
            child,
            port,
            _data: data,
        }
    }

    /// Stops Azurite the way a service goes down for maintenance: it saves its state.
    pub fn stop_gracefully(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
    }

    /// Starts Azurite again after `stop_gracefully`, on the same port and data.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port, self._data.path());
    }

    fn spawn(port: u16, data: &Path) -> Child {
        let child = Command::new(azurite_bin())
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &port.to_string(),
                "--skipApiVersionCheck",
                // Its telemetry probes the Azure metadata endpoint, which on a closed network
                // can hold the process at exit (seen: a SIGTERM'd Azurite waiting on it).
                "--disableTelemetry",
                "--silent",
            ])
            .arg("--location")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "azurite did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/devstoreaccount1", self.port)
    }

    pub fn connection_string(&self) -> String {
        format!(
            "UseDevelopmentStorage=true;BlobEndpoint={}",
            self.endpoint()
        )
    }

    /// Uploads with simfs-seed: `dirs` as DIR=PREFIX, plus synthetic files and a big file.
    pub fn seed(&self, container: &str, dirs: &[String], files: usize, big_mib: usize) {
        let mut cmd = Command::new(SEED);
        cmd.args(["--endpoint", &self.endpoint(), "--container", container])
            .args([
                "--files",
                &files.to_string(),
                "--big-mib",
                &big_mib.to_string(),
            ]);
        for d in dirs {
            cmd.args(["--dir", d]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "seed failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `simfs mount ARGS MOUNTPOINT` with exactly the credentials in `env` (none inherited).
pub fn mount_command(args: &[&str], mountpoint: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(SIMFS);
    cmd.arg("mount")
        .args(args)
        .arg(mountpoint)
        .env_remove("AZURE_STORAGE_CONNECTION_STRING");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

pub fn is_mounted(mnt: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let want = mnt.to_string_lossy().into_owned();
    m.lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// A simfs mount, unmounted on drop.
pub struct Mount {
    /// The mountpoint, removed with the mount when the mount made it.
    pub dir: Option<tempfile::TempDir>,
    pub at: PathBuf,
    pub child: Option<Child>,
    /// The daemon's stderr: a file, since an unread pipe would block a chatty daemon.
    pub log: tempfile::NamedTempFile,
}

impl Mount {
    pub fn path(&self) -> &Path {
        &self.at
    }

    /// Runs `simfs mount ... --foreground` and waits until the kernel lists the mount.
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Result<Mount, String> {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mount::start_at(dir.path(), args, env)?;
        m.dir = Some(dir);
        Ok(m)
    }

    /// Like `start`, at an existing directory `at`.
    pub fn start_at(at: &Path, args: &[&str], env: &[(&str, String)]) -> Result<Mount, String> {
        Mount::start_command(at, mount_command(args, at, env), env)
    }

    /// Like `start`, with the daemon's soft limit on open files set to `soft` (the hard limit
    /// stays), as a systemd unit or a login shell would start it.
    pub fn start_with_open_files(
        args: &[&str],
        env: &[(&str, String)],
        soft: u64,
    ) -> Result<Mount, String> {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = mount_command(args, dir.path(), env);
        // SAFETY: between fork and exec only getrlimit and setrlimit run, which are
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                lim.rlim_cur = soft.min(lim.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut m = Mount::start_command(dir.path(), cmd, env)?;
        m.dir = Some(dir);
        Ok(m)
    }

    fn start_command(at: &Path, mut cmd: Command, env: &[(&str, String)]) -> Result<Mount, String> {
        let log = tempfile::NamedTempFile::new().unwrap();
        cmd.arg("--foreground");
        // Warnings only, unless the test asks for more (or SIMFS_TEST_LOG does, for a
        // debugging run: `SIMFS_TEST_LOG=fuser=debug,simfs=debug cargo test --test fuse X`).
        if !env.iter().any(|(k, _)| *k == "SIMFS_LOG") {
            cmd.env(
                "SIMFS_LOG",
                std::env::var("SIMFS_TEST_LOG").unwrap_or("warn".into()),
            );
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if is_mounted(at) {
                return Ok(Mount {
                    dir: None,
                    at: at.to_path_buf(),
                    child: Some(child),
                    log,
                });
            }
            if let Some(status) = child.try_wait().unwrap() {
                let err = std::fs::read_to_string(log.path()).unwrap_or_default();
                return Err(format!("exit {status}: {err}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("mount did not appear within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the daemon logged so far (warnings and errors).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn unmount(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            eprintln!("simfs log of {}:\n{log}", self.at.display());
        }
        // Busy for a moment after mounting while the daemon primes the kernel's dentry
        // cache through the mount (at most 2 s).
        let busy_until = Instant::now() + Duration::from_secs(3);
        while is_mounted(self.path()) {
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg(self.path())
                .output();
            let busy = out.is_ok_and(|o| String::from_utf8_lossy(&o.stderr).contains("busy"));
            if !busy || Instant::now() > busy_until {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.wait();
        }
        if is_mounted(self.path()) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(self.path())
                .status();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Every path below `root` (not following symlinks), sorted.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// `fault_proxy.py` in front of an Azurite: faults are set by writing its rules file.
pub struct FaultProxy {
    child: Child,
    pub port: u16,
    rules: tempfile::NamedTempFile,
    log: tempfile::NamedTempFile,
}

impl FaultProxy {
    pub fn start(az: &Azurite) -> FaultProxy {
        let port = free_port();
        let rules = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(rules.path(), "{}").unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuse-tests/fault_proxy.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(az.port.to_string())
            .arg(rules.path())
            .arg(log.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start fault_proxy.py");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "fault proxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        FaultProxy {
            child,
            port,
            rules,
            log,
        }
    }

    /// Replaces the rules (JSON, see fault_proxy.py); counts restart.
    pub fn set(&self, rules: &str) {
        // A new mtime even within the same clock tick: write a new file, rename over.
        let tmp = self.rules.path().with_extension("new");
        std::fs::write(&tmp, rules).unwrap();
        std::fs::rename(&tmp, self.rules.path()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }

    /// The faults injected so far, one line each.
    pub fn injected(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path())
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    pub fn connection_string(&self) -> String {
        format!(
            "UseDevelopmentStorage=true;BlobEndpoint=http://127.0.0.1:{}/devstoreaccount1",
            self.port
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `simfs unmount MOUNTPOINT`: its exit status and what it printed.
pub fn simfs_unmount(mountpoint: &Path) -> std::process::Output {
    Command::new(SIMFS)
        .arg("unmount")
        .arg(mountpoint)
        .output()
        .unwrap()
}

/// `simfs sync PATH`, which must succeed.
pub fn simfs_sync(path: &Path) {
    let out = Command::new(SIMFS).arg("sync").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `simfs unmount`, which must succeed (everything was uploaded); then the guard's cleanup.
pub fn unmount_clean(m: &mut Mount) {
    let out = simfs_unmount(m.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    m.unmount();
}

/// Mounts container `source` reached through connection string `cs`.
pub fn mount_with(cs: String, source: &str, cache: &Path, extra: &[&str]) -> Mount {
    let mut args = vec![source, "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    Mount::start(&args, &[("AZURE_STORAGE_CONNECTION_STRING", cs)]).expect("mount")
}

/// A new file at `path`, opened for reading and writing (`O_RDWR | O_CREAT | O_EXCL`, as
/// SQLite, HDF5 and `mkstemp` make theirs).
pub fn create_read_write(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap()
}
