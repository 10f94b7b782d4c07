//! `simfs unmount`: unmounts, then waits for the daemon to finish uploading.

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
