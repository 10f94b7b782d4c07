//! `simfs check`: indexes a container and lists what the mount hides, and why; and `simfs
//! index publish`, which indexes it to share the index with a fleet.

use crate::config::{resolve, SourceArgs};
use crate::runtime;
use simfs::index::ingest::no_progress;
use simfs::kernel::Kernel;
use simfs::mount::{prepare, publish_index, Source};
use std::process::ExitCode;

/// The source the arguments and the process environment name; an error is printed.
fn resolve_from_env(source: &SourceArgs) -> Option<Source> {
    resolve(source, &|k| std::env::var(k).ok())
        .map_err(|e| eprintln!("simfs: {e}"))
        .ok()
}

pub fn check(source: &SourceArgs) -> ExitCode {
    let Some(target) = resolve_from_env(source) else {
        return ExitCode::FAILURE;
    };
    // Checking only reads: it must not start uploading an earlier mount's pending changes.
    let mut cfg = source.mount_config();
    cfg.read_only = true;
    let rt = runtime();
    let prepared = match prepare(&target, &cfg, &Kernel::none(), &rt, &no_progress) {
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

pub fn publish(source: &SourceArgs) -> ExitCode {
    let Some(target) = resolve_from_env(source) else {
        return ExitCode::FAILURE;
    };
    let rt = runtime();
    let t0 = std::time::Instant::now();
    match publish_index(&target, &source.mount_config(), &rt) {
        Ok(p) => {
            println!(
                "published {} entries to {} ({:.1} MiB index, {:.1} MiB compressed) in {:.1} s",
                p.entries,
                p.blob,
                p.index_bytes as f64 / (1 << 20) as f64,
                p.snapshot_bytes as f64 / (1 << 20) as f64,
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("simfs index publish: {e}");
            ExitCode::FAILURE
        }
    }
}
