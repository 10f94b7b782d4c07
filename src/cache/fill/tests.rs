use super::{Fill, Mode, Tuning};
use crate::blob::faulty::{FaultyStore, ReadEvent};
use crate::blob::memory::MemoryStore;
use crate::blob::{BlobRef, BlobStore};
use crate::cache::verify::{Verifier, Verify};
use std::sync::Arc;

type Rig = (
    tokio::runtime::Runtime,
    Arc<Fill>,
    Arc<FaultyStore<MemoryStore>>,
    tempfile::TempDir,
);

/// A whole fill (not started) of a blob of `chunks` chunks of 64 KiB through a
/// failure-injecting store, with `start..=max` requests in flight.
fn rig(chunks: u64, (start, max): (usize, usize), opening: std::time::Duration) -> Rig {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mem = MemoryStore::new();
    mem.put("b", vec![5u8; (chunks << 16) as usize], &[]);
    let p = rt.block_on(mem.head("b")).unwrap();
    let blob = BlobRef {
        name: "b".into(),
        etag: p.etag,
        size: p.size,
        content_md5: None,
    };
    let store = Arc::new(FaultyStore::new(mem));
    let dir = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        min_chunk: 64 << 10,
        max_chunk: 64 << 10,
        start_parallel: start,
        max_parallel: max,
        opening,
    };
    let fill = Fill::new(
        blob,
        dir.path().join("tmp"),
        Mode::Whole {
            dest: dir.path().join("dest"),
        },
        tuning,
        (
            store.clone() as Arc<dyn BlobStore>,
            Arc::new(Verifier::new(Verify::None)),
        ),
        rt.handle().clone(),
        Box::new(|_, _| {}),
    )
    .unwrap();
    (rt, fill, store, dir)
}

/// A whole fill of a 4 MiB blob in 64 chunks, the store throttling its first
/// `throttled` reads (each retried to success); the parallelism it ended at.
fn parallelism_after(throttled: u64) -> usize {
    let (_rt, fill, store, _dir) = rig(64, (4, 8), super::OPENING);
    store.throttle_reads(throttled);
    fill.start();
    fill.wait_complete().unwrap();
    fill.parallelism()
}

#[test]
fn a_throttled_fill_halves_its_requests_and_adds_them_back_once_calm() {
    assert_eq!(parallelism_after(u64::MAX), 1, "throttled throughout");
    assert_eq!(
        parallelism_after(3),
        8,
        "throttled at first, then one more per calm stretch up to the maximum"
    );
}

/// An opening no test reaches: only a reader opens the sweep.
const LONG: std::time::Duration = std::time::Duration::from_secs(600);

/// A whole fill of a blob of `chunks` chunks of 64 KiB, each request taking 30 ms, at
/// most `parallel` in flight, the sweep opened after `opening` if no reader does it.
fn slow_fill(chunks: u64, parallel: usize, opening: std::time::Duration) -> Rig {
    let rig = rig(chunks, (parallel, parallel), opening);
    rig.2.set_latency(std::time::Duration::from_millis(30));
    rig
}

fn read_chunk(fill: &Fill, i: u64) {
    fill.read_with(i << 16, 1, |_| Ok(())).unwrap().unwrap();
}

/// Requests sent and not yet answered just before the one for the chunk at `off`.
fn in_flight_when_sent(events: &[ReadEvent], off: u64) -> usize {
    let at = events.iter().position(|e| *e == ReadEvent::Sent(off));
    let mut open = std::collections::HashSet::new();
    for e in &events[..at.expect("the chunk was requested")] {
        match e {
            ReadEvent::Sent(o) => open.insert(*o),
            ReadEvent::Answered(o) => open.remove(o),
        };
    }
    open.len()
}

#[test]
fn a_read_away_from_the_sweep_is_sent_at_once_and_the_sweep_waits_for_it() {
    let (_rt, fill, store, _dir) = slow_fill(48, 4, LONG);
    store.set_latency(std::time::Duration::from_millis(100));
    fill.start();
    read_chunk(&fill, 0);
    // A sequential read: the sweep runs at its full four.
    read_chunk(&fill, 1);
    // Well inside their round trip (not at its end, when a worker comes free anyway).
    std::thread::sleep(std::time::Duration::from_millis(20));
    read_chunk(&fill, 40);
    let ev = store.read_events();
    let jump = 40 << 16;
    assert_eq!(
        in_flight_when_sent(&ev, jump),
        4,
        "the jump did not wait for a sweep request to come back: {ev:?}"
    );
    let sent = ev.iter().position(|e| *e == ReadEvent::Sent(jump)).unwrap();
    let answered = ev
        .iter()
        .position(|e| *e == ReadEvent::Answered(jump))
        .unwrap();
    assert!(
        !ev[sent + 1..answered]
            .iter()
            .any(|e| matches!(e, ReadEvent::Sent(_))),
        "nothing new was sent while the jump was in flight: {ev:?}"
    );
    // Then the sweep goes on from where the reader went, two at a time until the reader
    // shows where it goes next (well inside the round trip of those two).
    std::thread::sleep(std::time::Duration::from_millis(40));
    let ev = store.read_events();
    let after = ev[answered..]
        .iter()
        .filter(|e| matches!(e, ReadEvent::Sent(_)))
        .count();
    assert!(after <= 2, "{after} sent after the jump landed: {ev:?}");
    fill.wait_complete().unwrap();
    let ev = store.read_events();
    let next = ev[answered..]
        .iter()
        .find_map(|e| match e {
            ReadEvent::Sent(o) => Some(*o),
            _ => None,
        })
        .unwrap();
    assert_eq!(next, 41 << 16, "{ev:?}");
}

#[test]
fn a_jump_that_fails_fails_its_read_and_holds_the_sweep_no_longer() {
    let (_rt, fill, store, _dir) = slow_fill(48, 4, LONG);
    fill.start();
    read_chunk(&fill, 0);
    store.fail_get_at(40 << 16);
    assert!(
        fill.read_with(40 << 16, 1, |_| Ok(())).is_err(),
        "the jump's request failed, so does its read"
    );
    store.fail_get_at(u64::MAX);
    fill.wait_complete().unwrap();
    assert!(fill.is_complete(), "the sweep went on to the end");
}

fn most_in_flight(events: &[ReadEvent]) -> usize {
    let (mut open, mut most) = (0usize, 0);
    for e in events {
        match e {
            ReadEvent::Sent(_) => open += 1,
            ReadEvent::Answered(_) => open -= 1,
        }
        most = most.max(open);
    }
    most
}

#[test]
fn the_sweep_fills_the_link_only_once_the_reader_showed_where_it_goes() {
    let (_rt, fill, store, _dir) = slow_fill(64, 8, LONG);
    fill.start();
    // A loader: the header, then straight to the data near the end.
    read_chunk(&fill, 0);
    read_chunk(&fill, 50);
    let ev = store.read_events();
    let before = ev
        .iter()
        .take_while(|e| **e != ReadEvent::Sent(50 << 16))
        .filter(|e| matches!(e, ReadEvent::Sent(_)))
        .count();
    assert!(
        before <= 4,
        "{before} requests went out before the jump (the sweep ran two): {ev:?}"
    );
    fill.wait_complete().unwrap();
    let most = most_in_flight(&store.read_events());
    assert!(most > 4, "then the sweep ran at full parallelism ({most})");
}

#[test]
fn without_a_second_read_the_sweep_opens_after_a_while_or_for_a_whole_waiter() {
    let (rt, fill, store, _dir) = slow_fill(32, 8, LONG);
    fill.start();
    rt.block_on(fill.settled());
    let most = most_in_flight(&store.read_events());
    assert_eq!(most, 2, "no reader and a long opening: two at a time");

    let (rt, fill, store, _dir) = slow_fill(32, 8, std::time::Duration::from_millis(1));
    fill.start();
    rt.block_on(fill.settled());
    let most = most_in_flight(&store.read_events());
    assert!(most > 2, "the opening passed: the sweep ran wider ({most})");

    let (_rt, fill, store, _dir) = slow_fill(32, 8, LONG);
    fill.start();
    fill.wait_complete().unwrap();
    let most = most_in_flight(&store.read_events());
    assert!(most > 2, "a wait for the whole opens at once ({most})");
}

fn tuning() -> Tuning {
    Tuning {
        min_chunk: 1 << 20,
        max_chunk: 8 << 20,
        start_parallel: 8,
        max_parallel: 16,
        opening: super::OPENING,
    }
}

#[test]
fn chunks_start_small_double_and_tile_the_blob() {
    let t = tuning();
    for size in [1u64, 4096, 300_000, 1 << 20, 64 << 20, (1 << 30) + 12_345] {
        let b = t.bounds(size);
        assert_eq!((b[0], *b.last().unwrap()), (0, size), "{size}");
        let lens: Vec<u64> = b.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(lens.iter().all(|&l| l > 0), "{size}: {lens:?}");
        // The first chunk is small whatever the blob's size: the first byte is cheap.
        assert!(lens[0] <= 256 << 10, "{size}: {lens:?}");
        let steady = t.chunk_for(size);
        assert!(lens.iter().all(|&l| l <= steady), "{size}: {lens:?}");
        for w in lens.windows(2).take(lens.len().saturating_sub(2)) {
            assert!(w[1] == w[0] * 2 || w[1] == steady, "{size}: {lens:?}");
        }
    }
    // A 1 GiB blob: 8 MiB chunks after the ramp, not a request per megabyte.
    assert!(t.bounds(1 << 30).len() < 140);
}
