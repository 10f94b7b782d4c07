//! The metrics endpoint as an operator uses it: a real Prometheus (Debian's, installed by
//! setup.sh) scrapes a live mount, and its HTTP API is asked for what the workload did. The
//! counts are checked against what the fault proxy saw on the wire.

use crate::harness::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Prometheus scraping `target` every second, its data in a temporary directory.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let bin = which("prometheus").expect(
            "prometheus is not installed: run fuse-tests/setup.sh (the README's test command does)",
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: simfs\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query that yields one sample, or None (no data yet).
    fn query(&self, q: &str) -> Option<f64> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import json, sys, urllib.parse, urllib.request\n\
                 u = 'http://127.0.0.1:%s/api/v1/query?query=%s' % (sys.argv[1], urllib.parse.quote(sys.argv[2]))\n\
                 r = json.load(urllib.request.urlopen(u, timeout=5))['data']['result']\n\
                 print(r[0]['value'][1] if len(r) == 1 else '')",
                &self.port.to_string(),
                q,
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Waits (up to 30 s) until `q` answers `pred`; the last answer.
    fn until(&self, q: &str, pred: impl Fn(f64) -> bool) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.query(q);
            if v.is_some_and(&pred) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

/// Blob GETs (not listings) the proxy passed on or answered itself.
fn gets_seen(proxy: &FaultProxy) -> usize {
    proxy
        .injected()
        .iter()
        .filter(|l| l.contains(" GET ") && !l.contains("comp=list"))
        .count()
}

#[test]
fn prometheus_scrapes_what_the_mount_did_and_the_wire_agrees() {
    let (az, _fx) = crate::seeded("prom", 40, 2);
    let proxy = FaultProxy::start(&az);
    proxy.set(r#"{"log_all": true}"#);
    let cache = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut m = mount_with(
        proxy.connection_string(),
        "prom",
        cache.path(),
        &["--metrics-address", &addr],
    );
    let prom = Prometheus::start(&addr);
    assert_eq!(
        prom.until("up{job=\"simfs\"}", |v| v == 1.0),
        Some(1.0),
        "Prometheus scrapes the mount"
    );
    assert_eq!(
        prom.until("simfs_writeback_upload_window", |v| v == 16.0),
        Some(16.0),
        "an idle mount's background starts at 16 uploads at once"
    );
    assert_eq!(
        prom.until("simfs_writeback_uploads_in_flight", |v| v == 0.0),
        Some(0.0),
        "and has none under way"
    );

    // Cold reads of every file, then one again (a hit).
    let files = walk(m.path());
    let mut read = 0;
    for f in files.iter().filter(|f| f.is_file()) {
        read += std::fs::read(f)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", f.display(), m.log_text()))
            .len();
    }
    assert!(read > 2 << 20, "the big file and the small ones were read");
    std::fs::read(m.path().join("big/large.bin")).unwrap();
    let proxy_gets = gets_seen(&proxy);
    assert_eq!(
        prom.until("sum(simfs_blob_requests_total{op=\"get\"})", |v| v
            >= proxy_gets as f64),
        Some(proxy_gets as f64),
        "every GET the wire saw is counted once"
    );
    assert!(
        prom.until("simfs_cache_opens_total{result=\"hit\"}", |v| v >= 1.0)
            .is_some_and(|v| v >= 1.0),
        "the second read of the big file is a hit"
    );
    assert!(
        prom.until("simfs_fuse_request_seconds_count{opcode=\"read\"}", |v| v
            > 0.0)
            .is_some_and(|v| v > 0.0),
        "FUSE reads are timed"
    );
    unmount_clean(&mut m);
    drop(prom);

    // Throttling: a share of answers are 503 ServerBusy; no error reaches the reader.
    proxy.set(r#"{"log_all": true, "rates": {"503": 0.3}, "seed": 3}"#);
    let cache2 = tempfile::tempdir().unwrap();
    let addr2 = format!("127.0.0.1:{}", free_port());
    let mut m2 = mount_with(
        proxy.connection_string(),
        "prom",
        cache2.path(),
        &["--metrics-address", &addr2],
    );
    let prom2 = Prometheus::start(&addr2);
    for f in walk(m2.path()).iter().filter(|f| f.is_file()) {
        std::fs::read(f).expect("a throttled read is retried, not failed");
    }
    // A write drains: pending back to 0.
    std::fs::write(m2.path().join("new.txt"), b"fresh").unwrap();
    simfs_sync(m2.path());
    let throttled_on_wire = proxy
        .injected()
        .iter()
        .filter(|l| l.contains(" 503 "))
        .count();
    assert!(throttled_on_wire > 0, "the proxy throttled some requests");
    assert_eq!(
        prom2.until(
            "sum(simfs_blob_requests_total{outcome=\"throttled\"})",
            |v| v >= throttled_on_wire as f64
        ),
        Some(throttled_on_wire as f64),
        "each 503 counted as throttled"
    );
    assert!(
        prom2
            .until("sum(simfs_blob_retries_total)", |v| v > 0.0)
            .is_some_and(|v| v > 0.0),
        "the throttled requests were retried"
    );
    assert_eq!(
        prom2.until("simfs_writeback_pending_files", |v| v == 0.0),
        Some(0.0),
        "nothing pending after simfs sync"
    );
    assert!(
        prom2
            .until(
                "sum(simfs_blob_requests_total{op=~\"put|commit\",outcome=\"ok\"})",
                |v| v >= 1.0
            )
            .is_some_and(|v| v >= 1.0),
        "the new file's upload is counted"
    );
    unmount_clean(&mut m2);
}

#[test]
fn the_packaged_scrape_configuration_and_alerts_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
    for (what, file) in [("config", "prometheus.yml"), ("rules", "simfs-alerts.yml")] {
        let out = Command::new("promtool")
            .args(["check", what, file])
            .current_dir(&dir)
            .output()
            .expect("promtool comes with prometheus: run fuse-tests/setup.sh");
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn simfs_stats_shows_a_busy_mount_second_by_second() {
    let (az, _fx) = crate::seeded("stats", 200, 0);
    let cache = tempfile::tempdir().unwrap();
    let mut m = crate::mount(&az, "stats", cache.path(), &[]);
    let root = m.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for f in walk(&root).iter().filter(|f| f.is_file()) {
                    let _ = std::fs::metadata(f);
                    let _ = std::fs::read(f);
                }
            }
        })
    };
    let out = Command::new(SIMFS)
        .args(["stats", "--once", "--json", "--interval", "500ms"])
        .arg(m.path())
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON row");
    assert!(row["fuse_ops_per_s"].as_f64().unwrap() > 0.0, "{row}");
    assert_eq!(row["pending_files"].as_f64(), Some(0.0), "{row}");
    assert_eq!(row["errors_per_s"].as_f64(), Some(0.0), "{row}");
    m.unmount();
}

/// The metrics endpoint's text, fetched as a scraper does.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: simfs\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// How many FUSE requests of `opcode` the mount at `addr` has answered.
fn fuse_requests(addr: &str, opcode: &str) -> f64 {
    let key = format!("simfs_fuse_request_seconds_count{{opcode=\"{opcode}\"}} ");
    scrape(addr)
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// FOPEN_NOFLUSH came with Linux 5.16; older kernels flush every close.
fn kernel_skips_flush_when_asked() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (5, 16)
}

#[test]
fn a_readers_close_costs_no_round_trip_and_a_writers_close_is_recorded() {
    let (az, _fx) = crate::seeded("noflush", 8, 0);
    let cache = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut m = crate::mount(&az, "noflush", cache.path(), &["--metrics-address", &addr]);
    let files: Vec<_> = walk(m.path()).into_iter().filter(|f| f.is_file()).collect();
    assert!(files.len() >= 8, "{files:?}");
    let before = fuse_requests(&addr, "flush");
    for _ in 0..3 {
        for f in &files {
            std::fs::read(f).unwrap();
        }
    }
    let after_reads = fuse_requests(&addr, "flush");
    if kernel_skips_flush_when_asked() {
        assert_eq!(after_reads, before, "{} reads and closes", 3 * files.len());
    }
    // A writer's close still reaches simfs, which records the file for upload.
    std::fs::write(m.path().join("written.txt"), b"recorded at close").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fuse_requests(&addr, "flush") <= after_reads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        fuse_requests(&addr, "flush") > after_reads,
        "the writer's close"
    );
    simfs_sync(m.path());
    unmount_clean(&mut m);
}
