//! `simfs status`: which simfs mounts run on this machine and how they are doing.
//!
//! Each serving simfs process registers itself with a small file in a runtime directory
//! (`/run/simfs` for root, `$XDG_RUNTIME_DIR/simfs` otherwise), named by its pid and removed
//! when it exits; a file whose process is gone (a crash) is ignored and cleaned up. The
//! figures come from the mount's own state directory (the index's size, the cache's size)
//! and from the daemon, over its control socket (the changes waiting to be uploaded, which
//! only the daemon can read from its index).

use simfs::cache::CacheStats;
use simfs::index::Index;
use simfs::protocol::{self, Pending};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Publishes `fs`'s cache figures in `state_dir` for `simfs status` (another process), when
/// they change, checking every two seconds for as long as the daemon runs.
pub fn publish_cache_stats(fs: std::sync::Arc<simfs::fs::SimFs>, state_dir: &Path) {
    let path = state_dir.join(protocol::CACHE_STATS);
    let spawned = std::thread::Builder::new()
        .name("simfs-stats".into())
        .spawn(move || {
            let mut last = None;
            loop {
                let s = fs.cache().stats();
                if last.as_ref() != Some(&s) && protocol::write_file(&path, &s).is_ok() {
                    last = Some(s);
                }
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot publish cache figures: {e}");
    }
}

/// Where serving mounts register.
pub fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return PathBuf::from("/run/simfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("simfs"),
        None => std::env::temp_dir().join(format!("simfs-{euid}")),
    }
}

/// A registered mount; the file goes when this is dropped.
pub struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Registers this process as serving `source` at `mountpoint` from `state_dir`.
pub fn register(
    dir: &Path,
    mountpoint: &Path,
    source: &str,
    state_dir: &Path,
) -> std::io::Result<Registration> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(std::process::id().to_string());
    let reg = protocol::Registration {
        mountpoint: mountpoint.to_path_buf(),
        source: source.to_string(),
        state_dir: state_dir.to_path_buf(),
    };
    protocol::write_file(&path, &reg)?;
    Ok(Registration(path))
}

/// One line for `simfs status`: what a mount has not committed to the container yet.
fn summary(p: &Pending) -> String {
    if p.changes == 0 {
        return "none".to_string();
    }
    let mut s = format!(
        "{} changes; {} files ({:.1} MiB) of data",
        p.changes,
        p.files,
        p.bytes as f64 / (1 << 20) as f64
    );
    if let Some(age) = p.oldest().and_then(|t| t.elapsed().ok()) {
        s += &format!("; oldest {:.0} s old", age.as_secs_f64());
    }
    if p.failing > 0 {
        s += &format!("; {} failing (see the log)", p.failing);
    }
    s
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub source: String,
    pub state_dir: PathBuf,
    pub index_bytes: u64,
    pub cache_bytes: u64,
    /// The serving daemon's cache figures (None: not published yet).
    pub cache: Option<CacheStats>,
    /// What is not in the container yet (None: unreadable).
    pub pending: Option<Pending>,
    /// The last refresh of the index from the container (None: none since it was built).
    pub last_refresh: Option<simfs::refresh::Report>,
}

fn tree_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            // Allocated size: sparse local copies take less than their length.
            _ => e
                .metadata()
                .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512),
        })
        .sum()
}

/// What the journal in `state_dir` holds, and the last refresh. The serving daemon answers
/// (only it can open its index). Without an answer within 2 s the index is read directly,
/// which only an older simfs's index allows; else the figures are unknown.
fn journal(state_dir: &Path) -> (Option<Pending>, Option<simfs::refresh::Report>) {
    let wait = std::time::Duration::from_secs(2);
    if let Ok(protocol::Event::Status {
        pending,
        last_refresh,
    }) = protocol::ask(state_dir, &protocol::Request::Status, wait)
    {
        return (Some(pending), last_refresh);
    }
    let Ok(index) = Index::open_read_only(&state_dir.join("index.db")) else {
        return (None, None);
    };
    (
        Pending::of(&index).ok(),
        simfs::refresh::last_report(&index),
    )
}

/// The mounts registered in `dir` whose process still runs.
pub fn list(dir: &Path) -> Vec<MountInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        let Some(reg) = protocol::read_file::<protocol::Registration>(&e.path()) else {
            continue;
        };
        let state_dir = reg.state_dir;
        let index_bytes = ["index.db", "index.db-wal"]
            .iter()
            .map(|f| std::fs::metadata(state_dir.join(f)).map_or(0, |m| m.len()))
            .sum();
        let (pending, last_refresh) = journal(&state_dir);
        out.push(MountInfo {
            pid,
            mountpoint: reg.mountpoint,
            source: reg.source,
            cache_bytes: tree_size(&state_dir.join("cache")),
            cache: protocol::read_cache_stats(&state_dir),
            state_dir,
            index_bytes,
            pending,
            last_refresh,
        });
    }
    out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    out
}

/// Prints the registered mounts.
pub fn status() -> ExitCode {
    let mounts = list(&runtime_dir());
    if mounts.is_empty() {
        println!("no simfs mounts");
        return ExitCode::SUCCESS;
    }
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    for m in mounts {
        let pending = m.pending.as_ref().map_or("unknown".to_string(), summary);
        println!("{}", m.mountpoint.display());
        println!("  source          {}", m.source);
        println!("  process         {}", m.pid);
        println!("  state           {}", m.state_dir.display());
        println!("  index           {}", mib(m.index_bytes));
        println!("  cache           {} on disk", mib(m.cache_bytes));
        if let Some(c) = &m.cache {
            let of = c.capacity.map_or("no limit".to_string(), |cap| {
                format!("{} allowed", mib(cap))
            });
            let opens = c.hits + c.downloads;
            let rate = if opens == 0 {
                0.0
            } else {
                100.0 * c.hits as f64 / opens as f64
            };
            println!("  clean files     {} of {of}", mib(c.used));
            println!(
                "  hit rate        {rate:.1}% of {opens} opens, {} evictions",
                c.evictions
            );
        }
        println!("  pending uploads {pending}");
        match &m.last_refresh {
            Some(r) => {
                let at = time::OffsetDateTime::from(r.started)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                let scope = if r.scope.is_empty() { "all" } else { &r.scope };
                println!("  last refresh    {at} ({scope}): {}", r.summary());
            }
            None => println!("  last refresh    none since the index was built"),
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_mount_is_listed_until_it_goes() {
        let run = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("cache/data")).unwrap();
        std::fs::write(state.path().join("cache/data/x"), vec![1u8; 8192]).unwrap();
        let reg = register(run.path(), Path::new("/mnt/data"), "az://a/c", state.path()).unwrap();
        // A registration left by a process that is gone is ignored and removed.
        std::fs::write(run.path().join("999999999"), "mountpoint=/gone\n").unwrap();
        let l = list(run.path());
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].pid, std::process::id());
        assert_eq!(l[0].mountpoint, Path::new("/mnt/data"));
        assert_eq!(l[0].source, "az://a/c");
        assert!(l[0].cache_bytes >= 8192);
        assert_eq!(l[0].pending, None, "no index there");
        assert_eq!(l[0].cache, None, "nothing published yet");
        let published = CacheStats {
            capacity: Some(1000),
            used: 500,
            hits: 3,
            downloads: 1,
            evictions: 2,
            evicted_bytes: 0,
        };
        protocol::write_file(&state.path().join(protocol::CACHE_STATS), &published).unwrap();
        let c = list(run.path())[0].cache.clone().unwrap();
        assert_eq!(
            (c.capacity, c.used, c.hits, c.downloads, c.evictions),
            (Some(1000), 500, 3, 1, 2)
        );
        assert!(!run.path().join("999999999").exists());
        drop(reg);
        assert!(list(run.path()).is_empty());
    }

    #[test]
    fn pending_uploads_show_files_bytes_and_the_oldest_age() {
        let p = Pending {
            changes: 4,
            failing: 1,
            files: 3,
            bytes: 3 << 20,
            oldest_ms: Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64
                    - 90_000,
            ),
        };
        let s = summary(&p);
        assert!(
            s.starts_with("4 changes; 3 files (3.0 MiB) of data; oldest 9"),
            "{s}"
        );
        assert!(s.ends_with("1 failing (see the log)"), "{s}");
        let none = Pending {
            changes: 0,
            failing: 0,
            files: 0,
            bytes: 0,
            oldest_ms: None,
        };
        assert_eq!(summary(&none), "none");
    }
}
