//! The index's SQLite VFS: unix-excl's, with each commit's log frames written at once.
//!
//! SQLite appends a commit to the log a frame at a time, each frame as two writes (its
//! 24-byte header, then the page), so a create or a rename, which changes seven to ten
//! pages, made some twenty `pwrite` calls, each a trip through the cache disk's buffered
//! write path: in a profile of 3,000 small files written and renamed on the mount, a
//! quarter of a rename's time and a sixth of a create's. This VFS holds a log's appends
//! in memory and writes them with one call when the page of the commit frame arrives.
//!
//! Why that is safe: SQLite publishes a commit (in the log's index, in memory) only after
//! it has written every frame of it, the commit frame last, so the frames are in the file
//! before any reader, or recovery after a crash, can look for them, as before.
//!
//! Invariants:
//! - only appends at the log file's end, each continuing the held run, are held; any other
//!   write (the log's header when it starts over, frames rewritten within a transaction,
//!   checksums rewritten) first writes what is held, then goes straight to the file;
//! - every other call on the file (read, size, truncate, sync, file control, close) first
//!   writes what is held, so the file always reads as SQLite wrote it;
//! - at most `MOST` bytes are held (a large transaction's frames go out as they come);
//! - other files (the database itself) and read-only handles pass through untouched.
//!
//! If the VFS cannot be registered (no unix-excl), connections use unix-excl itself.

use rusqlite::ffi;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// The name connections ask for.
const NAME: &CStr = c"simfs-wal";
/// The VFS underneath: unix's, with the locks between this process's connections kept in
/// memory. The default VFS takes a POSIX lock on the `-shm` file (an fcntl call) at the
/// start and end of every read and write transaction: 6 % of the daemon's CPU during a
/// `pip install` into the mount. With this one the process holds one exclusive lock on the
/// index for as long as a connection is open, and the log's index lives in the heap.
/// Another process cannot open a serving mount's index (`simfs status` asks the daemon
/// instead); nothing else ever needed to.
const INNER: &CStr = c"unix-excl";
/// Held bytes past which they are written without waiting for the commit. Under 128 KiB:
/// unix's write masks each call's length to 17 bits, so a longer one writes short, or
/// nothing, and fails as a full disk.
const MOST: usize = 64 << 10;
/// A log frame's header (the WAL format): page number, then the database size in pages
/// after the commit for a commit frame (zero for others), salts and checksums.
const FRAME_HEADER: usize = 24;

/// The VFS for the index's connections: this one once registered, else unix-excl.
pub(super) fn name() -> &'static CStr {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(register) {
        NAME
    } else {
        INNER
    }
}

#[cfg(test)]
thread_local! {
    /// Log writes this thread made to a file (each one system call), for tests.
    static FILE_WRITES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// An open file: SQLite's part, then where the inner VFS keeps its own file (right after
/// this struct, in the same allocation), and the held appends of a log opened for writing.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    /// Null for every file but a log opened read-write.
    held: *mut Held,
}

/// Where the inner file starts within our allocation (8-byte aligned, as SQLite's own).
const INNER_AT: usize = std::mem::size_of::<File>().next_multiple_of(8);

struct Held {
    /// Where `bytes` go in the file.
    at: i64,
    bytes: Vec<u8>,
    /// The file's length counting `bytes`: only writes there are appends.
    end: i64,
    /// Where the page of a held commit frame header goes: its arrival ends the commit.
    commit_page_at: Option<i64>,
}

fn register() -> bool {
    // SAFETY: sqlite3_vfs_find returns a pointer to a VFS SQLite keeps for the process's
    // life (unix-excl is built in and never unregistered), or null.
    let inner = unsafe { ffi::sqlite3_vfs_find(INNER.as_ptr()) };
    if inner.is_null() {
        tracing::warn!("SQLite has no unix-excl VFS: the index writes its log frame by frame");
        return false;
    }
    // SAFETY: `inner` is valid (above); the copy takes its methods, then ours replace the
    // ones that open files or take the VFS itself.
    let mut vfs: ffi::sqlite3_vfs = unsafe { *inner };
    vfs.szOsFile = (INNER_AT + vfs.szOsFile as usize) as c_int;
    vfs.pNext = std::ptr::null_mut();
    vfs.zName = NAME.as_ptr();
    vfs.pAppData = inner.cast();
    vfs.xOpen = Some(open);
    vfs.xDelete = Some(delete);
    vfs.xAccess = Some(access);
    vfs.xFullPathname = Some(full_pathname);
    // Leaked on purpose: SQLite keeps the pointer for the process's life.
    let vfs = Box::into_raw(Box::new(vfs));
    // SAFETY: a complete VFS whose storage is never freed; not made the default.
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
    if rc != ffi::SQLITE_OK {
        tracing::warn!(
            "registering the index's VFS failed ({rc}): it writes its log frame by frame"
        );
        return false;
    }
    true
}

/// The VFS underneath ours.
unsafe fn inner_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    (*vfs).pAppData.cast()
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let inner_vfs = inner_vfs(vfs);
    let f = file.cast::<File>();
    let inner = file.cast::<u8>().add(INNER_AT).cast::<ffi::sqlite3_file>();
    (*f).base.pMethods = std::ptr::null();
    (*f).inner = inner;
    (*f).held = std::ptr::null_mut();
    let Some(open) = (*inner_vfs).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let rc = open(inner_vfs, name, inner, flags, out_flags);
    if rc != ffi::SQLITE_OK || (*inner).pMethods.is_null() {
        return rc;
    }
    let log = flags & ffi::SQLITE_OPEN_WAL != 0 && flags & ffi::SQLITE_OPEN_READWRITE != 0;
    if log {
        let mut end: ffi::sqlite3_int64 = 0;
        let size = (*(*inner).pMethods).xFileSize;
        if size.is_some_and(|size| size(inner, &mut end) == ffi::SQLITE_OK) {
            (*f).held = Box::into_raw(Box::new(Held {
                at: 0,
                bytes: Vec::new(),
                end,
                commit_page_at: None,
            }));
        }
    }
    (*f).base.pMethods = &METHODS;
    rc
}

unsafe extern "C" fn delete(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, sync: c_int) -> c_int {
    let inner = inner_vfs(vfs);
    match (*inner).xDelete {
        Some(f) => f(inner, name, sync),
        None => ffi::SQLITE_IOERR_DELETE,
    }
}

unsafe extern "C" fn access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    let inner = inner_vfs(vfs);
    match (*inner).xAccess {
        Some(f) => f(inner, name, flags, out),
        None => ffi::SQLITE_IOERR_ACCESS,
    }
}

unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let inner = inner_vfs(vfs);
    match (*inner).xFullPathname {
        Some(f) => f(inner, name, n, out),
        None => ffi::SQLITE_CANTOPEN,
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// The inner file of `p` and its methods.
unsafe fn inner(
    p: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    let inner = (*p.cast::<File>()).inner;
    (inner, &*(*inner).pMethods)
}

/// Calls the inner file's method `$m` with `$args`, or answers `$none` when it has none.
macro_rules! forward {
    ($p:expr, $m:ident, $none:expr $(, $arg:expr)*) => {{
        let (inner, methods) = inner($p);
        match methods.$m {
            Some(f) => f(inner $(, $arg)*),
            None => $none,
        }
    }};
}

/// Writes what `p` holds, if anything.
unsafe fn write_held(p: *mut ffi::sqlite3_file) -> c_int {
    let held = (*p.cast::<File>()).held;
    if held.is_null() || (*held).bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    (*held).commit_page_at = None;
    let (bytes, at) = ((*held).bytes.as_ptr(), (*held).at);
    let rc = write_through(p, bytes.cast(), (*held).bytes.len() as c_int, at);
    (*held).bytes.clear();
    if rc != ffi::SQLITE_OK {
        // The file may end anywhere from there: SQLite writes those frames again, and
        // until the end is known again they go straight to the file.
        (*held).end = (*held).end.min(at);
    }
    rc
}

unsafe fn write_through(
    p: *mut ffi::sqlite3_file,
    data: *const c_void,
    n: c_int,
    at: i64,
) -> c_int {
    #[cfg(test)]
    FILE_WRITES.with(|w| w.set(w.get() + 1));
    forward!(p, xWrite, ffi::SQLITE_IOERR_WRITE, data, n, at)
}

unsafe extern "C" fn write(
    p: *mut ffi::sqlite3_file,
    data: *const c_void,
    n: c_int,
    at: ffi::sqlite3_int64,
) -> c_int {
    let held = (*p.cast::<File>()).held;
    if held.is_null() || n <= 0 {
        return forward!(p, xWrite, ffi::SQLITE_IOERR_WRITE, data, n, at);
    }
    let len = n as usize;
    if at != (*held).end || (*held).bytes.len() + len > MOST {
        let rc = write_held(p);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let rc = write_through(p, data, n, at);
        if rc == ffi::SQLITE_OK {
            (*held).end = (*held).end.max(at + n as i64);
        }
        return rc;
    }
    let bytes = std::slice::from_raw_parts(data.cast::<u8>(), len);
    let commit_done = {
        let h = &mut *held;
        if h.bytes.is_empty() {
            h.at = at;
        }
        h.bytes.extend_from_slice(bytes);
        h.end = at + n as i64;
        let done = h.commit_page_at == Some(at);
        h.commit_page_at =
            (len == FRAME_HEADER && bytes[4..8] != [0, 0, 0, 0]).then_some(at + n as i64);
        done
    };
    if commit_done {
        // The commit frame is complete: SQLite publishes it once this call returns.
        return write_held(p);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(p: *mut ffi::sqlite3_file) -> c_int {
    let rc = write_held(p);
    let f = p.cast::<File>();
    if !(*f).held.is_null() {
        drop(Box::from_raw((*f).held));
        (*f).held = std::ptr::null_mut();
    }
    let closed = forward!(p, xClose, ffi::SQLITE_OK);
    if rc != ffi::SQLITE_OK {
        rc
    } else {
        closed
    }
}

/// Writes what is held, then runs `then`: every call but a write sees the file as written.
unsafe fn after_held(p: *mut ffi::sqlite3_file, then: impl FnOnce() -> c_int) -> c_int {
    match write_held(p) {
        ffi::SQLITE_OK => then(),
        rc => rc,
    }
}

unsafe extern "C" fn read(
    p: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    at: ffi::sqlite3_int64,
) -> c_int {
    after_held(p, || forward!(p, xRead, ffi::SQLITE_IOERR_READ, buf, n, at))
}

unsafe extern "C" fn truncate(p: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    after_held(p, || {
        let rc = forward!(p, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size);
        let held = (*p.cast::<File>()).held;
        if rc == ffi::SQLITE_OK && !held.is_null() {
            (*held).end = size;
        }
        rc
    })
}

unsafe extern "C" fn sync(p: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    after_held(p, || forward!(p, xSync, ffi::SQLITE_IOERR_FSYNC, flags))
}

unsafe extern "C" fn file_size(p: *mut ffi::sqlite3_file, out: *mut ffi::sqlite3_int64) -> c_int {
    after_held(p, || forward!(p, xFileSize, ffi::SQLITE_IOERR_FSTAT, out))
}

unsafe extern "C" fn lock(p: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(p, xLock, ffi::SQLITE_OK, level)
}

unsafe extern "C" fn unlock(p: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(p, xUnlock, ffi::SQLITE_OK, level)
}

unsafe extern "C" fn check_reserved_lock(p: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    forward!(p, xCheckReservedLock, ffi::SQLITE_OK, out)
}

unsafe extern "C" fn file_control(p: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    after_held(p, || {
        forward!(p, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)
    })
}

unsafe extern "C" fn sector_size(p: *mut ffi::sqlite3_file) -> c_int {
    forward!(p, xSectorSize, 4096)
}

unsafe extern "C" fn device_characteristics(p: *mut ffi::sqlite3_file) -> c_int {
    forward!(p, xDeviceCharacteristics, 0)
}

unsafe extern "C" fn shm_map(
    p: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    forward!(
        p,
        xShmMap,
        ffi::SQLITE_IOERR_SHMMAP,
        page,
        size,
        extend,
        out
    )
}

unsafe extern "C" fn shm_lock(
    p: *mut ffi::sqlite3_file,
    at: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    forward!(p, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, at, n, flags)
}

unsafe extern "C" fn shm_barrier(p: *mut ffi::sqlite3_file) {
    let (inner, methods) = inner(p);
    if let Some(f) = methods.xShmBarrier {
        f(inner)
    }
}

unsafe extern "C" fn shm_unmap(p: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    forward!(p, xShmUnmap, ffi::SQLITE_OK, delete)
}

unsafe extern "C" fn fetch(
    p: *mut ffi::sqlite3_file,
    at: ffi::sqlite3_int64,
    n: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let (inner, methods) = inner(p);
    match methods.xFetch {
        Some(f) if methods.iVersion >= 3 => f(inner, at, n, out),
        _ => {
            *out = std::ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn unfetch(
    p: *mut ffi::sqlite3_file,
    at: ffi::sqlite3_int64,
    page: *mut c_void,
) -> c_int {
    let (inner, methods) = inner(p);
    match methods.xUnfetch {
        Some(f) if methods.iVersion >= 3 => f(inner, at, page),
        _ => ffi::SQLITE_OK,
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags};
    use std::path::Path;

    fn writes() -> u64 {
        super::FILE_WRITES.with(|w| w.get())
    }

    /// A database in WAL mode through this VFS, set up as the index's writer is.
    fn open(path: &Path) -> Connection {
        let c =
            Connection::open_with_flags_and_vfs(path, OpenFlags::default(), super::name()).unwrap();
        c.pragma_update(None, "page_size", 1024).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "synchronous", "NORMAL").unwrap();
        c.pragma_update(None, "journal_size_limit", 0).unwrap();
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY, v BLOB);
             CREATE INDEX IF NOT EXISTS t_v ON t(v);",
        )
        .unwrap();
        c
    }

    /// What a crash right now would leave: the files as they are, opened afresh (SQLite
    /// recovers the log, checking every frame's checksum) with the default VFS.
    fn as_after_a_crash(path: &Path) -> (tempfile::TempDir, Connection) {
        let copy = tempfile::tempdir().unwrap();
        let to = copy.path().join("t.db");
        std::fs::copy(path, &to).unwrap();
        let wal = path.with_extension("db-wal");
        if wal.exists() {
            std::fs::copy(&wal, to.with_extension("db-wal")).unwrap();
        }
        let c = Connection::open(&to).unwrap();
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        (copy, c)
    }

    fn rows(c: &Connection) -> Vec<(i64, Vec<u8>)> {
        let mut st = c.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn a_commit_writes_its_log_frames_with_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(&dir.path().join("t.db"));
        c.execute_batch("INSERT INTO t(k, v) VALUES (1, zeroblob(10))")
            .unwrap();
        for round in 0..20i64 {
            let before = writes();
            // A dozen rows of 200 bytes, in the table and its index: several pages.
            let tx = c.unchecked_transaction().unwrap();
            for i in 0..12i64 {
                tx.execute(
                    "INSERT INTO t(k, v) VALUES (?1, randomblob(200))",
                    [100 + round * 12 + i],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            assert_eq!(writes() - before, 1, "round {round}");
        }
    }

    #[test]
    fn every_commit_is_in_the_file_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let c = open(&path);
        // A small log, so it starts over (and is cut back) several times on the way.
        c.pragma_update(None, "wal_autocheckpoint", 20).unwrap();
        for k in 0..60i64 {
            c.execute("INSERT INTO t(k, v) VALUES (?1, randomblob(300))", [k])
                .unwrap();
            if k % 7 == 0 {
                let (_copy, after) = as_after_a_crash(&path);
                assert_eq!(rows(&after), rows(&c), "after commit {k}");
            }
        }
        let (_copy, after) = as_after_a_crash(&path);
        assert_eq!(rows(&after), rows(&c));
    }

    /// A transaction of more frames than are held at once (hundreds of kilobytes, as an
    /// index's refresh writes) goes out in several writes, every one of them whole.
    #[test]
    fn a_large_transaction_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let c = open(&path);
        let before = writes();
        let tx = c.unchecked_transaction().unwrap();
        for k in 0..1000i64 {
            tx.execute("INSERT INTO t(k, v) VALUES (?1, randomblob(700))", [k])
                .unwrap();
        }
        tx.commit().unwrap();
        assert!(writes() - before > 1, "held past the limit");
        let (_copy, after) = as_after_a_crash(&path);
        assert_eq!(rows(&after), rows(&c));
    }

    /// A transaction larger than the page cache spills pages to the log before it commits,
    /// then rewrites some of those frames and their checksums: all of it must be in the
    /// file, exact, when the commit returns.
    #[test]
    fn a_transaction_that_spills_and_rewrites_frames_is_exact_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let c = open(&path);
        c.pragma_update(None, "cache_size", 10).unwrap();
        c.execute_batch("INSERT INTO t(k, v) VALUES (0, zeroblob(1))")
            .unwrap();
        let tx = c.unchecked_transaction().unwrap();
        for k in 1..400i64 {
            tx.execute("INSERT INTO t(k, v) VALUES (?1, randomblob(500))", [k])
                .unwrap();
        }
        // The same pages changed again after they spilled.
        tx.execute_batch("UPDATE t SET v = randomblob(400) WHERE k % 3 = 0")
            .unwrap();
        tx.commit().unwrap();
        let (_copy, after) = as_after_a_crash(&path);
        assert_eq!(rows(&after), rows(&c));
    }
}
