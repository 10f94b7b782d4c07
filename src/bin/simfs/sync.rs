//! `simfs sync [PATH...]`: return once everything closed under PATH (or on every mount) is
//! committed in the container: the barrier to run after saving a checkpoint.
//!
//! Each path is resolved to the mount that serves it and the daemon is asked over the control
//! socket (`simfs::protocol::Request::Sync`); with no path, every simfs mount this user can
//! see is synced whole. Progress is a bar on a terminal; the exit status is non-zero when any
//! file could not be committed, and each is listed with why (it stays pending and is retried).

use simfs::protocol::{request, Event, Request};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

pub fn sync(paths: &[PathBuf]) -> ExitCode {
    // State directory → paths relative to that mount's root (empty: all of it).
    let mut mounts: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    if paths.is_empty() {
        for m in crate::status::list(&crate::status::runtime_dir()) {
            mounts.entry(m.state_dir).or_default();
        }
        if mounts.is_empty() {
            println!("no simfs mounts");
            return ExitCode::SUCCESS;
        }
    }
    for p in paths {
        match crate::stage::mount_of(p) {
            Ok((dir, rel)) => mounts.entry(dir).or_default().push(rel),
            Err(e) => {
                eprintln!("simfs sync: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let mut ok = true;
    for (state_dir, rels) in mounts {
        // A path at a mount's root syncs all of it.
        let rels = if rels.iter().any(String::is_empty) {
            Vec::new()
        } else {
            rels
        };
        ok &= sync_one(&state_dir, rels);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Syncs one mount; whether everything was committed.
fn sync_one(state_dir: &std::path::Path, paths: Vec<String>) -> bool {
    let events = match request(state_dir, &Request::Sync { paths }) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("simfs sync: {e}");
            return false;
        }
    };
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} files {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message("committing");
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    for ev in events {
        match ev {
            Ok(Event::Syncing { done, total }) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Ok(Event::Synced {
                committed,
                failed,
                still_open,
            }) => {
                bar.finish_and_clear();
                println!("committed {committed} changes");
                if !still_open.is_empty() {
                    println!(
                        "{} files are still open for writing and were left out (close, then sync again):",
                        still_open.len()
                    );
                    for p in &still_open {
                        println!("  {p}");
                    }
                }
                if failed.is_empty() {
                    return true;
                }
                eprintln!(
                    "simfs sync: {} could not be committed (they stay pending and are retried):",
                    failed.len()
                );
                for (path, why) in &failed {
                    eprintln!("  {path}: {why}");
                }
                return false;
            }
            Ok(Event::Error { message }) | Err(message) => {
                bar.finish_and_clear();
                eprintln!("simfs sync: {message}");
                return false;
            }
            Ok(_) => {}
        }
    }
    bar.finish_and_clear();
    eprintln!("simfs sync: the daemon closed the connection before the end (unmounted?)");
    false
}
