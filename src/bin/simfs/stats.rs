//! `simfs stats MOUNT`: what a mount does, second by second, as `vmstat` or `juicefs stats`
//! show it: FUSE operations, bytes from and to the service, the cache's hit ratio, pending
//! uploads, errors and throttling.
//!
//! Each row is the difference of two samples of the daemon's metrics (the same counters
//! `--metrics-address` serves, read over the control socket), so it needs no metrics address.
//! `--once` prints one row (one interval) and exits; `--json` prints each row as a JSON
//! object, for scripts.

use simfs::protocol::{request, Event, Request};
use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// One sample: every series (`name{labels}`) and its value.
#[derive(Default)]
struct Sample(HashMap<String, f64>);

impl Sample {
    fn parse(text: &str) -> Sample {
        let mut m = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((k, v)) = line.rsplit_once(' ') {
                if let Ok(v) = v.parse::<f64>() {
                    m.insert(k.to_string(), v);
                }
            }
        }
        Sample(m)
    }

    /// The sum of the series named `name` whose labels contain every one of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                let (n, l) = k.split_once('{').unwrap_or((k, ""));
                n == name && labels.iter().all(|want| l.contains(want))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// One row: rates over the interval, levels at its end.
#[derive(serde::Serialize, Debug, PartialEq)]
struct Row {
    fuse_ops_per_s: f64,
    read_mib_per_s: f64,
    written_mib_per_s: f64,
    requests_per_s: f64,
    hit_ratio: Option<f64>,
    pending_files: f64,
    pending_mib: f64,
    errors_per_s: f64,
    throttled_per_s: f64,
}

fn row(a: &Sample, b: &Sample, secs: f64) -> Row {
    let rate =
        |name: &str, labels: &[&str]| (b.sum(name, labels) - a.sum(name, labels)).max(0.0) / secs;
    let hits =
        b.sum("simfs_cache_opens_total", &["hit"]) - a.sum("simfs_cache_opens_total", &["hit"]);
    let opens = b.sum("simfs_cache_opens_total", &[]) - a.sum("simfs_cache_opens_total", &[]);
    let mib = (1u64 << 20) as f64;
    Row {
        fuse_ops_per_s: rate("simfs_fuse_request_seconds_count", &[]),
        read_mib_per_s: rate("simfs_blob_bytes_total", &["direction=\"in\""]) / mib,
        written_mib_per_s: rate("simfs_blob_bytes_total", &["direction=\"out\""]) / mib,
        requests_per_s: rate("simfs_blob_requests_total", &[]),
        hit_ratio: (opens > 0.0).then(|| hits / opens),
        pending_files: b.sum("simfs_writeback_pending_files", &[]),
        pending_mib: b.sum("simfs_writeback_pending_bytes", &[]) / mib,
        errors_per_s: rate("simfs_fuse_errors_total", &[])
            + rate("simfs_blob_requests_total", &["error"])
            + rate("simfs_blob_requests_total", &["timeout"]),
        throttled_per_s: rate("simfs_blob_requests_total", &["throttled"]),
    }
}

const HEADER: &str =
    "  fuse/s   in MiB/s  out MiB/s   reqs/s   hit%  pending  pend MiB  errors/s  throttled/s";

fn print_row(r: &Row) {
    let hit = r
        .hit_ratio
        .map_or("     -".to_string(), |h| format!("{:6.1}", h * 100.0));
    println!(
        "{:8.0} {:10.1} {:10.1} {:8.0} {hit} {:8.0} {:9.1} {:9.1} {:12.1}",
        r.fuse_ops_per_s,
        r.read_mib_per_s,
        r.written_mib_per_s,
        r.requests_per_s,
        r.pending_files,
        r.pending_mib,
        r.errors_per_s,
        r.throttled_per_s
    );
}

fn sample(state_dir: &Path) -> Result<Sample, String> {
    for e in request(state_dir, &Request::Metrics)? {
        match e? {
            Event::Metrics { text } => return Ok(Sample::parse(&text)),
            Event::Error { message } => return Err(message),
            _ => {}
        }
    }
    Err("the daemon sent no metrics (an older simfs?)".into())
}

pub fn stats(mountpoint: &Path, interval: f64, once: bool, json: bool) -> ExitCode {
    let state_dir = match crate::stage::mount_of(mountpoint) {
        Ok((dir, _)) => dir,
        Err(e) => {
            eprintln!("simfs stats: {e}");
            return ExitCode::from(2);
        }
    };
    let interval = Duration::from_secs_f64(interval);
    let mut prev = match sample(&state_dir) {
        Ok(s) => (s, Instant::now()),
        Err(e) => {
            eprintln!("simfs stats: {e}");
            return ExitCode::FAILURE;
        }
    };
    for n in 0u64.. {
        if !json && n % 20 == 0 {
            println!("{HEADER}");
        }
        std::thread::sleep(interval);
        let now = match sample(&state_dir) {
            Ok(s) => (s, Instant::now()),
            Err(e) => {
                // The mount went away: the end of the view, not a failure of it.
                eprintln!("simfs stats: {e}");
                return if n == 0 {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                };
            }
        };
        let r = row(
            &prev.0,
            &now.0,
            now.1.duration_since(prev.1).as_secs_f64().max(1e-3),
        );
        if json {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        } else {
            print_row(&r);
        }
        if once {
            break;
        }
        prev = now;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_the_rate_between_two_samples_and_the_levels_at_the_second() {
        let a = Sample::parse(
            "# TYPE simfs_cache_opens counter\n\
             simfs_cache_opens_total{result=\"hit\"} 10\n\
             simfs_cache_opens_total{result=\"miss\"} 10\n\
             simfs_blob_bytes_total{op=\"get\",direction=\"in\"} 0\n\
             simfs_fuse_request_seconds_count{opcode=\"read\"} 100\n\
             simfs_blob_requests_total{op=\"get\",outcome=\"throttled\"} 1\n",
        );
        let b = Sample::parse(
            "simfs_cache_opens_total{result=\"hit\"} 13\n\
             simfs_cache_opens_total{result=\"miss\"} 11\n\
             simfs_blob_bytes_total{op=\"get\",direction=\"in\"} 4194304\n\
             simfs_fuse_request_seconds_count{opcode=\"read\"} 300\n\
             simfs_fuse_request_seconds_count{opcode=\"lookup\"} 100\n\
             simfs_blob_requests_total{op=\"get\",outcome=\"throttled\"} 5\n\
             simfs_blob_requests_total{op=\"get\",outcome=\"ok\"} 20\n\
             simfs_writeback_pending_files 7\n",
        );
        let r = row(&a, &b, 2.0);
        assert_eq!(r.fuse_ops_per_s, 150.0, "(200 + 100) / 2 s");
        assert_eq!(r.read_mib_per_s, 2.0);
        assert_eq!(r.hit_ratio, Some(0.75));
        assert_eq!(r.throttled_per_s, 2.0);
        assert_eq!(r.pending_files, 7.0);
        assert_eq!(r.errors_per_s, 0.0);
    }
}
