//! The control socket: how `simfs stage` and `simfs refresh` talk to a serving mount.
//!
//! A serving daemon listens on `STATE_DIR/control.sock`. The state directory is 0700, so only
//! the user who mounted (and root) can connect. A client sends one `protocol::Request` line
//! and reads `protocol::Event` lines until the daemon closes the connection:
//!
//! - `Stage`: a `Plan`, then `Refused` (the plan does not fit and was not forced) or one
//!   `File` per file staged and a closing `Staged`;
//! - `Evict`: one `Evicted` with the files and bytes dropped;
//! - `Refresh`: lists that subtree (all of the container for `""`) and applies what
//!   changed; one `Refreshed` with the report once the change is visible;
//! - `Sync`: commits what is pending under the paths; `Syncing` progress (at most ten a
//!   second) and a closing `Synced` with what failed;
//! - `Status`: one `Status` with the journal's figures and the last refresh (`simfs
//!   status`: another process cannot open a serving mount's index, see `index`).
//!
//! Any failure is an `Error` event. Paths are relative to the mount's root. A client that
//! goes away cancels its staging: the next event cannot be written and the workers stop.

use crate::fs::stage::StageItem;
use crate::fs::SimFs;
use crate::protocol::{Event, Request, StagePlan, SOCKET};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// The most staging workers one request may run.
pub const MAX_JOBS: usize = 64;

/// Listens on `state_dir/control.sock` in a background thread for as long as the process
/// runs; a socket left by an earlier daemon is replaced.
pub fn listen(fs: Arc<SimFs>, state_dir: &Path) -> std::io::Result<PathBuf> {
    let path = state_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    // Like everything in the state directory: its owner's alone (the directory is 0700 too).
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("simfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let fs = fs.clone();
                let _ = std::thread::Builder::new()
                    .name("simfs-control-conn".into())
                    .spawn(move || serve(&fs, conn));
            }
        })?;
    Ok(path)
}

/// Answers one connection.
pub fn serve(fs: &SimFs, conn: UnixStream) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut line = String::new();
    if BufReader::new(conn).read_line(&mut line).is_err() {
        return;
    }
    let mut send = |e: Event| match serde_json::to_string(&e) {
        Ok(l) => writeln!(out, "{l}").is_ok(),
        Err(_) => false,
    };
    let error = |message: String| Event::Error { message };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            send(error(format!("bad request: {e}")));
            return;
        }
    };
    match req {
        Request::Stage { paths, jobs, force } => {
            stage(fs, &paths, jobs.clamp(1, MAX_JOBS), force, &mut send);
        }
        Request::Evict { paths } => {
            send(match fs.evict_tree(&paths) {
                Ok((files, bytes)) => Event::Evicted { files, bytes },
                Err(e) => error(e.to_string()),
            });
        }
        Request::Sync { paths } => sync(fs, &paths, &mut send),
        Request::Metrics => {
            send(Event::Metrics {
                text: crate::metrics::get().render(),
            });
        }
        Request::Status => {
            send(match crate::protocol::Pending::of(fs.index()) {
                Ok(pending) => Event::Status {
                    pending,
                    last_refresh: crate::refresh::last_report(fs.index()),
                },
                Err(e) => error(e.to_string()),
            });
        }
        Request::Refresh { path } => {
            send(match fs.refresher().refresh_path(&path) {
                Ok(r) => Event::Refreshed(r),
                Err(e) => error(e.to_string()),
            });
        }
    }
}

fn sync(fs: &SimFs, paths: &[String], send: &mut impl FnMut(Event) -> bool) {
    let Some(wb) = fs.writeback() else {
        // A read-only mount has nothing to commit.
        send(Event::Synced {
            committed: 0,
            failed: Vec::new(),
            still_open: Vec::new(),
        });
        return;
    };
    // Progress comes from the upload threads; the connection is written from this one.
    let (tx, rx) = mpsc::channel::<(u64, u64)>();
    let outcome = std::thread::scope(|s| {
        // The sender moves into the worker: the progress loop below ends with it.
        let worker = s.spawn(move || {
            let progress = |done, total| {
                let _ = tx.send((done, total));
            };
            wb.sync_paths(paths, &progress)
        });
        let mut last: Option<std::time::Instant> = None;
        for (done, total) in rx {
            if done == total || last.is_none_or(|t| t.elapsed().as_millis() >= 100) {
                last = Some(std::time::Instant::now());
                // A client that went away does not stop the sync: its data still goes.
                send(Event::Syncing { done, total });
            }
        }
        worker.join()
    });
    send(match outcome {
        Ok(Ok(o)) => Event::Synced {
            committed: o.committed,
            failed: o.failed,
            still_open: o.still_open,
        },
        Ok(Err(e)) => Event::Error {
            message: e.to_string(),
        },
        Err(_) => Event::Error {
            message: "the sync failed unexpectedly (see the mount's log)".into(),
        },
    });
}

fn stage(
    fs: &SimFs,
    paths: &[String],
    jobs: usize,
    force: bool,
    send: &mut impl FnMut(Event) -> bool,
) {
    let plan = match fs.stage_plan(paths) {
        Ok(p) => p,
        Err(e) => {
            send(Event::Error {
                message: e.to_string(),
            });
            return;
        }
    };
    let (todo, skipped) = if plan.fits() {
        (plan.items.clone(), Vec::new())
    } else if force {
        plan.within_room()
    } else {
        (Vec::new(), Vec::new())
    };
    let planned = Event::Plan(StagePlan {
        files: plan.items.len() as u64,
        bytes: plan.bytes,
        cached_bytes: plan.cached_bytes,
        room: plan.room,
        staging_files: todo.len() as u64,
        staging_bytes: todo.iter().map(|i| i.size).sum::<u64>(),
    });
    if !send(planned) {
        return;
    }
    if !plan.fits() && !force {
        send(Event::Refused {
            message: format!(
                "{} files of {} bytes do not fit in the cache's {} bytes",
                plan.items.len(),
                plan.bytes,
                plan.room
            ),
        });
        return;
    }
    let (files, failed) = run_jobs(fs, &todo, jobs, send);
    send(Event::Staged {
        files,
        failed,
        skipped: skipped.len() as u64,
        skipped_bytes: skipped.iter().map(|i| i.size).sum::<u64>(),
    });
}

/// Stages `items` with `jobs` workers, sending a `file` event for each; stops early when an
/// event cannot be sent (the client went away). Returns the files staged and failed.
fn run_jobs(
    fs: &SimFs,
    items: &[StageItem],
    jobs: usize,
    send: &mut impl FnMut(Event) -> bool,
) -> (u64, u64) {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let (mut ok, mut failed) = (0, 0);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(items.len()) {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() || stop.load(Ordering::Relaxed) {
                    return;
                }
                let r = fs.stage_one(&items[i]).map_err(|e| e.to_string());
                if tx.send((i, r)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        for (i, r) in rx {
            let item = &items[i];
            match r {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
            let ev = Event::File {
                path: item.path.clone(),
                bytes: item.size,
                cached: item.cached,
                error: r.err(),
            };
            if !send(ev) {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    (ok, failed)
}
