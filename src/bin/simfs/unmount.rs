//! `simfs unmount`: unmounts, then waits for the daemon to finish uploading, and says what
//! it could not upload: the exit status is non-zero while anything is left in the journal
//! (it stays there for the next mount with the same cache directory).

use std::process::ExitCode;
use std::time::Duration;

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
pub fn unmount(mountpoint: &std::path::Path) -> ExitCode {
    let daemons = daemons_of(mountpoint);
    // Where the serving daemons keep their journals, read again once they are gone.
    let state_dirs: Vec<_> = crate::status::list(&crate::status::runtime_dir())
        .into_iter()
        .filter(|m| daemons.contains(&m.pid))
        .map(|m| m.state_dir)
        .collect();
    // A mount is busy for a moment after it appears while its daemon primes the kernel's
    // dentry cache through it (`--prime-entries`, at most 2 s): a busy mount is tried again.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let mut busy = false;
        for (prog, args) in [("fusermount3", vec!["-u"]), ("umount", vec![])] {
            match std::process::Command::new(prog)
                .args(&args)
                .arg(mountpoint)
                .stderr(std::process::Stdio::piped())
                .output()
            {
                Ok(o) if o.status.success() => {
                    let started = std::time::Instant::now();
                    let mut told = false;
                    while daemons.iter().any(|p| alive(*p)) {
                        if !told && started.elapsed() > Duration::from_secs(1) {
                            eprintln!("simfs: waiting for pending uploads to finish...");
                            told = true;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    return left_behind(&state_dirs);
                }
                Ok(o) => {
                    let err = String::from_utf8_lossy(&o.stderr);
                    busy |= err.contains("busy");
                    if std::time::Instant::now() > deadline || !busy {
                        eprint!("{err}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => eprintln!("simfs: {prog}: {e}"),
            }
        }
        if !busy || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("simfs: could not unmount {}", mountpoint.display());
    ExitCode::FAILURE
}

/// Reports what the journals in `state_dirs` still hold; failure when anything.
fn left_behind(state_dirs: &[std::path::PathBuf]) -> ExitCode {
    let mut left = 0;
    for dir in state_dirs {
        let index = match simfs::index::Index::open_read_only(&dir.join("index.db")) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("simfs: cannot read the journal in {}: {e}", dir.display());
                left += 1;
                continue;
            }
        };
        let (pending, failing) = match (index.pending(), index.failing()) {
            (Ok((p, _)), Ok(f)) => (p, f),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("simfs: cannot read the journal in {}: {e}", dir.display());
                left += 1;
                continue;
            }
        };
        if pending == 0 {
            continue;
        }
        left += pending;
        eprintln!(
            "simfs: {pending} changes were not uploaded; they are kept in {} and uploaded by the next mount with the same --cache-dir",
            dir.display()
        );
        for f in failing.iter().take(5) {
            eprintln!(
                "simfs:   inode {} ({} attempts): {}",
                f.ino, f.attempts, f.error
            );
        }
    }
    if left > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Whether process `pid` still runs (a zombie has finished: it only waits to be reaped).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold anything.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}
