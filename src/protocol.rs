//! The one protocol between a serving daemon and the `simfs` commands, on both sides.
//!
//! Over the control socket (`STATE_DIR/control.sock`, see `control`), a client sends one
//! `Request` as a JSON line and reads `Event` lines until the daemon closes the connection.
//! Beside the socket, the daemon keeps two small JSON files that `simfs status` reads even
//! when the daemon is too busy to answer: its `Registration` (in the runtime directory) and
//! its cache figures (`CacheStats`, in the state directory). Every type here is serde-derived
//! and used by both sides: no key is spelled twice.

use crate::cache::CacheStats;
use crate::refresh::Report;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The control socket's name in the state directory.
pub const SOCKET: &str = "control.sock";
/// The cache figures' file in the state directory.
pub const CACHE_STATS: &str = "cache-stats.json";

/// What a client asks. Paths are relative to the mount's root ("" for all of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Hydrate the files under `paths` with `jobs` workers; `force` stages what fits when
    /// all of it does not.
    Stage {
        paths: Vec<String>,
        jobs: usize,
        force: bool,
    },
    /// Drop the clean cached copies under `paths`.
    Evict { paths: Vec<String> },
    /// List the subtree at `path` and apply what changed.
    Refresh { path: String },
    /// Commit everything pending under `paths` (all of the mount when empty) to the
    /// container now.
    Sync { paths: Vec<String> },
    /// The daemon's metrics now (`simfs stats`).
    Metrics,
    /// What the mount has not committed yet, and its last refresh (`simfs status`).
    Status,
}

/// What staging will do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    pub files: u64,
    pub bytes: u64,
    pub cached_bytes: u64,
    /// What the cache may hold.
    pub room: u64,
    pub staging_files: u64,
    pub staging_bytes: u64,
}

/// What the daemon answers, a line each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Staging's plan, first.
    Plan(StagePlan),
    /// The plan does not fit in the cache and `force` was not given: nothing was staged.
    Refused {
        message: String,
    },
    /// One file staged (or failed: `error`).
    File {
        path: String,
        bytes: u64,
        cached: bool,
        error: Option<String>,
    },
    /// Staging ended.
    Staged {
        files: u64,
        failed: u64,
        skipped: u64,
        skipped_bytes: u64,
    },
    Evicted {
        files: u64,
        bytes: u64,
    },
    /// The refresh is applied and visible.
    Refreshed(Report),
    /// A sync's progress: inodes committed (or failed) of those it waits for.
    Syncing {
        done: u64,
        total: u64,
    },
    /// The sync ended: what it committed, what failed (path and why) and the files it left
    /// out because a handle is still writing them.
    Synced {
        committed: u64,
        failed: Vec<(String, String)>,
        still_open: Vec<String>,
    },
    /// The metrics in the OpenMetrics text format (see docs/metrics.md).
    Metrics {
        text: String,
    },
    /// The journal's figures; the last refresh (None: none since the index was built).
    Status {
        pending: Pending,
        last_refresh: Option<Report>,
    },
    /// The request failed.
    Error {
        message: String,
    },
}

/// What a mount has not committed to the container yet, from its journal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Pending changes (inodes and deletions), and how many of those keep failing.
    pub changes: u64,
    pub failing: usize,
    /// Closed files whose data is not uploaded yet, and their bytes: what a wiped cache disk
    /// would lose.
    pub files: u64,
    pub bytes: u64,
    /// When the least recently changed pending inode changed, in ms since the epoch.
    pub oldest_ms: Option<u64>,
}

impl Pending {
    pub fn of(i: &crate::index::Index) -> crate::index::IndexResult<Pending> {
        let (files, bytes) = i.pending_data(0)?;
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        Ok(Pending {
            changes: i.pending()?.0,
            failing: i.failing()?.len(),
            files,
            bytes,
            oldest_ms: i.oldest_pending()?.map(ms),
        })
    }

    /// When the least recently changed pending inode changed.
    pub fn oldest(&self) -> Option<std::time::SystemTime> {
        self.oldest_ms
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }
}

/// Connects to the daemon whose state directory is `state_dir` and sends `req`.
fn send(state_dir: &Path, req: &Request) -> Result<UnixStream, String> {
    let sock = state_dir.join(SOCKET);
    let mut conn = UnixStream::connect(&sock)
        .map_err(|e| format!("cannot reach the mount's daemon at {}: {e}", sock.display()))?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(conn, "{line}").map_err(|e| format!("{}: {e}", sock.display()))?;
    Ok(conn)
}

fn event(line: &str) -> Result<Event, String> {
    serde_json::from_str::<Event>(line).map_err(|e| format!("bad answer {line:?}: {e}"))
}

/// Sends `req` to the daemon whose state directory is `state_dir`; its events, as they come.
/// A line that is not an event ends the stream with an error.
pub fn request(
    state_dir: &Path,
    req: &Request,
) -> Result<impl Iterator<Item = Result<Event, String>>, String> {
    let conn = send(state_dir, req)?;
    Ok(BufReader::new(conn)
        .lines()
        .map_while(Result::ok)
        .map(|l| event(&l)))
}

/// Sends `req` and returns the daemon's first answer, waiting at most `wait` for it.
pub fn ask(state_dir: &Path, req: &Request, wait: std::time::Duration) -> Result<Event, String> {
    let conn = send(state_dir, req)?;
    conn.set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the mount's daemon: {e}"))?;
    event(line.trim_end())
}

/// A serving mount, as `simfs status` finds it (one file per daemon, named by its pid).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub mountpoint: PathBuf,
    pub source: String,
    pub state_dir: PathBuf,
}

/// Writes `value` to `path` as JSON, atomically (a reader never sees half of it), 0600.
pub fn write_file<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&text)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Reads a JSON file written by `write_file`; None when absent or not of this type.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The cache figures of the daemon with state directory `state_dir`.
pub fn read_cache_stats(state_dir: &Path) -> Option<CacheStats> {
    read_file(&state_dir.join(CACHE_STATS))
}

/// Serde for a `SystemTime` as milliseconds since the epoch.
pub(crate) mod unix_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        s.serialize_u64(ms.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(SystemTime::UNIX_EPOCH + Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Serde for a `Duration` as milliseconds.
pub(crate) mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(t: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn requests_and_events_read_back_as_written() {
        let reqs = [
            Request::Stage {
                paths: vec!["a/b".into()],
                jobs: 4,
                force: true,
            },
            Request::Evict { paths: vec![] },
            Request::Refresh { path: "x".into() },
            Request::Sync {
                paths: vec!["ckpt".into()],
            },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        }
        let report = Report {
            scope: "d".into(),
            started: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            took: Duration::from_millis(42),
            list_requests: 3,
            listed: 10,
            added: 1,
            changed: 2,
            removed: 0,
            kept_local: 1,
        };
        let events = [
            Event::Plan(StagePlan {
                files: 2,
                ..Default::default()
            }),
            Event::File {
                path: "p".into(),
                bytes: 9,
                cached: false,
                error: Some("boom".into()),
            },
            Event::Refreshed(report),
            Event::Synced {
                committed: 3,
                failed: vec![("a/b".into(), "EIO".into())],
                still_open: vec!["log".into()],
            },
            Event::Error {
                message: "no".into(),
            },
        ];
        for e in events {
            let line = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
        }
    }

    #[test]
    fn a_report_recorded_by_an_earlier_version_still_reads() {
        let old = r#"{"scope":"","started_unix_ms":1000,"took_ms":250,"list_requests":1,"listed":5,"added":5,"changed":0,"removed":0,"kept_local":0}"#;
        let r: Report = serde_json::from_str(old).unwrap();
        assert_eq!(r.took, Duration::from_millis(250));
        assert_eq!(r.started, SystemTime::UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(r.listed, 5);
    }

    #[test]
    fn a_file_written_is_read_back_and_a_foreign_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("reg.json");
        let reg = Registration {
            mountpoint: "/mnt/x".into(),
            source: "az://a/c".into(),
            state_dir: "/s".into(),
        };
        write_file(&p, &reg).unwrap();
        assert_eq!(read_file::<Registration>(&p), Some(reg));
        std::fs::write(&p, "mountpoint=/mnt/x\n").unwrap();
        assert_eq!(read_file::<Registration>(&p), None);
    }
}
