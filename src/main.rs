//! The `simfs` command: mount, unmount, check; also the mount helper that mount(8) runs
//! for `mount -t fuse.simfs` and fstab lines (see `simfs::options`).

use clap::{CommandFactory, Parser, Subcommand};
use simfs::config::SourceArgs;
use simfs::mount::{block_unmount_signals, prepare, serve, ServeOptions};
use simfs::options::{is_helper_call, translate, Flag};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "simfs",
    version,
    about = "Mount an Azure Blob container as a POSIX filesystem"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount a container (returns once the mount is serving, then runs in the background).
    Mount {
        #[command(flatten)]
        source: SourceArgs,
        /// Where to mount.
        mountpoint: PathBuf,
        /// Stay attached to the terminal (logs to stderr).
        #[arg(long, short)]
        foreground: bool,
        /// Let other users access the mount (needs user_allow_other for non-root).
        #[arg(long)]
        allow_other: bool,
        /// Kernel entry/attribute cache time in seconds (the index is authoritative).
        #[arg(long, default_value_t = 86400)]
        attr_timeout: u64,
        /// FUSE worker threads [default: the number of CPUs, 2 to 8].
        #[arg(long)]
        threads: Option<usize>,
        /// Mount over a directory that is not empty (its content is hidden while mounted).
        #[arg(long)]
        allow_non_empty: bool,
        /// Do not allow programs on the mount to be executed.
        #[arg(long)]
        noexec: bool,
    },
    /// Unmount a simfs mount.
    Unmount { mountpoint: PathBuf },
    /// List the simfs mounts of this machine: index size, cache use, pending uploads.
    Status,
    /// Run one fixed workload on each directory (a simfs mount, a native copy, an rclone or
    /// Blobfuse2 mount, ...) and compare: stat latency, ls -lR, small and large reads.
    /// Paths are discovered on the first directory: put the native copy first.
    Bench {
        /// Directories to compare, each holding the same tree.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Write bench.json and stat-latency.svg here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also create, write and fsync files (in a scratch directory that is removed).
        #[arg(long)]
        write: bool,
        /// How many small files to open and read.
        #[arg(long, default_value_t = 500)]
        small_files: usize,
    },
    /// Index a container and list what the mount hides, and why.
    Check {
        #[command(flatten)]
        source: SourceArgs,
    },
}

/// Environment variable through which a background child reports readiness to its parent.
const READY_FD: &str = "SIMFS_READY_FD";

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIMFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The long options of `simfs mount`, which are also its `-o` options.
fn mount_flags() -> Vec<Flag> {
    let cmd = Cli::command();
    let mount = cmd.find_subcommand("mount").expect("the mount subcommand");
    mount
        .get_arguments()
        .filter_map(|a| {
            Some(Flag {
                name: a.get_long()?.to_string(),
                takes_value: a.get_action().takes_values(),
            })
        })
        .collect()
}

/// The command line as `simfs SUBCOMMAND ...`, translating a mount helper call.
fn command_line() -> Result<(Vec<OsString>, bool), String> {
    let raw: Vec<OsString> = std::env::args_os().collect();
    let subcommands = ["mount", "unmount", "status", "check", "bench", "help"];
    if raw.len() < 2 || !is_helper_call(&raw[0], &raw[1..], &subcommands) {
        return Ok((raw, false));
    }
    let call = translate(&raw[1..], &mount_flags())?;
    let mut argv = vec![OsString::from("simfs")];
    argv.extend(call.args);
    Ok((argv, call.fake))
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

fn main() -> ExitCode {
    let (argv, fake) = match command_line() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("simfs: {e}");
            // mount(8)'s code for a usage error.
            return ExitCode::from(1);
        }
    };
    let cli = Cli::parse_from(&argv);
    match cli.cmd {
        Cmd::Mount {
            source,
            mountpoint,
            foreground,
            allow_other,
            attr_timeout,
            threads,
            allow_non_empty,
            noexec,
        } => {
            let background_child = std::env::var_os(READY_FD).is_some();
            if !background_child {
                if let Err(e) = check_mountpoint(&mountpoint, allow_non_empty) {
                    eprintln!("simfs: {e}");
                    return ExitCode::from(32);
                }
            }
            if fake {
                return ExitCode::SUCCESS;
            }
            if !foreground && !background_child {
                return spawn_background(&source, &argv[1..]);
            }
            block_unmount_signals();
            init_logging();
            let opts = ServeOptions {
                fsname: source.source.clone(),
                allow_other,
                ttl: Duration::from_secs(attr_timeout),
                threads: threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
                }),
                noexec,
            };
            mount_foreground(&source, &mountpoint, &opts)
        }
        Cmd::Unmount { mountpoint } => unmount(&mountpoint),
        Cmd::Status => status(),
        Cmd::Bench {
            paths,
            out,
            write,
            small_files,
        } => bench(&paths, out.as_deref(), write, small_files),
        Cmd::Check { source } => {
            init_logging();
            check(&source)
        }
    }
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
    let rt = runtime();
    let (prepared, _target) = match prepare(source, &rt) {
        Ok(p) => p,
        Err(msg) => {
            report_ready(Err(msg));
            return ExitCode::FAILURE;
        }
    };
    let registration = simfs::status::register(
        &simfs::status::runtime_dir(),
        mountpoint,
        &source.source,
        &prepared.state_dir,
    );
    if let Err(e) = &registration {
        tracing::warn!("cannot register the mount for `simfs status`: {e}");
    }
    let result = serve(prepared.fs.clone(), mountpoint, opts, report_ready);
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
        .open(&log_path)
    {
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

fn bench(paths: &[PathBuf], out: Option<&std::path::Path>, write: bool, small: usize) -> ExitCode {
    use simfs::bench;
    let opts = bench::BenchOptions {
        write,
        small_files: small,
        ..Default::default()
    };
    let plan = match bench::plan(&paths[0], &opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("simfs: cannot walk {}: {e}", paths[0].display());
            return ExitCode::FAILURE;
        }
    };
    let results: Vec<_> = paths
        .iter()
        .map(|p| {
            eprintln!("bench: {} ({} paths)", p.display(), plan.entries.len());
            bench::run(p, &plan, &opts)
        })
        .collect();
    print!("{}", bench::table(&results));
    if let Some(dir) = out {
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| {
                let json = serde_json::to_string_pretty(&bench::to_json(&results))
                    .map_err(std::io::Error::other)?;
                std::fs::write(dir.join("bench.json"), json)
            })
            .and_then(|_| std::fs::write(dir.join("stat-latency.svg"), bench::cdf_svg(&results)));
        match written {
            Ok(()) => eprintln!(
                "bench: wrote {}/bench.json and stat-latency.svg",
                dir.display()
            ),
            Err(e) => {
                eprintln!("simfs: writing {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn status() -> ExitCode {
    let mounts = simfs::status::list(&simfs::status::runtime_dir());
    if mounts.is_empty() {
        println!("no simfs mounts");
        return ExitCode::SUCCESS;
    }
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    for m in mounts {
        let pending = match m.pending {
            Some((0, _)) => "none".to_string(),
            Some((n, 0)) => format!("{n} changes"),
            Some((n, failing)) => format!("{n} changes, {failing} failing (see the log)"),
            None => "unknown".to_string(),
        };
        println!("{}", m.mountpoint.display());
        println!("  source          {}", m.source);
        println!("  process         {}", m.pid);
        println!("  state           {}", m.state_dir.display());
        println!("  index           {}", mib(m.index_bytes));
        println!("  cache           {}", mib(m.cache_bytes));
        println!("  pending uploads {pending}");
    }
    ExitCode::SUCCESS
}

/// The simfs daemons serving `mountpoint` (found by their command line).
fn daemons_of(mountpoint: &std::path::Path) -> Vec<u32> {
    let Ok(target) = std::fs::canonicalize(mountpoint) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            let is_simfs = args.first().is_some_and(|a| a.ends_with(b"simfs"));
            is_simfs
                && args.iter().any(|a| *a == b"mount")
                && args.iter().any(|a| {
                    std::str::from_utf8(a)
                        .ok()
                        .and_then(|a| std::fs::canonicalize(a).ok())
                        .is_some_and(|p| p == target)
                })
        })
        .collect()
}

/// Unmounts, then waits for the daemon to finish uploading what is pending.
fn unmount(mountpoint: &std::path::Path) -> ExitCode {
    let daemons = daemons_of(mountpoint);
    for (prog, args) in [("fusermount3", vec!["-u"]), ("umount", vec![])] {
        match std::process::Command::new(prog)
            .args(&args)
            .arg(mountpoint)
            .status()
        {
            Ok(s) if s.success() => {
                let started = std::time::Instant::now();
                let mut told = false;
                while daemons
                    .iter()
                    .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
                {
                    if !told && started.elapsed() > Duration::from_secs(1) {
                        eprintln!("simfs: waiting for pending uploads to finish...");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                return ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("simfs: {prog}: {e}"),
        }
    }
    eprintln!("simfs: could not unmount {}", mountpoint.display());
    ExitCode::FAILURE
}

fn check(source: &SourceArgs) -> ExitCode {
    let rt = runtime();
    // Checking only reads: it must not start uploading an earlier mount's pending changes.
    let source = SourceArgs {
        read_only: true,
        ..source.clone()
    };
    let (prepared, target) = match prepare(&source, &rt) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("simfs: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let findings = match prepared.fs.index().findings() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("simfs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let hidden = findings.iter().filter(|f| f.hidden).count();
    println!(
        "{}: {} blob(s) hidden, {} note(s)",
        target.container_url,
        hidden,
        findings.len() - hidden
    );
    for f in findings {
        let tag = if f.hidden { "hidden" } else { "note" };
        println!("{tag}\t{}\t{}", f.blob, f.reason);
    }
    ExitCode::SUCCESS
}
