//! `simfs check`: indexes a container and lists what the mount hides, and why.

use crate::config::{resolve, SourceArgs};
use crate::runtime;
use simfs::index::ingest::no_progress;
use simfs::mount::prepare;
use std::process::ExitCode;

pub fn check(source: &SourceArgs) -> ExitCode {
    let target = match resolve(source, &|k| std::env::var(k).ok()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("simfs: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Checking only reads: it must not start uploading an earlier mount's pending changes.
    let mut cfg = source.mount_config();
    cfg.read_only = true;
    let rt = runtime();
    let prepared = match prepare(&target, &cfg, &rt, &no_progress) {
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
