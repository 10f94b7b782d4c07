//! `simfs mount`: checks the mountpoint, then either serves in the foreground or starts
//! itself again as a detached child and waits until that child serves (or says why not),
//! so a script or mount(8) sees the mount ready when the command returns.

use crate::config::{resolve, SourceArgs};
use crate::{init_logging, runtime};
use simfs::index::ingest::IngestProgress;
use simfs::mount::{block_unmount_signals, finish_uploads, prepare, serve, ServeOptions};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Environment variable through which a background child reports readiness to its parent.
const READY_FD: &str = "SIMFS_READY_FD";

/// What `simfs mount` was asked, besides the source.
pub struct MountArgs<'a> {
    pub mountpoint: &'a Path,
    pub foreground: bool,
    pub allow_non_empty: bool,
    /// `-f` of the mount helper: check everything, mount nothing.
    pub fake: bool,
    pub serve: ServeOptions,
}

/// Runs `simfs mount`; `argv` is the command line to start the background child with.
pub fn mount(source: &SourceArgs, a: &MountArgs<'_>, argv: &[OsString]) -> ExitCode {
    let background_child = std::env::var_os(READY_FD).is_some();
    if !background_child {
        if let Err(e) = check_mountpoint(a.mountpoint, a.allow_non_empty) {
            eprintln!("simfs: {e}");
            return ExitCode::from(32);
        }
    }
    if a.fake {
        return ExitCode::SUCCESS;
    }
    if !a.foreground && !background_child {
        return spawn_background(source, argv);
    }
    block_unmount_signals();
    init_logging();
    mount_foreground(source, a.mountpoint, &a.serve)
}

/// Draws indexing progress on stderr once it has taken more than two seconds.
struct IndexingBar {
    started: Instant,
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl IndexingBar {
    fn new() -> IndexingBar {
        IndexingBar {
            started: Instant::now(),
            bar: Mutex::new(None),
        }
    }

    fn show(&self, p: IngestProgress) {
        let mut bar = self.bar.lock().unwrap_or_else(|p| p.into_inner());
        if bar.is_none() && self.started.elapsed() > Duration::from_secs(2) {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(200));
            *bar = Some(b);
        }
        if let Some(b) = bar.as_ref() {
            b.set_message(match p {
                IngestProgress::Listed { blobs, requests } => {
                    format!("indexing: {blobs} blobs listed ({requests} requests)")
                }
                IngestProgress::ReadingTargets(n) => {
                    format!("indexing: reading {n} symlink targets")
                }
            });
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

/// A mountpoint must be a directory that nothing is mounted on, and empty unless asked.
fn check_mountpoint(path: &std::path::Path, allow_non_empty: bool) -> Result<(), String> {
    let shown = path.display();
    let entries = std::fs::read_dir(path).map_err(|e| format!("mountpoint {shown}: {e}"))?;
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("mountpoint {shown}: {e}"))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let target = canonical.to_string_lossy().replace(' ', "\\040");
    if mounts.lines().any(|l| l.split(' ').nth(1) == Some(&target)) {
        return Err(format!(
            "{shown} is already a mount point (unmount it first: simfs unmount {shown})"
        ));
    }
    if !allow_non_empty && entries.count() > 0 {
        return Err(format!(
            "mountpoint {shown} is not empty; mounting would hide its content (use --allow-non-empty, or -o nonempty)"
        ));
    }
    Ok(())
}

/// Reports readiness to the waiting parent, if there is one.
fn report_ready(result: Result<(), String>) {
    let Some(fd) = std::env::var(READY_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        if let Err(m) = result {
            eprintln!("simfs: {m}");
        }
        return;
    };
    // SAFETY: the parent passed us this descriptor for exactly this one message.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let msg = match result {
        Ok(()) => "ok\n".to_string(),
        Err(m) => format!("{m}\n"),
    };
    let _ = f.write_all(msg.as_bytes());
}

fn mount_foreground(
    source: &SourceArgs,
    mountpoint: &std::path::Path,
    opts: &ServeOptions,
) -> ExitCode {
    if !mountpoint.is_dir() {
        report_ready(Err(format!(
            "mountpoint {} is not a directory",
            mountpoint.display()
        )));
        return ExitCode::FAILURE;
    }
    // Everything the daemon creates (index, journal, cache, lock) is its owner's alone.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    let target = match resolve(source, &|k| std::env::var(k).ok()) {
        Ok(t) => t,
        Err(e) => {
            report_ready(Err(e.to_string()));
            return ExitCode::FAILURE;
        }
    };
    // Read once: from here on the secrets live only in the credential (still one thread).
    crate::config::forget_secrets();
    let rt = runtime();
    let bar = IndexingBar::new();
    let (kernel, link) = simfs::kernel::Kernel::for_session();
    let prepared = match prepare(&target, &source.mount_config(), &kernel, &rt, &|p| {
        bar.show(p)
    }) {
        Ok(p) => p,
        Err(msg) => {
            report_ready(Err(msg));
            return ExitCode::FAILURE;
        }
    };
    bar.finish();
    let registration = crate::status::register(
        &crate::status::runtime_dir(),
        mountpoint,
        &source.source,
        &prepared.state_dir,
    );
    if let Err(e) = &registration {
        tracing::warn!("cannot register the mount for `simfs status`: {e}");
    }
    crate::status::publish_cache_stats(prepared.fs.clone(), &prepared.state_dir);
    if let Err(e) = simfs::control::listen(prepared.fs.clone(), &prepared.state_dir) {
        tracing::warn!("no control socket (`simfs stage` will not reach this mount): {e}");
    }
    let result = serve(
        prepared.fs.clone(),
        (kernel, link),
        mountpoint,
        opts,
        rt.handle(),
        report_ready,
    )
    .and_then(|()| {
        // A bar on a terminal; the library logs a line every few seconds for the log file.
        let bar = indicatif::ProgressBar::hidden();
        let r = finish_uploads(&prepared.fs, |total, left| {
            if bar.is_hidden() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(total);
                bar.set_message("uploading pending changes");
            }
            bar.set_position(total.saturating_sub(left));
        });
        bar.finish_and_clear();
        r
    });
    drop(registration);
    drop(prepared);
    match result {
        Ok(()) => {
            tracing::info!("unmounted {}", mountpoint.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Starts `simfs mount` again as a detached child and waits until it serves or fails.
fn spawn_background(source: &SourceArgs, args: &[OsString]) -> ExitCode {
    let (mut reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("simfs: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&source.cache_dir) {
        eprintln!("simfs: cache dir {}: {e}", source.cache_dir.display());
        return ExitCode::FAILURE;
    }
    let log_path = source.cache_dir.join("simfs.log");
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .and_then(|f| {
            // A log made by an older simfs may still be readable by others.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            Ok(f)
        }) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("simfs: log file {}: {e}", log_path.display());
            return ExitCode::FAILURE;
        }
    };
    let wfd = writer.as_raw_fd();
    let exe = std::env::current_exe().unwrap_or_else(|_| "simfs".into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env(READY_FD, wfd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::setsid();
            let flags = libc::fcntl(wfd, libc::F_GETFD);
            libc::fcntl(wfd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(writer);
    if let Err(e) = child {
        eprintln!("simfs: cannot start the mount process: {e}");
        return ExitCode::FAILURE;
    }
    let mut answer = String::new();
    let _ = reader.read_to_string(&mut answer);
    match answer.trim() {
        "ok" => ExitCode::SUCCESS,
        "" => {
            eprintln!(
                "simfs: the mount process exited without mounting; see {}",
                log_path.display()
            );
            ExitCode::from(32)
        }
        msg => {
            eprintln!("simfs: {msg}");
            // mount(8)'s code for a mount failure.
            ExitCode::from(32)
        }
    }
}
