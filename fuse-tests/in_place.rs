//! Writers in place: a file created or opened for writing is written by the kernel straight
//! into its local copy (FUSE passthrough, Linux 6.9+), with no WRITE request, and is still
//! streamed while it grows and committed exactly. `--buffered-writes`, `--no-passthrough`
//! (and kernels without passthrough) write the same files through simfs; all must give the
//! same blob.

use crate::harness::*;
use crate::writeback::{logged_container, staged_block_ids, waits_for_blocks};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// A mount through `proxy` (its requests logged) whose log shows fuser's requests.
fn logged_mount(
    proxy: &FaultProxy,
    container: &str,
    cache: &std::path::Path,
    extra: &[&str],
) -> Mount {
    let mut args = vec![container, "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    Mount::start(
        &args,
        &[
            ("AZURE_STORAGE_CONNECTION_STRING", proxy.connection_string()),
            (
                "SIMFS_LOG",
                "warn,simfs::fuse=info,fuser::request=debug".into(),
            ),
        ],
    )
    .expect("mount")
}

/// WRITE requests simfs answered so far, and whether the kernel offered passthrough.
fn writes_seen(m: &Mount) -> (usize, bool) {
    let log = m.log_text();
    let writes = log.lines().filter(|l| l.contains(" WRITE ")).count();
    (
        writes,
        log.contains("cached files are read by the kernel directly"),
    )
}

/// Checks that the writes of mount `m`, mounted with `extra`, were made in place by the
/// kernel where it offers passthrough and nothing asked otherwise, else through simfs.
fn wrote_where_asked(m: &Mount, extra: &[&str], what: &str) {
    let (writes, passthrough) = writes_seen(m);
    match extra.is_empty() && passthrough {
        true => assert_eq!(writes, 0, "{what}: the kernel wrote in place"),
        false => assert!(writes > 0, "{what}: writes went through simfs"),
    }
}

/// Writes `mib` `n` times through `f`, open at `path`, and checks `stat` sees them all
/// while the writer is open.
fn write_mibs(f: &mut std::fs::File, path: &std::path::Path, mib: &[u8], n: u64, what: &str) {
    for _ in 0..n {
        f.write_all(mib).unwrap();
    }
    assert_eq!(
        std::fs::metadata(path).unwrap().len(),
        n * mib.len() as u64,
        "{what}: stat while the writer is open"
    );
}

#[test]
fn a_read_write_checkpoint_is_streamed_in_place_and_a_rewritten_block_staged_again() {
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 241) as u8).collect();
    let mut want = Vec::with_capacity(65 << 20);
    for _ in 0..65 {
        want.extend_from_slice(&mib);
    }
    want[4096..4105].copy_from_slice(b"rewritten");
    for (container, extra) in [
        ("inplace", &[][..]),
        ("buffered", &["--buffered-writes"][..]),
    ] {
        let (az, proxy) = logged_container(container);
        let cache = tempfile::tempdir().unwrap();
        let mut m = logged_mount(&proxy, container, cache.path(), extra);
        // As HDF5 and SQLite open what they make: read-write.
        let path = m.path().join("model.h5");
        let mut f = create_read_write(&path);
        write_mibs(&mut f, &path, &mib, 65, container);
        // The eight whole 8 MiB blocks go up while the file is open.
        waits_for_blocks(&proxy, 8);
        assert_eq!(staged_block_ids(&proxy).len(), 8, "{container}");
        f.write_all_at(b"rewritten", 4096).unwrap();
        let mut back = [0u8; 9];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(
            &back, b"rewritten",
            "{container}: the writer reads its write"
        );
        f.sync_all().unwrap();
        let ids = staged_block_ids(&proxy);
        assert_eq!(
            ids.len(),
            10,
            "{container}: block 0 again and the tail, no other block twice: {ids:?}"
        );
        drop(f);
        wrote_where_asked(&m, extra, container);
        unmount_clean(&mut m);
        let fresh = tempfile::tempdir().unwrap();
        let n = crate::mount(&az, container, fresh.path(), &[]);
        assert!(
            std::fs::read(n.path().join("model.h5")).unwrap() == want,
            "{container}"
        );
    }
}

#[test]
fn a_file_laid_out_then_overwritten_in_place_is_committed_whole_and_exact() {
    // fio and databases reserve a file's length first, then write into it: it never grows,
    // so nothing of it may be staged before it is written.
    let (az, proxy) = logged_container("laidout");
    let cache = tempfile::tempdir().unwrap();
    let mut m = logged_mount(&proxy, "laidout", cache.path(), &[]);
    let path = m.path().join("data.bin");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let synced = std::process::Command::new(SIMFS)
        .arg("sync")
        .arg(m.path())
        .output()
        .unwrap();
    assert!(synced.status.success(), "{synced:?}");
    let before = staged_block_ids(&proxy).len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let body: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
    for (i, chunk) in body.chunks(1 << 20).enumerate() {
        f.write_all_at(chunk, (i as u64) << 20).unwrap();
    }
    // Several looks at the file: its length never moved.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        staged_block_ids(&proxy).len(),
        before,
        "nothing staged while it is overwritten"
    );
    f.sync_all().unwrap();
    assert_eq!(
        staged_block_ids(&proxy).len(),
        before + 3,
        "its three blocks, staged by the fsync"
    );
    // A block written after the fsync is staged again at the next; the others are not.
    f.write_all_at(b"last", 0).unwrap();
    f.sync_all().unwrap();
    let staged = staged_block_ids(&proxy);
    let mut want = body;
    want[..4].copy_from_slice(b"last");
    // The file as the container holds it, read by a node with an empty cache.
    let committed = || {
        let cache = tempfile::tempdir().unwrap();
        let n = crate::mount(&az, "laidout", cache.path(), &[]);
        std::fs::read(n.path().join("data.bin")).unwrap()
    };
    // What that fsync committed, read while the writer still has the file open: the
    // contract first, then what it cost (this count once failed in a full suite run, and
    // alone it cannot tell a lost write from a test that looked too early).
    let after_fsync = committed();
    assert!(
        after_fsync == want,
        "the second fsync committed the file as it was (first bytes {:?}); requests: {:#?}",
        after_fsync.get(..4),
        proxy.injected()
    );
    assert_eq!(
        staged.len(),
        before + 4,
        "block 0 again, and no other; requests: {:#?}",
        proxy.injected()
    );
    drop(f);
    let (writes, passthrough) = writes_seen(&m);
    if passthrough {
        assert_eq!(writes, 0, "the kernel wrote in place");
    }
    unmount_clean(&mut m);
    assert!(committed() == want);
}

#[test]
fn a_write_only_file_is_written_in_place_streamed_and_committed_exact() {
    // dd's and torch.save's open: write-only, created or truncated.
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 239) as u8).collect();
    for (container, extra) in [("wonly", &[][..]), ("wonlynopt", &["--no-passthrough"][..])] {
        let (az, proxy) = logged_container(container);
        let cache = tempfile::tempdir().unwrap();
        let mut m = logged_mount(&proxy, container, cache.path(), extra);
        let path = m.path().join("ckpt.pt");
        let mut f = std::fs::File::create(&path).unwrap();
        write_mibs(&mut f, &path, &mib, 17, container);
        // The two whole 8 MiB blocks start up while the file is open.
        waits_for_blocks(&proxy, 2);
        drop(f);
        // The next epoch's save truncates the file written here and writes it again, while
        // those blocks are still going up (slowly, through the proxy): the short file's
        // create must not be taken for someone else's blob.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(&mib[..5000]).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        wrote_where_asked(&m, extra, container);
        unmount_clean(&mut m);
        let mut want = mib[..5000].to_vec();
        want.extend_from_slice(b"end");
        let fresh = tempfile::tempdir().unwrap();
        let n = crate::mount(&az, container, fresh.path(), &[]);
        let got = std::fs::read(n.path().join("ckpt.pt"));
        assert!(
            got.as_ref().is_ok_and(|g| *g == want),
            "{container}: {:?} bytes; the writing mount's log:\n{}",
            got.map(|g| g.len()),
            m.log_text()
        );
    }
}
