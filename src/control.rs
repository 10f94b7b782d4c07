//! The control socket: how `simfs stage` and `simfs refresh` talk to a serving mount.
//!
//! A serving daemon listens on `STATE_DIR/control.sock`. The state directory is 0700, so only
//! the user who mounted (and root) can connect. A client sends one JSON request line and
//! reads JSON event lines until the daemon closes the connection:
//!
//! - `{"op":"stage","paths":[...],"jobs":N,"force":false}`: a `plan` event (files, bytes,
//!   cached bytes, room), then `refused` (the plan does not fit and was not forced) or one
//!   `file` event per file staged and a closing `done`;
//! - `{"op":"evict","paths":[...]}`: one `done` event with the files and bytes dropped;
//! - `{"op":"refresh","path":"a/b"}`: lists that subtree (all of the container for `""`)
//!   and applies what changed; one `done` event with the counts once the change is visible.
//!
//! Any failure is an `error` event. Paths are relative to the mount's root. A client that
//! goes away cancels its staging: the next event cannot be written and the workers stop.

use crate::fs::stage::StageItem;
use crate::fs::SimFs;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

pub const SOCKET: &str = "control.sock";

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
    let mut send = |v: Value| writeln!(out, "{v}").is_ok();
    let req: Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(e) => {
            send(json!({"event": "error", "message": format!("bad request: {e}")}));
            return;
        }
    };
    let paths: Vec<String> = req["paths"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    match req["op"].as_str() {
        Some("stage") => {
            let jobs = req["jobs"].as_u64().unwrap_or(8).clamp(1, MAX_JOBS as u64) as usize;
            let force = req["force"].as_bool().unwrap_or(false);
            stage(fs, &paths, jobs, force, &mut send);
        }
        Some("evict") => match fs.evict_tree(&paths) {
            Ok((files, bytes)) => {
                send(json!({"event": "done", "files": files, "bytes": bytes}));
            }
            Err(e) => {
                send(json!({"event": "error", "message": e.to_string()}));
            }
        },
        Some("refresh") => {
            let path = req["path"].as_str().unwrap_or("");
            match fs.refresher().refresh_path(path) {
                Ok(r) => send(json!({
                    "event": "done",
                    "scope": r.scope,
                    "added": r.added,
                    "changed": r.changed,
                    "removed": r.removed,
                    "kept_local": r.kept_local,
                    "listed": r.listed,
                    "list_requests": r.list_requests,
                    "took_ms": r.took.as_millis() as u64,
                })),
                Err(e) => send(json!({"event": "error", "message": e.to_string()})),
            };
        }
        other => {
            send(json!({"event": "error", "message": format!("unknown op {other:?}")}));
        }
    }
}

fn stage(
    fs: &SimFs,
    paths: &[String],
    jobs: usize,
    force: bool,
    send: &mut impl FnMut(Value) -> bool,
) {
    let plan = match fs.stage_plan(paths) {
        Ok(p) => p,
        Err(e) => {
            send(json!({"event": "error", "message": e.to_string()}));
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
    let planned = json!({
        "event": "plan",
        "files": plan.items.len(),
        "bytes": plan.bytes,
        "cached_bytes": plan.cached_bytes,
        "room": plan.room,
        "staging_files": todo.len(),
        "staging_bytes": todo.iter().map(|i| i.size).sum::<u64>(),
    });
    if !send(planned) {
        return;
    }
    if !plan.fits() && !force {
        send(json!({
            "event": "refused",
            "message": format!(
                "{} files of {} bytes do not fit in the cache's {} bytes",
                plan.items.len(), plan.bytes, plan.room
            ),
        }));
        return;
    }
    let (ok, failed) = run_jobs(fs, &todo, jobs, send);
    send(json!({
        "event": "done",
        "files": ok,
        "failed": failed,
        "skipped": skipped.len(),
        "skipped_bytes": skipped.iter().map(|i| i.size).sum::<u64>(),
    }));
}

/// Stages `items` with `jobs` workers, sending a `file` event for each; stops early when an
/// event cannot be sent (the client went away). Returns the files staged and failed.
fn run_jobs(
    fs: &SimFs,
    items: &[StageItem],
    jobs: usize,
    send: &mut impl FnMut(Value) -> bool,
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
            let ev = match &r {
                Ok(()) => {
                    ok += 1;
                    json!({"event": "file", "path": item.path, "bytes": item.size, "cached": item.cached})
                }
                Err(e) => {
                    failed += 1;
                    json!({"event": "file", "path": item.path, "bytes": item.size, "error": e})
                }
            };
            if !send(ev) {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    (ok, failed)
}
