//! `simfs stage PATH...`: hydrate files or trees of a serving mount into its cache ahead of
//! a job, or (`--evict`) drop them again.
//!
//! The paths are resolved to the mount that serves them (from the registrations `simfs
//! status` reads) and sent to its daemon over the control socket (`simfs::control`); the data
//! never passes through this process. Progress is a bar on a terminal and a plain line every
//! few seconds otherwise; the summary names every file that failed and the exit status is
//! non-zero when any did, or when the plan does not fit in the cache and `--force` was not
//! given.

use simfs::protocol::{request, Event, Request};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The serving mount that holds `path`: its state directory and `path` relative to its root.
pub(crate) fn mount_of(path: &Path) -> Result<(PathBuf, String), String> {
    let canon = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let best = crate::status::list(&crate::status::runtime_dir())
        .into_iter()
        .filter_map(|m| {
            let mp = std::fs::canonicalize(&m.mountpoint).ok()?;
            let rel = canon.strip_prefix(&mp).ok()?.to_path_buf();
            Some((mp.as_os_str().len(), m.state_dir, rel))
        })
        .max_by_key(|(len, _, _)| *len);
    let Some((_, state_dir, rel)) = best else {
        return Err(format!(
            "{} is not on a simfs mount this user can see (see `simfs status`)",
            path.display()
        ));
    };
    let rel = rel
        .to_str()
        .ok_or_else(|| format!("{}: not a UTF-8 path", path.display()))?
        .to_string();
    Ok((state_dir, rel))
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

pub fn stage(paths: &[PathBuf], jobs: usize, force: bool, evict: bool) -> ExitCode {
    let mut state = None;
    let mut rels = Vec::new();
    for p in paths {
        match mount_of(p) {
            Ok((dir, rel)) => {
                if state.as_ref().is_some_and(|d| d != &dir) {
                    eprintln!("simfs stage: the paths are on different mounts: stage each mount on its own");
                    return ExitCode::from(2);
                }
                state = Some(dir);
                rels.push(rel);
            }
            Err(e) => {
                eprintln!("simfs stage: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(state) = state else {
        return ExitCode::from(2);
    };
    let req = if evict {
        Request::Evict { paths: rels }
    } else {
        Request::Stage {
            paths: rels,
            jobs,
            force,
        }
    };
    let events = match request(&state, &req) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("simfs stage: {e}");
            return ExitCode::FAILURE;
        }
    };
    if evict {
        return evict_report(events);
    }
    stage_report(events)
}

fn evict_report(events: impl Iterator<Item = Result<Event, String>>) -> ExitCode {
    for ev in events {
        match ev {
            Ok(Event::Evicted { files, bytes }) => {
                println!("dropped {files} files ({}) from the cache", gib(bytes));
                return ExitCode::SUCCESS;
            }
            Ok(Event::Error { message }) | Err(message) => {
                eprintln!("simfs stage --evict: {message}");
                return ExitCode::FAILURE;
            }
            Ok(_) => {}
        }
    }
    eprintln!("simfs stage --evict: the daemon closed the connection");
    ExitCode::FAILURE
}

/// Progress as the events arrive: a bar on a terminal, a line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    files: u64,
    total_files: u64,
    bytes: u64,
    total_bytes: u64,
    start: Instant,
    last_line: Instant,
}

impl Progress {
    fn new(total_files: u64, total_bytes: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total_bytes);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("a valid template"),
            );
            b
        });
        Progress {
            bar,
            files: 0,
            total_files,
            bytes: 0,
            total_bytes,
            start: Instant::now(),
            last_line: Instant::now(),
        }
    }

    fn rate(&self) -> f64 {
        self.bytes as f64 / self.start.elapsed().as_secs_f64().max(1e-3)
    }

    fn advance(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
        if let Some(b) = &self.bar {
            b.set_position(self.bytes);
            b.set_message(format!("{}/{} files", self.files, self.total_files));
        } else if self.last_line.elapsed() >= Duration::from_secs(2) {
            self.last_line = Instant::now();
            let rate = self.rate();
            let eta = (self.total_bytes - self.bytes.min(self.total_bytes)) as f64 / rate.max(1.0);
            println!(
                "staged {}/{} files, {} of {}, {:.1} MiB/s, ETA {:.0}s",
                self.files,
                self.total_files,
                gib(self.bytes),
                gib(self.total_bytes),
                rate / (1 << 20) as f64,
                eta
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn stage_report(events: impl Iterator<Item = Result<Event, String>>) -> ExitCode {
    let mut progress: Option<Progress> = None;
    let mut failures = Vec::new();
    let mut already = 0u64;
    for ev in events {
        match ev {
            Ok(Event::Plan(plan)) => {
                println!(
                    "{} files, {} ({} cached already); the cache holds {}",
                    plan.files,
                    gib(plan.bytes),
                    gib(plan.cached_bytes),
                    gib(plan.room)
                );
                progress = Some(Progress::new(plan.staging_files, plan.staging_bytes));
            }
            Ok(Event::Refused { message }) => {
                eprintln!(
                    "simfs stage: refused: {message}; stage a smaller tree, give the cache more room (--cache-size), or --force to stage what fits"
                );
                return ExitCode::FAILURE;
            }
            Ok(Event::File {
                path,
                bytes,
                cached,
                error,
            }) => {
                match error {
                    Some(e) => failures.push(format!("{path}: {e}")),
                    None if cached => already += 1,
                    None => {}
                }
                if let Some(p) = &mut progress {
                    p.advance(bytes);
                }
            }
            Ok(Event::Staged {
                files,
                skipped,
                skipped_bytes,
                ..
            }) => {
                let took = progress
                    .as_ref()
                    .map_or(0.0, |p| p.start.elapsed().as_secs_f64());
                if let Some(p) = &progress {
                    p.finish();
                    println!(
                        "staged {files} files ({}) in {took:.1}s, {:.1} MiB/s; {already} were cached already",
                        gib(p.bytes),
                        p.rate() / (1 << 20) as f64
                    );
                }
                if skipped > 0 {
                    println!(
                        "skipped {skipped} files ({}) that do not fit (--force)",
                        gib(skipped_bytes)
                    );
                }
                if failures.is_empty() {
                    return ExitCode::SUCCESS;
                }
                eprintln!("{} files failed:", failures.len());
                for f in &failures {
                    eprintln!("  {f}");
                }
                return ExitCode::FAILURE;
            }
            Ok(Event::Error { message }) | Err(message) => {
                if let Some(p) = &progress {
                    p.finish();
                }
                eprintln!("simfs stage: {message}");
                return ExitCode::FAILURE;
            }
            Ok(_) => {}
        }
    }
    if let Some(p) = &progress {
        p.finish();
    }
    eprintln!("simfs stage: the daemon closed the connection before the end (unmounted?)");
    ExitCode::FAILURE
}
