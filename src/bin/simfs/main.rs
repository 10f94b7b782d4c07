//! The `simfs` command: mount, unmount, status, stage, check, bench; also the mount helper that
//! mount(8) runs for `mount -t fuse.simfs` and fstab lines (see `helper.rs`). One module per
//! subcommand; `config.rs` turns the command line into the library's configuration.

#![deny(clippy::undocumented_unsafe_blocks)]

mod bench;
mod check;
mod config;
mod daemon;
mod helper;
mod refresh;
mod stage;
mod stats;
mod status;
mod sync;
mod unmount;

use clap::{CommandFactory, Parser, Subcommand};
use config::SourceArgs;
use helper::{is_helper_call, translate, Flag};
use simfs::mount::ServeOptions;
use std::ffi::OsString;
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
        /// How long the kernel keeps entries and attributes (seconds, or `1h`, `1d`): the
        /// index is authoritative and changes are told to the kernel as they land.
        #[arg(long, default_value = "86400", value_parser = parse_attr_timeout)]
        attr_timeout: f64,
        /// FUSE worker threads [default: the number of CPUs, 2 to 8].
        #[arg(long)]
        threads: Option<usize>,
        /// Mount over a directory that is not empty (its content is hidden while mounted).
        #[arg(long)]
        allow_non_empty: bool,
        /// Do not allow programs on the mount to be executed.
        #[arg(long)]
        noexec: bool,
        /// Never let the kernel read cached files directly (FUSE passthrough: files of 1 MiB
        /// or more, Linux 6.9+, root); reads then go through simfs, as on older kernels.
        #[arg(long)]
        no_passthrough: bool,
        /// Write every file through the kernel's page cache and simfs, as on kernels before
        /// 6.6 (by default, on 6.9+, a file created or opened for writing is written by the
        /// kernel into its local copy; on 6.6 to 6.8 a write-only handle of a new file writes
        /// straight to simfs: one copy of its data fewer, none held twice in memory).
        #[arg(long)]
        buffered_writes: bool,
        /// Answer OPENDIR and RELEASEDIR for every directory listed, as on a kernel without
        /// FUSE_NO_OPENDIR_SUPPORT (by default the kernel lists without them: two round trips
        /// fewer per directory). For comparisons and debugging.
        #[arg(long)]
        open_dirs: bool,
        /// How often the container is listed again to bring in others' changes (new,
        /// changed and deleted blobs): seconds, or `30s`, `5m`, `1h`; 0 turns it off.
        #[arg(long, default_value_t = 60.0, value_parser = parse_interval)]
        refresh_interval: f64,
        /// Entries (breadth-first) listed through the mount before it reports ready, so the
        /// kernel already knows them: their first stat makes no round trip. About 1 KiB of
        /// kernel memory each; 0 turns it off.
        #[arg(long, default_value_t = 100_000)]
        prime_entries: usize,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; in fstab
        /// `metrics_address=127.0.0.1:9464`). See docs/metrics.md.
        #[arg(long, value_name = "HOST:PORT")]
        metrics_address: Option<std::net::SocketAddr>,
        /// How far ahead the kernel reads a file it reads sequentially through simfs (`1M`,
        /// `4M`; 0 keeps the kernel's 128 KiB). Set on the mount's device in sysfs: needs
        /// root, else the default stays.
        #[arg(long, default_value = "1M", value_parser = config::parse_read_ahead)]
        read_ahead: u64,
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
        /// With --write, MiB written to one file in 1 MiB writes without fsync (0: skip).
        #[arg(long, default_value_t = 1024)]
        stream_write_mib: u64,
    },
    /// Hydrate files or directory trees of a serving mount into its cache ahead of a job
    /// (refused when they do not fit in the cache), or drop them again with --evict.
    Stage {
        /// Files or directories on a simfs mount.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Files fetched at once.
        #[arg(long, short, default_value_t = 8)]
        jobs: usize,
        /// Stage what fits when the whole does not fit in the cache.
        #[arg(long)]
        force: bool,
        /// Drop these files from the cache instead (open files and unsent writes stay).
        #[arg(long, conflicts_with = "force")]
        evict: bool,
    },
    /// Bring others' changes to the container into a serving mount now (all of it, or the
    /// subtree PATH), returning once they are visible.
    Refresh {
        /// The mount point (or any path on the mount).
        mountpoint: PathBuf,
        /// A path relative to the mount's root, or an absolute path below the mount point
        /// (it need not exist on the mount yet).
        path: Option<PathBuf>,
    },
    /// Wait until everything closed under PATH (or on every simfs mount) is committed in the
    /// container: the barrier after saving a checkpoint. Lists what failed (exit 1).
    Sync {
        /// Files or directories on simfs mounts; none: every mount, whole.
        paths: Vec<PathBuf>,
    },
    /// What a mount does, a row per interval: FUSE operations, MiB/s from and to the
    /// service, requests, the cache's hit ratio, pending uploads, errors and throttling.
    Stats {
        /// The mount point (or any path on the mount).
        mountpoint: PathBuf,
        /// Time between rows (seconds, or `500ms`, `5s`).
        #[arg(long, default_value = "1", value_parser = parse_stats_interval)]
        interval: f64,
        /// One row, then exit.
        #[arg(long)]
        once: bool,
        /// Each row as a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The index as a shared artefact: `simfs index publish SOURCE --cache-dir DIR` lists the
    /// container once and uploads a snapshot that mounts with --index-from-container start
    /// from.
    Index {
        #[command(subcommand)]
        cmd: IndexCmd,
    },
    /// Index a container and list what the mount hides, and why.
    Check {
        #[command(flatten)]
        source: SourceArgs,
    },
}

fn parse_interval(s: &str) -> Result<f64, String> {
    config::parse_seconds(s, 1.0, 86_400.0, Some("off"))
}

fn parse_stats_interval(s: &str) -> Result<f64, String> {
    config::parse_seconds(s, 0.1, 3600.0, None)
}

fn parse_attr_timeout(s: &str) -> Result<f64, String> {
    config::parse_seconds(s, 0.0, 10.0 * 365.0 * 86_400.0, None)
}

#[derive(Subcommand)]
enum IndexCmd {
    /// List the container and upload its index as a snapshot (under `.simfs/index/` below the
    /// prefix), replacing the previous one unless another publisher replaced it meanwhile.
    Publish {
        #[command(flatten)]
        source: SourceArgs,
    },
}

pub(crate) fn init_logging() {
    // When umount(8) or fusermount3 unmounted the filesystem, fuser's session tries again
    // as it ends and warns "Failed to umount filesystem: Invalid argument" every time: the
    // mount is already gone, so that warning says nothing (an unmount by signal is simfs's
    // own and reports its errors). A reply fuser cannot send is one the kernel no longer
    // waits for: the request was interrupted (a job stopped with Ctrl-C mid-read, answered
    // ENOENT) or the mount is gone (ENODEV, which simfs reports itself); fuser logs each as
    // an ERROR, which reads as a fault.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIMFS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,fuser::session=error,fuser::mnt=error,fuser::reply=off",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
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
    // Every subcommand clap knows (a new one is never mistaken for a helper call).
    let cmd = Cli::command();
    let mut subcommands: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
    subcommands.push("help");
    if raw.len() < 2 || !is_helper_call(&raw[0], &raw[1..], &subcommands) {
        return Ok((raw, false));
    }
    let call = translate(&raw[1..], &mount_flags())?;
    let mut argv = vec![OsString::from("simfs")];
    argv.extend(call.args);
    Ok((argv, call.fake))
}

/// With `RUST_BACKTRACE` set (common on developers' machines, and inherited by a mount
/// started from such a shell), every error value the Azure SDK makes captures a backtrace,
/// and it makes some it then drops on ordinary responses: a tenth of a millisecond each,
/// paid by every upload (1.4% of the daemon's samples during a pip install, perf). Panics
/// keep their backtraces (`RUST_BACKTRACE`); error values get one only when
/// `RUST_LIB_BACKTRACE` asks. Called first, while the process has one thread.
fn quiet_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

fn main() -> ExitCode {
    quiet_error_backtraces();
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
            no_passthrough,
            buffered_writes,
            open_dirs,
            refresh_interval,
            prime_entries,
            metrics_address,
            read_ahead,
        } => {
            let serve = ServeOptions {
                fsname: source.source.clone(),
                allow_other,
                ttl: Duration::from_secs_f64(attr_timeout),
                threads: threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
                }),
                noexec,
                kernel_features: simfs::fuse::KernelFeatures {
                    passthrough: !no_passthrough,
                    list_unopened: !open_dirs,
                    direct_writes: !buffered_writes,
                    in_place_writes: !buffered_writes,
                },
                refresh_interval: Duration::from_secs_f64(refresh_interval),
                prime_entries,
                metrics_address,
                read_ahead,
            };
            let args = daemon::MountArgs {
                mountpoint: &mountpoint,
                foreground,
                allow_non_empty,
                fake,
                serve,
            };
            daemon::mount(&source, &args, &argv[1..])
        }
        Cmd::Unmount { mountpoint } => unmount::unmount(&mountpoint),
        Cmd::Status => status::status(),
        Cmd::Refresh { mountpoint, path } => refresh::refresh(&mountpoint, path.as_deref()),
        Cmd::Sync { paths } => sync::sync(&paths),
        Cmd::Stats {
            mountpoint,
            interval,
            once,
            json,
        } => stats::stats(&mountpoint, interval, once, json),
        Cmd::Stage {
            paths,
            jobs,
            force,
            evict,
        } => stage::stage(&paths, jobs, force, evict),
        Cmd::Bench {
            paths,
            out,
            write,
            small_files,
            stream_write_mib,
        } => bench::bench(
            &paths,
            out.as_deref(),
            write,
            small_files,
            stream_write_mib << 20,
        ),
        Cmd::Index {
            cmd: IndexCmd::Publish { source },
        } => {
            init_logging();
            check::publish(&source)
        }
        Cmd::Check { source } => {
            init_logging();
            check::check(&source)
        }
    }
}
