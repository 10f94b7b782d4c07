//! The rates a mount holds itself to (`--max-download-rate`, `--max-upload-rate`,
//! `--max-requests-per-second`), measured from outside: the reader's and writer's clocks,
//! and the requests the fault proxy saw.

use crate::harness::*;
use std::process::Command;
use std::time::Instant;

const MIB: f64 = (1u64 << 20) as f64;

#[test]
fn downloads_and_uploads_hold_to_their_byte_rates() {
    let (az, _fx) = crate::seeded("rates", 0, 40);
    let cache = tempfile::tempdir().unwrap();
    let mut m = crate::mount(
        &az,
        "rates",
        cache.path(),
        &["--max-download-rate", "10M", "--max-upload-rate", "4M"],
    );
    let t = Instant::now();
    let got = std::fs::read(m.path().join("big/large.bin")).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let rate = got.len() as f64 / MIB / secs;
    assert!(
        (5.0..=10.0 * 1.1).contains(&rate),
        "read 40 MiB at {rate:.1} MiB/s in {secs:.2} s; the limit is 10"
    );
    let data = vec![7u8; 12 << 20];
    let t = Instant::now();
    std::fs::write(m.path().join("up.bin"), &data).unwrap();
    let out = Command::new(SIMFS)
        .arg("sync")
        .arg(m.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secs = t.elapsed().as_secs_f64();
    let rate = data.len() as f64 / MIB / secs;
    assert!(
        rate <= 4.0 * 1.1,
        "uploaded 12 MiB at {rate:.1} MiB/s in {secs:.2} s; the limit is 4"
    );
    unmount_clean(&mut m);
}

#[test]
fn requests_hold_to_their_rate_as_the_wire_counts_them() {
    let (az, _fx) = crate::seeded("reqrate", 120, 0);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_with(
        proxy.connection_string(),
        "reqrate",
        cache.path(),
        &["--max-requests-per-second", "20"],
    );
    proxy.set(r#"{"log_all": true}"#);
    for f in walk(m.path()).iter().filter(|f| f.is_file()) {
        std::fs::read(f).unwrap();
    }
    let times: Vec<f64> = proxy
        .injected()
        .iter()
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert!(times.len() >= 40, "{} requests", times.len());
    let span = times.last().unwrap() - times.first().unwrap();
    // The first ones may go at once (a burst of a fifth of a second's worth).
    let rate = (times.len() as f64 - 4.0) / span;
    assert!(
        rate <= 20.0 * 1.1,
        "{} requests in {span:.2} s: {rate:.1}/s; the limit is 20",
        times.len()
    );
    unmount_clean(&mut m);
}
