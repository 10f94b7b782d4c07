//! The rates a mount holds itself to (`--max-download-rate`, `--max-upload-rate`,
//! `--max-requests-per-second`), measured from outside: the reader's and writer's clocks,
//! and the requests the fault proxy saw.

use crate::harness::*;
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
    simfs_sync(m.path());
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

#[test]
fn while_the_service_throttles_the_mount_sends_fewer_requests_a_second() {
    // Two files of 32 MiB, read cold one after the other: the first with every answer
    // served, the second with 40% answered 503 ServerBusy. The reader gets every byte both
    // times, and the mount's request rate on the wire (retries included) drops.
    let (az, _fx) = crate::seeded("backoff", 0, 32);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_with(
        proxy.connection_string(),
        "backoff",
        cache.path(),
        &["--verify", "none"],
    );
    let rate_of = |lines: &[String]| {
        let times: Vec<f64> = lines
            .iter()
            .filter(|l| l.contains(" GET ") && !l.contains("comp=list"))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect();
        let span = times.last().unwrap() - times.first().unwrap();
        (times.len(), times.len() as f64 / span.max(1e-3))
    };
    proxy.set(r#"{"log_all": true}"#);
    let expected = crate::big_expected(32);
    assert!(std::fs::read(m.path().join("big/large.bin")).unwrap() == expected);
    let calm = rate_of(&proxy.injected());
    // The same blob again, from a fresh cache.
    unmount_clean(&mut m);
    let cache2 = tempfile::tempdir().unwrap();
    let mut m = mount_with(
        proxy.connection_string(),
        "backoff",
        cache2.path(),
        &["--verify", "none"],
    );
    proxy.set(r#"{"log_all": true, "rates": {"503": 0.4}, "seed": 11}"#);
    assert!(
        std::fs::read(m.path().join("big/large.bin")).unwrap() == expected,
        "no error reaches the reader"
    );
    let throttled = rate_of(&proxy.injected());
    assert!(
        throttled.1 < calm.1,
        "requests/s while throttled {:.1} ({} requests), calm {:.1} ({} requests)",
        throttled.1,
        throttled.0,
        calm.1,
        calm.0
    );
    unmount_clean(&mut m);
}

#[test]
fn a_throttled_request_waits_what_retry_after_asks() {
    // The first GET of the file is answered 503 ServerBusy with Retry-After: 3; the read
    // succeeds, after at least those 3 s (the SDK's own back-off would be 0.2 s).
    let (az, _fx) = crate::seeded("after", 0, 1);
    let proxy = FaultProxy::start(&az);
    let cache = tempfile::tempdir().unwrap();
    let mut m = mount_with(proxy.connection_string(), "after", cache.path(), &[]);
    proxy.set(
        r#"{"retry_after": 3, "rules": [{"method": "GET", "path": "large.bin", "fault": "503", "times": 1}]}"#,
    );
    let t = Instant::now();
    assert!(std::fs::read(m.path().join("big/large.bin")).unwrap() == crate::big_expected(1));
    let waited = t.elapsed().as_secs_f64();
    assert_eq!(proxy.injected().len(), 1, "{:?}", proxy.injected());
    assert!(
        (3.0..20.0).contains(&waited),
        "the read took {waited:.2} s; Retry-After asked for 3"
    );
    unmount_clean(&mut m);
}
