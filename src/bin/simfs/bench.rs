//! `simfs bench`: one fixed workload run against several directories, side by side.
//!
//! Every latency is the clock around one syscall (or open+read+close), taken here, never a
//! filesystem's own counters. The workload only reads unless `write` is set; what it writes
//! goes under a scratch directory it removes.
//!
//! The paths are discovered once, on the first target, and replayed (relative) on every
//! target: put the native copy first, so discovering them does not warm a mount's caches
//! before its "first pass" stat. A path missing on another target counts as an error there.

use serde_json::json;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Small files opened and read (the first this many under `small_max` bytes).
    pub small_files: usize,
    pub small_max: u64,
    /// Files created, written and fsynced with `write`.
    pub write_files: usize,
    pub write_size: usize,
    pub write: bool,
    /// Bytes of the streaming write with `write` (0: skipped).
    pub stream_write: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            small_files: 500,
            small_max: 64 << 10,
            write_files: 20,
            write_size: 1 << 20,
            write: false,
            stream_write: 1 << 30,
        }
    }
}

/// Latencies of one kind of operation.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    pub nanos: Vec<u64>,
    pub errors: usize,
}

impl Latencies {
    fn time<T>(&mut self, f: impl FnOnce() -> std::io::Result<T>) -> Option<T> {
        let t = Instant::now();
        let r = f();
        let ns = t.elapsed().as_nanos() as u64;
        match r {
            Ok(v) => {
                self.nanos.push(ns);
                Some(v)
            }
            Err(_) => {
                self.errors += 1;
                None
            }
        }
    }

    /// The `q` quantile (0..=1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.nanos.is_empty() {
            return f64::NAN;
        }
        let mut v = self.nanos.clone();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i] as f64 / 1000.0
    }

    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.nanos.iter().sum())
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "count": self.nanos.len(),
            "errors": self.errors,
            "p50_us": self.quantile_us(0.5),
            "p99_us": self.quantile_us(0.99),
            "max_us": self.quantile_us(1.0),
            "total_s": self.total().as_secs_f64(),
        })
    }
}

/// Results for one target.
#[derive(Clone, Debug, Default)]
pub struct TargetResult {
    pub path: PathBuf,
    pub stat_first: Latencies,
    pub stat_warm: Latencies,
    /// readdir + lstat of the whole tree (`ls -lR`).
    pub tree_walk: Duration,
    /// The tools users run on the tree, by name: wall time of each, or None when it failed.
    pub tools: Vec<(&'static str, Option<Duration>)>,
    pub tree_entries: usize,
    pub small_reads: Latencies,
    /// Time to first byte and whole-file throughput of the largest file, cold then warm.
    pub large: Option<LargeRead>,
    pub writes: Option<Latencies>,
    /// One large file written in 1 MiB writes without fsync: bytes and the time from create
    /// to the last write returning (the close, which uploads on simfs, is not timed).
    pub stream_write: Option<(u64, Duration)>,
    /// 4 KiB random reads of the (now cached) largest file with fio, in IOPS, when fio is
    /// installed.
    pub fio_randread_iops: Option<f64>,
    /// `venv/bin/python -c 'import ...'` from the tree, cold then warm (when it has a venv).
    pub py_import: Option<(Duration, Duration)>,
    /// The module that import is of.
    pub py_module: &'static str,
    pub wall: Duration,
}

/// Real tools on the whole tree, as users run them: the real `ls -l` asks for extended
/// attributes our own readdir + lstat loop does not. GNU tar does not read file data when the
/// archive is /dev/null, so it too is a metadata walk (no download).
/// `git status` runs three times when the tree has a checkout at `repo/`. The first run on a
/// tree whose git index was written elsewhere (another disk, another node) finds every file's
/// inode and ctime changed and reads every file to compare it, then rewrites the index. On a
/// writable FUSE mount the second pays one GETATTR per file the first read (the kernel drops
/// a file's cached atime when it reads it); the third is the everyday one.
/// The real tools run on each tree: name, a path the tree must have for it (or ""), argv.
const TOOLS: &[(&str, &str, &[&str])] = &[
    // A directory of small shards read cold, one after another, as a dataloader does.
    (
        "cat shards/* (cold)",
        "shards",
        &["sh", "-c", "cat shards/* >/dev/null"],
    ),
    ("ls -lR", "", &["ls", "-lR", "."]),
    ("find -type f", "", &["find", ".", "-type", "f"]),
    ("du -s", "", &["du", "-s", "."]),
    ("tar cf /dev/null", "", &["tar", "cf", "/dev/null", "."]),
    (
        "git status",
        "repo/.git",
        &["git", "-C", "repo", "status", "--porcelain"],
    ),
    (
        "git status, again",
        "repo/.git",
        &["git", "-C", "repo", "status", "--porcelain"],
    ),
    (
        "git status, third",
        "repo/.git",
        &["git", "-C", "repo", "status", "--porcelain"],
    ),
];

/// fio's 4 KiB random reads of `file` (buffered, cached, one job, 64 MiB of reads): IOPS,
/// or None when fio is missing or fails.
fn fio_randread(file: &Path) -> Option<f64> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=randread",
            "--rw=randread",
            "--bs=4k",
            "--io_size=64M",
            "--ioengine=psync",
            "--readonly",
            // fio drops the file's pages first by default: a native file would then be read
            // from the disk, while simfs's cache file stays cached below FUSE.
            "--invalidate=0",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["jobs"][0]["read"]["iops"].as_f64()
}

/// Runs `argv` in `root` with its output discarded; its wall time if it succeeded.
fn run_tool(root: &Path, argv: &[&str]) -> Option<Duration> {
    let mut cmd = std::process::Command::new(argv[0]);
    cmd.args(&argv[1..]).current_dir(root);
    time_command(cmd)
}

/// Runs `cmd` with its output discarded; its wall time if it succeeded.
fn time_command(mut cmd: std::process::Command) -> Option<Duration> {
    let t = Instant::now();
    let ok = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?
        .success();
    ok.then(|| t.elapsed())
}

/// What the Python import runs: `requests` when the venv has it (a real package and its
/// dependencies, the standard library staying on the host), else pip's installer (some
/// hundred modules of the venv's site-packages).
fn py_module(root: &Path) -> &'static str {
    let has_requests = std::fs::read_dir(root.join("venv/lib")).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.path().join("site-packages/requests").is_dir())
    });
    if has_requests {
        "requests"
    } else {
        "pip._internal.commands.install"
    }
}

/// Times a cold then a warm import with the tree's own venv, if it has one that works.
fn py_import(root: &Path, module: &str) -> Option<(Duration, Duration)> {
    let python = root.join("venv/bin/python");
    let run = || {
        let mut cmd = std::process::Command::new(&python);
        cmd.args(["-c", &format!("import {module}")]);
        time_command(cmd)
    };
    if !python.exists() {
        return None;
    }
    Some((run()?, run()?))
}

#[derive(Clone, Debug)]
pub struct LargeRead {
    pub file: PathBuf,
    pub bytes: u64,
    pub cold_first_byte: Duration,
    pub cold_read: Duration,
    pub warm_first_byte: Duration,
    pub warm_read: Duration,
}

impl LargeRead {
    pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
        bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
    }
}

/// The paths of the workload, relative to the target root: every entry, the small files and
/// the largest file.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub entries: Vec<PathBuf>,
    pub small: Vec<PathBuf>,
    pub large: Option<(PathBuf, u64)>,
    /// What the Python import imports.
    pub py_module: &'static str,
}

/// Walks `root` (without following symlinks) to make the plan.
pub fn plan(root: &Path, opts: &BenchOptions) -> std::io::Result<Plan> {
    let mut plan = Plan {
        py_module: py_module(root),
        ..Plan::default()
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&rel))?
            .filter_map(|e| e.ok())
            .collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let child = rel.join(e.file_name());
            let md = e.metadata()?;
            if md.is_dir() {
                stack.push(child.clone());
            } else if md.is_file() {
                if md.len() <= opts.small_max && plan.small.len() < opts.small_files {
                    plan.small.push(child.clone());
                }
                if plan.large.as_ref().is_none_or(|(_, s)| md.len() > *s) {
                    plan.large = Some((child.clone(), md.len()));
                }
            }
            plan.entries.push(child);
        }
    }
    Ok(plan)
}

fn read_all(p: &Path, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut f = File::open(p)?;
    let mut n = 0u64;
    loop {
        let r = f.read(buf)?;
        if r == 0 {
            return Ok(n);
        }
        n += r as u64;
    }
}

fn walk(root: &Path) -> usize {
    let mut count = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if let Ok(md) = std::fs::symlink_metadata(&p) {
                count += 1;
                if md.is_dir() {
                    stack.push(p);
                }
            }
        }
    }
    count
}

/// Runs the workload on `root`.
pub fn run(root: &Path, plan: &Plan, opts: &BenchOptions) -> TargetResult {
    let started = Instant::now();
    let mut r = TargetResult {
        path: root.to_path_buf(),
        ..Default::default()
    };
    for p in &plan.entries {
        r.stat_first
            .time(|| std::fs::symlink_metadata(root.join(p)));
    }
    for p in &plan.entries {
        r.stat_warm.time(|| std::fs::symlink_metadata(root.join(p)));
    }
    let t = Instant::now();
    r.tree_entries = walk(root);
    r.tree_walk = t.elapsed();
    r.tools = TOOLS
        .iter()
        .filter(|(_, needs, _)| needs.is_empty() || root.join(needs).exists())
        .map(|(name, _, argv)| (*name, run_tool(root, argv)))
        .collect();
    let mut buf = vec![0u8; 1 << 20];
    for p in &plan.small {
        r.small_reads.time(|| read_all(&root.join(p), &mut buf));
    }
    // Before the large file: its hydration would otherwise compete with the import.
    r.py_module = plan.py_module;
    r.py_import = py_import(root, plan.py_module);
    if let Some((rel, bytes)) = &plan.large {
        let path = root.join(rel);
        let timed = |buf: &mut [u8]| -> std::io::Result<(Duration, Duration)> {
            let t = Instant::now();
            let mut f = File::open(&path)?;
            let mut first = [0u8; 1];
            f.read_exact(&mut first)?;
            let ttfb = t.elapsed();
            loop {
                if f.read(buf)? == 0 {
                    break;
                }
            }
            Ok((ttfb, t.elapsed()))
        };
        if let (Ok(cold), Ok(warm)) = (timed(&mut buf), timed(&mut buf)) {
            r.large = Some(LargeRead {
                file: rel.clone(),
                bytes: *bytes,
                cold_first_byte: cold.0,
                cold_read: cold.1,
                warm_first_byte: warm.0,
                warm_read: warm.1,
            });
        }
        r.fio_randread_iops = fio_randread(&path);
    }
    if opts.write {
        r.writes = Some(write_pass(root, opts));
        if opts.stream_write > 0 {
            r.stream_write = stream_write(root, opts.stream_write).ok();
        }
    }
    r.wall = started.elapsed();
    r
}

/// create + write + fsync + close of files in a scratch directory, removed afterwards.
fn write_pass(root: &Path, opts: &BenchOptions) -> Latencies {
    let scratch = root.join(format!(".simfs-bench-{}", std::process::id()));
    let mut lat = Latencies::default();
    if std::fs::create_dir(&scratch).is_err() {
        lat.errors = opts.write_files;
        return lat;
    }
    let data: Vec<u8> = (0..opts.write_size).map(|i| (i % 251) as u8).collect();
    for i in 0..opts.write_files {
        let p = scratch.join(format!("f{i}"));
        lat.time(|| {
            let mut f = File::create(&p)?;
            f.write_all(&data)?;
            f.sync_all()
        });
    }
    let _ = std::fs::remove_dir_all(&scratch);
    lat
}

/// Writes `bytes` to a new file in 1 MiB writes (no fsync); returns the bytes and the time
/// the writes took. The file is removed afterwards.
fn stream_write(root: &Path, bytes: u64) -> std::io::Result<(u64, Duration)> {
    let p = root.join(format!(".simfs-bench-stream-{}", std::process::id()));
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let result = (|| {
        let t = Instant::now();
        let mut f = File::create(&p)?;
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            done += n as u64;
        }
        let took = t.elapsed();
        drop(f);
        Ok((bytes, took))
    })();
    let _ = std::fs::remove_file(&p);
    result
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A figure as `text` renders it, with its ratio to the first target's figure; "-" when the
/// target has none.
fn with_ratio(v: Option<f64>, base: Option<f64>, text: impl Fn(f64) -> String) -> String {
    match (v, base) {
        (Some(v), Some(b)) => format!("{} ({:.2}x)", text(v), v / b),
        (Some(v), None) => text(v),
        (None, _) => "-".into(),
    }
}

/// The side-by-side table for the terminal.
pub fn table(results: &[TargetResult]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&TargetResult) -> String| {
        rows.push((name.to_string(), results.iter().map(f).collect()));
    };
    let lat = |l: &Latencies| {
        format!(
            "{:.1} / {:.1} / {:.0} µs",
            l.quantile_us(0.5),
            l.quantile_us(0.99),
            l.quantile_us(1.0)
        )
    };
    row("paths", &|r| r.stat_first.nanos.len().to_string());
    row("stat, first pass p50/p99/max", &|r| lat(&r.stat_first));
    row("stat, first pass total", &|r| ms(r.stat_first.total()));
    row("stat, warm p50/p99/max", &|r| lat(&r.stat_warm));
    row("ls -lR (readdir + lstat)", &|r| ms(r.tree_walk));
    for (name, _, _) in TOOLS {
        let time = |r: &TargetResult| r.tools.iter().find(|t| t.0 == *name).and_then(|t| t.1);
        if !results.iter().any(|r| r.tools.iter().any(|t| t.0 == *name)) {
            continue;
        }
        let secs = |r: &TargetResult| time(r).map(|d| d.as_secs_f64());
        let base = secs(&results[0]);
        row(&format!("{name} (x first)"), &|r| match secs(r) {
            None => "failed".into(),
            v => with_ratio(v, base, |s| ms(Duration::from_secs_f64(s))),
        });
    }
    row(
        "small files open+read p50/p99/max",
        &|r| lat(&r.small_reads),
    );
    row("small files total", &|r| ms(r.small_reads.total()));
    row("large file", &|r| match &r.large {
        Some(l) => format!("{} MiB", l.bytes >> 20),
        None => "-".into(),
    });
    row("large: first byte cold / warm", &|r| match &r.large {
        Some(l) => format!("{} / {}", ms(l.cold_first_byte), ms(l.warm_first_byte)),
        None => "-".into(),
    });
    row("large: MiB/s cold / warm", &|r| match &r.large {
        Some(l) => format!(
            "{:.0} / {:.0}",
            LargeRead::mib_per_s(l.bytes, l.cold_read),
            LargeRead::mib_per_s(l.bytes, l.warm_read)
        ),
        None => "-".into(),
    });
    if results.iter().any(|r| r.fio_randread_iops.is_some()) {
        let base = results[0].fio_randread_iops;
        row("fio 4 KiB random reads, cached (x first)", &|r| {
            with_ratio(r.fio_randread_iops, base, |i| format!("{i:.0} IOPS"))
        });
    }
    if results.iter().any(|r| r.py_import.is_some()) {
        let secs = |r: &TargetResult, warm: bool| {
            r.py_import
                .map(|(c, w)| if warm { w } else { c }.as_secs_f64())
        };
        let text = |s: f64| ms(Duration::from_secs_f64(s));
        let label = format!("import {} cold / warm (x first)", results[0].py_module);
        row(&label, &|r| {
            format!(
                "{} / {}",
                with_ratio(secs(r, false), secs(&results[0], false), text),
                with_ratio(secs(r, true), secs(&results[0], true), text)
            )
        });
    }
    if results.iter().any(|r| r.writes.is_some()) {
        row("create+write+fsync p50/p99/max", &|r| match &r.writes {
            Some(w) => lat(w),
            None => "-".into(),
        });
    }
    if results.iter().any(|r| r.stream_write.is_some()) {
        // Ratio to the first target (put the native directory, on the cache disk, first).
        let rate = |r: &TargetResult| r.stream_write.map(|(b, d)| LargeRead::mib_per_s(b, d));
        let base = rate(&results[0]);
        row("stream write, 1 MiB writes (x first)", &|r| {
            with_ratio(rate(r), base, |v| format!("{v:.0} MiB/s"))
        });
    }
    row("errors", &|r| {
        (r.stat_first.errors
            + r.stat_warm.errors
            + r.small_reads.errors
            + r.writes.as_ref().map_or(0, |w| w.errors))
        .to_string()
    });
    row("workload wall time", &|r| ms(r.wall));
    let name_w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let col_w: Vec<usize> = (0..results.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.1[i].chars().count())
                .chain([results[i].path.to_string_lossy().chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!("{:name_w$}", "");
    for (i, r) in results.iter().enumerate() {
        out.push_str(&format!("  {:>w$}", r.path.display(), w = col_w[i]));
    }
    out.push('\n');
    for (name, cells) in rows {
        out.push_str(&format!("{name:name_w$}"));
        for (i, c) in cells.iter().enumerate() {
            out.push_str(&format!("  {c:>w$}", w = col_w[i]));
        }
        out.push('\n');
    }
    out
}

/// Machine-readable results.
pub fn to_json(results: &[TargetResult]) -> serde_json::Value {
    json!(results
        .iter()
        .map(|r| json!({
            "path": r.path,
            "stat_first": r.stat_first.summary(),
            "stat_warm": r.stat_warm.summary(),
            "tree_walk_s": r.tree_walk.as_secs_f64(),
            "tools": r.tools.iter().map(|(n, d)| json!({"tool": n, "s": d.map(|d| d.as_secs_f64())})).collect::<Vec<_>>(),
            "tree_entries": r.tree_entries,
            "small_reads": r.small_reads.summary(),
            "large": r.large.as_ref().map(|l| json!({
                "file": l.file,
                "bytes": l.bytes,
                "cold_first_byte_s": l.cold_first_byte.as_secs_f64(),
                "cold_mib_s": LargeRead::mib_per_s(l.bytes, l.cold_read),
                "warm_first_byte_s": l.warm_first_byte.as_secs_f64(),
                "warm_mib_s": LargeRead::mib_per_s(l.bytes, l.warm_read),
            })),
            "writes": r.writes.as_ref().map(|w| w.summary()),
            "stream_write": r.stream_write.map(|(b, d)| json!({
                "bytes": b,
                "s": d.as_secs_f64(),
                "mib_s": LargeRead::mib_per_s(b, d),
            })),
            "fio_randread_iops": r.fio_randread_iops,
            "py_import": r.py_import.map(|(c, w)| json!({
                "module": r.py_module,
                "cold_s": c.as_secs_f64(),
                "warm_s": w.as_secs_f64(),
            })),
            "wall_s": r.wall.as_secs_f64(),
            "stat_first_us": r.stat_first.nanos.iter().map(|n| *n as f64 / 1000.0).collect::<Vec<_>>(),
        }))
        .collect::<Vec<_>>())
}

/// A target's name in the plot: its last path component (`native`, `simfs`, ...), which is
/// what tells targets apart; the whole path when it has none.
fn legend(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// An SVG of the first-pass stat latency distribution (CDF, log-scaled time) of every target.
pub fn cdf_svg(results: &[TargetResult]) -> String {
    let (w, h, pad) = (720.0, 420.0, 60.0);
    let colours = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let all: Vec<u64> = results
        .iter()
        .flat_map(|r| r.stat_first.nanos.iter().copied())
        .filter(|&n| n > 0)
        .collect();
    let lo = all.iter().copied().min().unwrap_or(1).max(1) as f64;
    let hi = all.iter().copied().max().unwrap_or(2).max(2) as f64;
    let (llo, lhi) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let x = |ns: f64| pad + (ns.log10() - llo) / (lhi - llo) * (w - 2.0 * pad);
    let y = |q: f64| h - pad - q * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">stat() latency, first pass after mount (CDF)</text>\n",
        w / 2.0
    );
    for e in (llo as i32)..=(lhi as i32) {
        let xv = x(10f64.powi(e));
        let label = match e {
            e if e < 3 => format!("{} ns", 10u64.pow(e.max(0) as u32)),
            e if e < 6 => format!("{} µs", 10u64.pow((e - 3) as u32)),
            e if e < 9 => format!("{} ms", 10u64.pow((e - 6) as u32)),
            e => format!("{} s", 10u64.pow((e - 9) as u32)),
        };
        svg.push_str(&format!(
            "<line x1=\"{xv}\" y1=\"{}\" x2=\"{xv}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{xv}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
            y(0.0),
            y(1.0),
            y(0.0) + 16.0
        ));
    }
    // No label at 1.0: it would sit on top of 0.99's.
    for q in [0.0, 0.25, 0.5, 0.75, 0.9, 0.99] {
        svg.push_str(&format!(
            "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#eee\"/><text x=\"{2}\" y=\"{3}\" text-anchor=\"end\">{q}</text>\n",
            y(q),
            w - pad,
            pad - 6.0,
            y(q) + 4.0
        ));
    }
    for (i, r) in results.iter().enumerate() {
        let mut v: Vec<u64> = r.stat_first.nanos.iter().map(|&n| n.max(1)).collect();
        v.sort_unstable();
        if v.is_empty() {
            continue;
        }
        let step = (v.len() / 400).max(1);
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .step_by(step)
            .chain(std::iter::once((v.len() - 1, &v[v.len() - 1])))
            .map(|(j, &ns)| {
                format!(
                    "{:.1},{:.1}",
                    x(ns as f64),
                    y((j + 1) as f64 / v.len() as f64)
                )
            })
            .collect();
        let c = colours[i % colours.len()];
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{c}\">{}</text>\n",
            points.join(" "),
            pad + 10.0,
            pad + 16.0 * i as f64,
            legend(&r.path)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// Runs the workload on every directory and prints (and writes) the comparison.
pub fn bench(
    paths: &[PathBuf],
    out: Option<&std::path::Path>,
    write: bool,
    small: usize,
    stream_bytes: u64,
) -> ExitCode {
    let opts = BenchOptions {
        write,
        small_files: small,
        stream_write: stream_bytes,
        ..Default::default()
    };
    let plan = match plan(&paths[0], &opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("simfs: cannot walk {}: {e}", paths[0].display());
            return ExitCode::FAILURE;
        }
    };
    let results: Vec<_> = paths
        .iter()
        .map(|p| {
            eprintln!("bench: {} ({} paths)", p.display(), plan.entries.len());
            run(p, &plan, &opts)
        })
        .collect();
    print!("{}", table(&results));
    if let Some(dir) = out {
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| {
                let json = serde_json::to_string_pretty(&to_json(&results))
                    .map_err(std::io::Error::other)?;
                std::fs::write(dir.join("bench.json"), json)
            })
            .and_then(|_| std::fs::write(dir.join("stat-latency.svg"), cdf_svg(&results)));
        match written {
            Ok(()) => eprintln!(
                "bench: wrote {}/bench.json and stat-latency.svg",
                dir.display()
            ),
            Err(e) => {
                eprintln!("simfs: writing {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_measures_every_phase_and_leaves_no_scratch_behind() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        for i in 0..10 {
            std::fs::write(d.path().join(format!("a/f{i}")), vec![1u8; 100]).unwrap();
        }
        std::fs::write(d.path().join("a/b/big"), vec![2u8; 3 << 20]).unwrap();
        std::os::unix::fs::symlink("f1", d.path().join("a/link")).unwrap();
        let opts = BenchOptions {
            write: true,
            write_files: 3,
            write_size: 4096,
            stream_write: 3 << 20,
            ..Default::default()
        };
        let plan = plan(d.path(), &opts).unwrap();
        assert_eq!(plan.entries.len(), 14);
        assert_eq!(plan.small.len(), 10, "symlinks are not read as files");
        assert_eq!(plan.large.as_ref().unwrap().1, 3 << 20);
        let r = run(d.path(), &plan, &opts);
        assert_eq!(r.stat_first.nanos.len(), 14);
        assert_eq!(r.stat_first.errors, 0);
        assert_eq!(r.tree_entries, 14);
        assert_eq!(
            r.tools.len(),
            TOOLS.len() - 4,
            "no checkout, no shards: no git status, no cat"
        );
        assert!(r.tools.iter().all(|(_, d)| d.is_some()), "{:?}", r.tools);
        assert_eq!(r.small_reads.nanos.len(), 10);
        assert_eq!(r.writes.as_ref().unwrap().nanos.len(), 3);
        assert_eq!(r.stream_write.unwrap().0, 3 << 20);
        assert!(r.large.is_some());
        let has_fio = std::process::Command::new("fio")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert_eq!(r.fio_randread_iops.is_some_and(|i| i > 0.0), has_fio);
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "the scratch directory is gone");
        // Another target missing the paths shows errors, not a crash.
        let other = tempfile::tempdir().unwrap();
        let r2 = run(other.path(), &plan, &BenchOptions::default());
        assert_eq!(r2.stat_first.errors, 14);
        let t = table(&[r.clone(), r2.clone()]);
        assert!(
            t.contains("stat, first pass") && t.contains("errors"),
            "{t}"
        );
        let j = to_json(&[r.clone(), r2]);
        assert_eq!(j[1]["stat_first"]["errors"], 14);
        let svg = cdf_svg(&[r]);
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{svg}"
        );
        let last = d.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            svg.contains(&format!(">{last}</text>")),
            "the legend names the target by its last component: {svg}"
        );
    }

    #[test]
    fn quantiles_come_from_the_measured_values() {
        let l = Latencies {
            nanos: (1..=100).map(|i| i * 1000).collect(),
            errors: 0,
        };
        assert_eq!(l.quantile_us(0.5), 51.0);
        assert_eq!(l.quantile_us(0.99), 99.0);
        assert_eq!(l.quantile_us(1.0), 100.0);
        assert!(Latencies::default().quantile_us(0.5).is_nan());
    }
}
