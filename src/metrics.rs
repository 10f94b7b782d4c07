//! What the daemon counts, for Prometheus (`--metrics-address`; docs/metrics.md lists every
//! family with its unit).
//!
//! One set per process (a daemon serves one mount), always counting: an increment is an
//! atomic add, a timing an `Instant` and a histogram observation, so the hot paths stay as
//! fast as they are (criterion `hot_paths`, before and after, in BENCHMARKS.md). Counters
//! are bumped where things happen: every HTTP attempt to the service by the pipeline policy
//! in `blob::azure` (so they equal what a proxy in front of the service sees), every FUSE
//! request by `fuse.rs`. Levels (cache use, pending uploads, index entries, the process's
//! memory and CPU) are read at scrape time from the daemon's own state through `Source`.
//!
//! No label takes a path or a blob name: label values come from fixed sets (operations,
//! outcomes, opcodes), so the number of series is bounded.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

type Labels = Vec<(&'static str, &'static str)>;

fn latency() -> Histogram {
    // 100 us to about 52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// The levels read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Levels {
    pub cache_used_bytes: u64,
    pub cache_limit_bytes: Option<u64>,
    pub fills_in_flight: u64,
    pub pending_files: u64,
    pub pending_bytes: u64,
    pub oldest_pending_seconds: f64,
    /// Uploads under way now, and how many the background would run at once now.
    pub uploads_in_flight: u64,
    pub upload_window: u64,
    pub index_entries: u64,
    pub refresh_last_success_unix: Option<f64>,
    pub refresh_last_seconds: Option<f64>,
}

/// Where the levels come from: set by the mount once it is serving.
pub type Source = Box<dyn Fn() -> Levels + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    pub blob_requests: Family<Labels, Counter>,
    pub blob_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub blob_bytes: Family<Labels, Counter>,
    pub blob_retries: Family<Labels, Counter>,
    pub fuse_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub fuse_errors: Family<Labels, Counter>,
    pub uploads: Family<Labels, Counter>,
    pub prefetch: Family<Labels, Counter>,
    pub refresh_changes: Family<Labels, Counter>,
    /// Files opened: served from the cache (hit) or downloaded (miss); and bytes read.
    pub cache_opens: Family<Labels, Counter>,
    pub cache_open_bytes: Family<Labels, Counter>,
    pub cache_evictions: Counter,
    pub cache_evicted_bytes: Counter,
    levels: Vec<(&'static str, Gauge<f64, AtomicU64>)>,
    source: Mutex<Option<Source>>,
}

/// The levels read at scrape time: (name, help, unit).
const LEVELS: &[(&str, &str, Option<Unit>)] = &[
    (
        "cache_used",
        "Bytes the clean cached files take on the cache disk",
        Some(Unit::Bytes),
    ),
    (
        "cache_limit",
        "The most the clean cached files may take (--cache-size)",
        Some(Unit::Bytes),
    ),
    (
        "cache_fills_in_flight",
        "Downloads of whole files under way",
        None,
    ),
    (
        "writeback_pending_files",
        "Inodes changed here and not yet committed in the container",
        None,
    ),
    (
        "writeback_pending",
        "Bytes of closed files not yet committed",
        Some(Unit::Bytes),
    ),
    (
        "writeback_oldest_pending_age",
        "Age of the oldest change not yet committed",
        Some(Unit::Seconds),
    ),
    (
        "writeback_uploads_in_flight",
        "Uploads under way now, in the background and waited for (fsync, sync)",
        None,
    ),
    (
        "writeback_upload_window",
        "How many uploads the background runs at once now, adapted to how the service answers",
        None,
    ),
    ("index_entries", "Entries (names) in the index", None),
    (
        "refresh_last_success_timestamp",
        "When the last refresh of the index from a listing succeeded (Unix time)",
        Some(Unit::Seconds),
    ),
    (
        "refresh_last_duration",
        "How long the last refresh took",
        Some(Unit::Seconds),
    ),
    (
        "process_resident_memory",
        "Resident memory of the daemon",
        Some(Unit::Bytes),
    ),
    (
        "process_cpu",
        "CPU time the daemon has used (user + system)",
        Some(Unit::Seconds),
    ),
    ("process_threads", "Threads of the daemon", None),
];

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("simfs");
        let m = Metrics {
            blob_requests: Family::default(),
            blob_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
            blob_bytes: Family::default(),
            blob_retries: Family::default(),
            fuse_seconds: Family::new_with_constructor(latency as fn() -> Histogram),
            fuse_errors: Family::default(),
            uploads: Family::default(),
            prefetch: Family::default(),
            refresh_changes: Family::default(),
            cache_opens: Family::default(),
            cache_open_bytes: Family::default(),
            cache_evictions: Counter::default(),
            cache_evicted_bytes: Counter::default(),
            levels: LEVELS.iter().map(|l| (l.0, Gauge::default())).collect(),
            source: Mutex::new(None),
            registry: Registry::default(),
        };
        r.register(
            "blob_requests",
            "HTTP requests to the blob service, every attempt, by operation and outcome (ok, client_error, server_error, throttled, timeout)",
            m.blob_requests.clone(),
        );
        r.register_with_unit(
            "blob_request",
            "Time from sending a request to its answer's headers, by operation",
            Unit::Seconds,
            m.blob_seconds.clone(),
        );
        r.register_with_unit(
            "blob",
            "Bytes moved by requests, by operation and direction (in: downloaded, out: uploaded)",
            Unit::Bytes,
            m.blob_bytes.clone(),
        );
        r.register(
            "blob_retries",
            "Attempts beyond the first of a request, by operation",
            m.blob_retries.clone(),
        );
        r.register_with_unit(
            "fuse_request",
            "Time to answer FUSE requests, by opcode (the histogram's count is the number of requests)",
            Unit::Seconds,
            m.fuse_seconds.clone(),
        );
        r.register(
            "fuse_errors",
            "FUSE requests answered with an error, by errno (ENOENT of a lookup is an answer, not an error: not counted)",
            m.fuse_errors.clone(),
        );
        r.register(
            "uploads",
            "Write-back uploads of a pending inode, by outcome (ok, failed, conflict)",
            m.uploads.clone(),
        );
        r.register(
            "prefetch_files",
            "Small files fetched ahead of their first read, by outcome (issued; used: read later; wasted: evicted unread)",
            m.prefetch.clone(),
        );
        r.register(
            "refresh_changes",
            "Entries a refresh changed in the index, by kind (added, changed, removed)",
            m.refresh_changes.clone(),
        );
        r.register(
            "cache_opens",
            "Opens of a file's data, by result (hit: cached; joined: a download under way; miss: a new download)",
            m.cache_opens.clone(),
        );
        r.register_with_unit(
            "cache_open",
            "Bytes of the files opened, by result (hit, joined, miss)",
            Unit::Bytes,
            m.cache_open_bytes.clone(),
        );
        r.register(
            "cache_evictions",
            "Clean cached files evicted",
            m.cache_evictions.clone(),
        );
        r.register_with_unit(
            "cache_evicted",
            "Bytes of clean cached files evicted",
            Unit::Bytes,
            m.cache_evicted_bytes.clone(),
        );
        for ((name, help, unit), (_, g)) in LEVELS.iter().zip(&m.levels) {
            match unit {
                Some(u) => r.register_with_unit(*name, *help, u.clone(), g.clone()),
                None => r.register(*name, *help, g.clone()),
            }
        }
        Metrics { registry: r, ..m }
    }

    /// Where `render` reads the levels from.
    pub fn set_source(&self, source: Source) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    fn level(&self, name: &str, v: f64) {
        if let Some((_, g)) = self.levels.iter().find(|(n, _)| *n == name) {
            g.set(v);
        }
    }

    /// The text exposition of every family, the levels read now.
    pub fn render(&self) -> String {
        let levels = self
            .source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s());
        if let Some(l) = levels {
            self.level("cache_used", l.cache_used_bytes as f64);
            if let Some(c) = l.cache_limit_bytes {
                self.level("cache_limit", c as f64);
            }
            self.level("cache_fills_in_flight", l.fills_in_flight as f64);
            self.level("writeback_pending_files", l.pending_files as f64);
            self.level("writeback_pending", l.pending_bytes as f64);
            self.level("writeback_oldest_pending_age", l.oldest_pending_seconds);
            self.level("writeback_uploads_in_flight", l.uploads_in_flight as f64);
            self.level("writeback_upload_window", l.upload_window as f64);
            self.level("index_entries", l.index_entries as f64);
            if let Some(t) = l.refresh_last_success_unix {
                self.level("refresh_last_success_timestamp", t);
            }
            if let Some(d) = l.refresh_last_seconds {
                self.level("refresh_last_duration", d);
            }
        }
        let (rss, cpu, threads) = process();
        self.level("process_resident_memory", rss);
        self.level("process_cpu", cpu);
        self.level("process_threads", threads);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Times one FUSE request of `opcode` until the guard goes (when the reply is sent).
    pub fn fuse(&self, opcode: &'static str) -> FuseTimer {
        FuseTimer {
            opcode,
            start: Instant::now(),
        }
    }
}

/// Records a FUSE request's time when dropped.
pub struct FuseTimer {
    opcode: &'static str,
    start: Instant,
}

impl Drop for FuseTimer {
    fn drop(&mut self) {
        get()
            .fuse_seconds
            .get_or_create(&vec![("opcode", self.opcode)])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A FUSE request was answered with `errno`.
pub fn fuse_error(errno: i32) {
    get()
        .fuse_errors
        .get_or_create(&vec![("errno", errno_name(errno))])
        .inc();
}

/// A bounded set of errno names for labels.
fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ESTALE => "ESTALE",
        libc::EINVAL => "EINVAL",
        libc::ENODATA => "ENODATA",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::EXDEV => "EXDEV",
        libc::EAGAIN => "EAGAIN",
        libc::EBUSY => "EBUSY",
        _ => "other",
    }
}

/// (resident bytes, CPU seconds, threads) of this process, from /proc; zeros elsewhere.
fn process() -> (f64, f64, f64) {
    // SAFETY: sysconf only reads configuration values.
    let (page, hz) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces), from the closing parenthesis.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        rest.get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(24) * page, (field(14) + field(15)) / hz, field(20))
}

/// The operation a blob request is, from its method and query (bounded label values).
pub fn blob_op(method: &str, query: &str, copy: bool) -> &'static str {
    let has = |k: &str| query.split('&').any(|p| p == k);
    match method {
        "GET" if has("comp=list") => "list",
        "GET" => "get",
        "HEAD" => "head",
        "DELETE" => "delete",
        "PUT" if has("comp=block") => "put_block",
        "PUT" if has("comp=blocklist") => "commit",
        "PUT" if has("comp=metadata") => "set_metadata",
        "PUT" if copy => "copy",
        "PUT" => "put",
        _ => "other",
    }
}

/// The outcome label of an answer's status and `x-ms-error-code` (status None: no answer, a
/// timeout or a reset). Azure throttles with 503 ServerBusy, 500 OperationTimedOut and 429.
pub fn blob_outcome(status: Option<u16>, code: Option<&str>) -> &'static str {
    match status {
        None => "timeout",
        Some(s) if s < 400 => "ok",
        Some(429) | Some(503) => "throttled",
        Some(500) if code == Some("OperationTimedOut") => "throttled",
        Some(500) => "server_error",
        Some(s) if s < 500 => "client_error",
        Some(_) => "server_error",
    }
}

/// Serves the exposition at `http://ADDR/metrics` from a thread of its own.
///
/// Written by hand rather than with an HTTP server crate: one route, one GET, answered and
/// closed (Prometheus scrapes every few seconds), so a server stack would be most of the
/// code for none of the benefit. A request that is not `GET /metrics` gets 404; one that
/// sends nothing for 5 s is dropped.
pub fn serve(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("simfs-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = answer(conn) {
                    tracing::debug!("metrics request: {e}");
                }
            }
        })?;
    Ok(bound)
}

fn answer(mut conn: std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let path = path.map(|p| p.split(|&b| b == b'?').next().unwrap_or_default());
    let (status, ctype, body) = if method == Some(b"GET") && path == Some(b"/metrics") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            get().render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "simfs serves /metrics only\n".to_string(),
        )
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_by_operation_and_outcome_from_a_bounded_set() {
        assert_eq!(
            blob_op("GET", "restype=container&comp=list&prefix=a", false),
            "list"
        );
        assert_eq!(blob_op("GET", "sv=1&sig=x", false), "get");
        assert_eq!(blob_op("PUT", "comp=block&blockid=QQ", false), "put_block");
        assert_eq!(blob_op("PUT", "comp=blocklist", false), "commit");
        assert_eq!(blob_op("PUT", "comp=metadata", false), "set_metadata");
        assert_eq!(blob_op("PUT", "", true), "copy");
        assert_eq!(blob_op("PUT", "", false), "put");
        assert_eq!(blob_outcome(Some(206), None), "ok");
        assert_eq!(
            blob_outcome(Some(412), Some("ConditionNotMet")),
            "client_error"
        );
        assert_eq!(blob_outcome(Some(503), Some("ServerBusy")), "throttled");
        assert_eq!(
            blob_outcome(Some(500), Some("OperationTimedOut")),
            "throttled"
        );
        assert_eq!(
            blob_outcome(Some(500), Some("InternalError")),
            "server_error"
        );
        assert_eq!(blob_outcome(None, None), "timeout");
    }

    #[test]
    fn the_exposition_carries_counters_levels_and_the_process() {
        let m = get();
        m.blob_requests
            .get_or_create(&vec![("op", "get"), ("outcome", "ok")])
            .inc();
        drop(m.fuse("lookup"));
        m.set_source(Box::new(|| Levels {
            pending_files: 3,
            uploads_in_flight: 5,
            upload_window: 16,
            ..Default::default()
        }));
        let text = m.render();
        assert!(
            text.contains("simfs_blob_requests_total{op=\"get\",outcome=\"ok\"}"),
            "{text}"
        );
        assert!(text.contains("simfs_fuse_request_seconds_count{opcode=\"lookup\"}"));
        assert!(text.contains("simfs_writeback_pending_files 3"), "{text}");
        assert!(
            text.contains("simfs_writeback_uploads_in_flight 5"),
            "{text}"
        );
        assert!(text.contains("simfs_writeback_upload_window 16"), "{text}");
        assert!(text.contains("simfs_process_threads "), "{text}");
    }

    #[test]
    fn the_endpoint_answers_get_metrics_and_nothing_else() {
        use std::io::{Read, Write};
        let at = serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let ask = |req: &str| {
            let mut c = std::net::TcpStream::connect(at).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        let ok = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("simfs_process_threads"), "{ok}");
        assert!(
            ok.trim_end().ends_with("# EOF"),
            "OpenMetrics ends with EOF"
        );
        let other = ask("GET / HTTP/1.1\r\n\r\n");
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    }
}
