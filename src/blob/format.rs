//! The persisted POSIX format: how a blob's metadata says what it is.
//!
//! simfs speaks the keys other Azure tools already write, so a container stays readable by
//! them and simfs reads what they wrote:
//!
//! | key            | meaning                                   | written by            |
//! |----------------|-------------------------------------------|-----------------------|
//! | `hdi_isfolder` | `true`: a directory marker blob           | Blobfuse2, AMLFS, ADLS|
//! | `is_symlink`   | `true`: the body is the link target       | Blobfuse2             |
//! | `permissions`  | octal mode bits, e.g. `0755` or `4755`    | Azure Managed Lustre  |
//! | `owner`/`group`| numeric uid / gid                         | Azure Managed Lustre  |
//! | `mtime`        | RFC 3339 with nanoseconds                 | rclone                |
//!
//! Keys are matched case-insensitively (the store lower-cases them) and so are the boolean
//! values. A value that does not parse is ignored — the mount-wide default applies — and
//! reported, never fatal: the filesystem must not fail on what a container holds.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

pub const KEY_IS_FOLDER: &str = "hdi_isfolder";
pub const KEY_IS_SYMLINK: &str = "is_symlink";
pub const KEY_PERMISSIONS: &str = "permissions";
pub const KEY_OWNER: &str = "owner";
pub const KEY_GROUP: &str = "group";
pub const KEY_MTIME: &str = "mtime";
/// simfs's hard links: the data blob of a multiply-linked inode carries `simfs_inode=<id>`;
/// each other name is a zero-length blob with `simfs_hardlink=<id>`.
pub const KEY_INODE: &str = "simfs_inode";
/// simfs's special files: an empty blob with `simfs_type` = `fifo`, `socket`, `char` or
/// `block`, and `simfs_rdev` = the device number of a device.
pub const KEY_TYPE: &str = "simfs_type";
pub const KEY_RDEV: &str = "simfs_rdev";
/// simfs's long paths: Azure limits blob names to 1,024 characters, POSIX paths reach 4,095
/// bytes. A longer path is stored at `.simfs-long/<sha256 of the path>` under the mount
/// prefix, with the path, percent-encoded, in `simfs_path`.
pub const KEY_PATH: &str = "simfs_path";
pub const LONG_DIR: &str = ".simfs-long/";
pub const MAX_BLOB_NAME: usize = 1024;

const PATH_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'.')
    .remove(b'_')
    .remove(b'-');

/// The blob name (relative to the mount prefix) for path `rel`, and the `simfs_path` value
/// it needs when the path is too long to be a blob name itself.
pub fn blob_name_for(prefix: &str, rel: &str) -> (String, Option<String>) {
    if prefix.chars().count() + rel.chars().count() <= MAX_BLOB_NAME {
        return (format!("{prefix}{rel}"), None);
    }
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(rel.as_bytes()));
    let encoded = percent_encoding::utf8_percent_encode(rel, PATH_ESCAPES).to_string();
    (format!("{prefix}{LONG_DIR}{hash}"), Some(encoded))
}

/// The path a `.simfs-long/` blob stands for: None for any other blob, an error (the blob
/// is hidden, and `simfs check` says why) when its `simfs_path` is missing, undecodable, or
/// not a path that belongs at exactly this name: one too long for a blob name of its own,
/// whose hash is this name. A path that fits a blob name is the real blob's, which wins.
pub fn long_path(
    prefix: &str,
    rel: &str,
    meta: &BTreeMap<String, String>,
) -> Result<Option<String>, String> {
    if !rel.starts_with(LONG_DIR) {
        return Ok(None);
    }
    let encoded = meta
        .get(KEY_PATH)
        .ok_or_else(|| format!("a {LONG_DIR} blob without {KEY_PATH}"))?;
    let path = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| format!("{KEY_PATH}={encoded:?} is not percent-encoded UTF-8"))?
        .into_owned();
    if blob_name_for(prefix, &path).0 != format!("{prefix}{rel}") {
        return Err(format!(
            "{KEY_PATH} names {path:?}, which does not belong at this name (it fits a blob name of its own, or hashes elsewhere)"
        ));
    }
    Ok(Some(path))
}

pub const KEY_HARDLINK: &str = "simfs_hardlink";
/// Every blob simfs writes names the mount's index that wrote it (a random id kept in the
/// index): after a lost answer or a crash, write-back recognises a version it wrote itself
/// and converges instead of taking it for someone else's change.
pub const KEY_WRITER: &str = "simfs_writer";

/// What a blob's metadata says about the POSIX object it stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PosixMeta {
    pub is_folder: bool,
    pub is_symlink: bool,
    /// Permission bits including setuid/setgid/sticky (at most 0o7777).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    /// Hard-link group of a data blob (`simfs_inode`).
    pub inode_id: Option<String>,
    /// Hard-link group a stub name belongs to (`simfs_hardlink`).
    pub hardlink_of: Option<String>,
    /// Special file type (`simfs_type`), and its device number.
    pub special: Option<String>,
    pub rdev: Option<u32>,
    /// Values present but not understood, as `key=value`, for `simfs check`.
    pub rejected: Vec<String>,
}

fn is_true(v: &str) -> bool {
    v.trim().eq_ignore_ascii_case("true")
}

/// Reads the simfs-relevant keys from (lower-cased) metadata.
pub fn parse(meta: &BTreeMap<String, String>) -> PosixMeta {
    let mut out = PosixMeta {
        is_folder: meta.get(KEY_IS_FOLDER).is_some_and(|v| is_true(v)),
        is_symlink: meta.get(KEY_IS_SYMLINK).is_some_and(|v| is_true(v)),
        ..Default::default()
    };
    let mut take = |key: &str, parsed: Option<()>| {
        if parsed.is_none() {
            out.rejected.push(format!("{key}={}", meta[key]));
        }
    };
    let mut mode = None;
    let mut uid = None;
    let mut gid = None;
    let mut mtime = None;
    if let Some(v) = meta.get(KEY_PERMISSIONS) {
        mode = parse_mode(v);
        take(KEY_PERMISSIONS, mode.map(|_| ()));
    }
    if let Some(v) = meta.get(KEY_OWNER) {
        uid = v.trim().parse::<u32>().ok();
        take(KEY_OWNER, uid.map(|_| ()));
    }
    if let Some(v) = meta.get(KEY_GROUP) {
        gid = v.trim().parse::<u32>().ok();
        take(KEY_GROUP, gid.map(|_| ()));
    }
    if let Some(v) = meta.get(KEY_MTIME) {
        mtime = parse_time(v);
        take(KEY_MTIME, mtime.map(|_| ()));
    }
    let id = |k: &str| {
        meta.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    out.special = meta.get(KEY_TYPE).map(|v| v.trim().to_ascii_lowercase());
    if let Some(t) = &out.special {
        let known = ["fifo", "socket", "char", "block"].contains(&t.as_str());
        take(KEY_TYPE, known.then_some(()));
    }
    out.rdev = meta.get(KEY_RDEV).and_then(|v| v.trim().parse().ok());
    if meta.contains_key(KEY_RDEV) {
        take(KEY_RDEV, out.rdev.map(|_| ()));
    }
    out.inode_id = id(KEY_INODE);
    out.hardlink_of = id(KEY_HARDLINK);
    for k in [KEY_INODE, KEY_HARDLINK] {
        if meta.contains_key(k) && id(k).is_none() {
            out.rejected.push(format!("{k}={}", meta[k]));
        }
    }
    out.mode = mode;
    out.uid = uid;
    out.gid = gid;
    out.mtime = mtime;
    out
}

/// Octal (`755`, `0755`, `04755`) or symbolic (`rwxr-xr-x`, `-rwsr-xr-t`) permissions.
pub fn parse_mode(v: &str) -> Option<u32> {
    let v = v.trim();
    if !v.is_empty() && v.len() <= 6 && v.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        let m = u32::from_str_radix(v, 8).ok()?;
        return (m <= 0o7777).then_some(m);
    }
    let sym = match v.len() {
        10 => &v[1..],
        9 => v,
        _ => return None,
    };
    let b = sym.as_bytes();
    let mut mode = 0u32;
    for (i, triple) in b.chunks(3).enumerate() {
        let shift = 6 - 3 * i as u32;
        mode |= match triple[0] {
            b'r' => 4,
            b'-' => 0,
            _ => return None,
        } << shift;
        mode |= match triple[1] {
            b'w' => 2,
            b'-' => 0,
            _ => return None,
        } << shift;
        let special = [0o4000, 0o2000, 0o1000][i];
        let exec_char = if i == 2 { (b't', b'T') } else { (b's', b'S') };
        mode |= match triple[2] {
            b'x' => 1 << shift,
            b'-' => 0,
            c if c == exec_char.0 => (1 << shift) | special,
            c if c == exec_char.1 => special,
            _ => return None,
        };
    }
    Some(mode)
}

/// RFC 3339 (rclone writes nanoseconds), or Unix seconds with an optional fraction.
pub fn parse_time(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    if let Ok(t) = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339) {
        let nanos = t.unix_timestamp_nanos();
        return if nanos >= 0 {
            Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).ok()?))
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(Duration::from_nanos(u64::try_from(-nanos).ok()?))
        };
    }
    let secs: f64 = v.parse().ok()?;
    if !secs.is_finite() || secs.abs() > 1e12 {
        return None;
    }
    if secs >= 0.0 {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs_f64(-secs))
    }
}

/// What a blob stands for, for `render`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    Dir,
    Symlink,
    /// File data; `Some(id)` when the inode has (or had) other names.
    File(Option<&'a str>),
    /// A hard-link stub of group `id`.
    Stub(&'a str),
    /// A special file of this `simfs_type` and device number.
    Special(&'a str, u32),
}

/// The metadata simfs writes for an object with these attributes.
pub fn render(
    role: Role<'_>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    match role {
        Role::Dir => {
            m.insert(KEY_IS_FOLDER.to_string(), "true".to_string());
        }
        Role::Symlink => {
            m.insert(KEY_IS_SYMLINK.to_string(), "true".to_string());
        }
        Role::File(Some(id)) => {
            m.insert(KEY_INODE.to_string(), id.to_string());
        }
        Role::File(None) => {}
        Role::Special(kind, rdev) => {
            m.insert(KEY_TYPE.to_string(), kind.to_string());
            if rdev != 0 {
                m.insert(KEY_RDEV.to_string(), rdev.to_string());
            }
        }
        Role::Stub(id) => {
            // A stub holds no attributes: they live with the data, once.
            m.insert(KEY_HARDLINK.to_string(), id.to_string());
            return m;
        }
    }
    m.insert(
        KEY_PERMISSIONS.to_string(),
        format!("{:04o}", mode & 0o7777),
    );
    m.insert(KEY_OWNER.to_string(), uid.to_string());
    m.insert(KEY_GROUP.to_string(), gid.to_string());
    m.insert(KEY_MTIME.to_string(), format_time(mtime));
    m
}

/// Formats a time the way rclone writes `mtime` (RFC 3339, nanoseconds, UTC).
pub fn format_time(t: SystemTime) -> String {
    let nanos = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        crate::blob::normalize_metadata(pairs.iter().map(|(k, v)| (*k, *v)))
    }

    #[test]
    fn reads_blobfuse2_and_amlfs_keys_case_insensitively() {
        let m = parse(&meta(&[
            ("HDI_ISFOLDER", "True"),
            ("Permissions", "0750"),
            ("owner", "1000"),
            ("group", "100"),
            ("mtime", "2024-03-01T10:20:30.123456789Z"),
        ]));
        assert!(m.is_folder);
        assert!(!m.is_symlink);
        assert_eq!(m.mode, Some(0o750));
        assert_eq!((m.uid, m.gid), (Some(1000), Some(100)));
        let d = m
            .mtime
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(d.as_secs(), 1_709_288_430);
        assert_eq!(d.subsec_nanos(), 123_456_789);
        assert!(m.rejected.is_empty());
    }

    #[test]
    fn keeps_setuid_setgid_and_sticky_bits() {
        assert_eq!(parse_mode("4755"), Some(0o4755));
        assert_eq!(parse_mode("01777"), Some(0o1777));
        assert_eq!(parse_mode("rwsr-sr-t"), Some(0o7755));
        assert_eq!(parse_mode("-rw-r--r--"), Some(0o644));
        assert_eq!(parse_mode("rwSr--r-T"), Some(0o5644));
    }

    #[test]
    fn rejects_garbage_values_without_failing() {
        let m = parse(&meta(&[
            ("permissions", "0999"),
            ("owner", "root"),
            ("mtime", "yesterday"),
            ("is_symlink", "yes"),
        ]));
        assert_eq!(m.mode, None);
        assert_eq!(m.uid, None);
        assert_eq!(m.mtime, None);
        assert!(!m.is_symlink, "only 'true' means true");
        assert_eq!(m.rejected.len(), 3);
        assert_eq!(parse_mode("77777"), None);
        assert_eq!(parse_mode(""), None);
    }

    #[test]
    fn rendered_metadata_parses_back_to_the_same_attributes() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let m = render(Role::File(Some("ab12")), 0o4750, 1000, 100, t);
        let p = parse(&m);
        assert_eq!(
            (p.mode, p.uid, p.gid, p.mtime),
            (Some(0o4750), Some(1000), Some(100), Some(t))
        );
        assert_eq!(p.inode_id.as_deref(), Some("ab12"));
        assert_eq!(m["permissions"], "4750");
        let d = parse(&render(Role::Dir, 0o755, 0, 0, t));
        assert!(d.is_folder && !d.is_symlink);
        let stub = parse(&render(Role::Stub("ab12"), 0o644, 0, 0, t));
        assert_eq!(stub.hardlink_of.as_deref(), Some("ab12"));
        assert_eq!(stub.mode, None, "stubs carry no attributes");
    }

    #[test]
    fn long_paths_get_a_hashed_name_and_round_trip() {
        let deep = format!("{}/é x", "d".repeat(1100));
        let (name, path) = blob_name_for("pre/", &deep);
        assert!(
            name.starts_with("pre/.simfs-long/") && name.len() < 100,
            "{name}"
        );
        let meta = BTreeMap::from([(KEY_PATH.to_string(), path.unwrap())]);
        let rel = name.strip_prefix("pre/").unwrap();
        assert_eq!(long_path("pre/", rel, &meta), Ok(Some(deep)));
        assert_eq!(blob_name_for("pre/", "a/b"), ("pre/a/b".to_string(), None));
        assert_eq!(
            long_path("pre/", "a/b", &meta),
            Ok(None),
            "only names under .simfs-long/"
        );
    }

    #[test]
    fn a_long_path_blob_is_trusted_only_at_its_own_name() {
        // A path that fits a blob name: the real blob at that path wins.
        let short = BTreeMap::from([(KEY_PATH.to_string(), "etc/passwd".to_string())]);
        let err = long_path("", ".simfs-long/0123", &short).unwrap_err();
        assert!(err.contains("does not belong"), "{err}");
        // A long path, but under another hash than this name.
        let deep = "d".repeat(1100);
        let (_, encoded) = blob_name_for("", &deep);
        let elsewhere = BTreeMap::from([(KEY_PATH.to_string(), encoded.unwrap())]);
        assert!(long_path("", ".simfs-long/ffff", &elsewhere).is_err());
        // Undecodable, or missing.
        let bad = BTreeMap::from([(KEY_PATH.to_string(), "%ff%fe".to_string())]);
        assert!(long_path("", ".simfs-long/x", &bad)
            .unwrap_err()
            .contains("not percent-encoded UTF-8"));
        assert!(long_path("", ".simfs-long/x", &BTreeMap::new()).is_err());
    }

    #[test]
    fn unknown_special_types_and_garbage_device_numbers_are_reported() {
        let meta = BTreeMap::from([
            (KEY_TYPE.to_string(), "door".to_string()),
            (KEY_RDEV.to_string(), "x12".to_string()),
        ]);
        let p = parse(&meta);
        assert!(
            p.rejected.contains(&"simfs_type=door".to_string()),
            "{:?}",
            p.rejected
        );
        assert!(
            p.rejected.contains(&"simfs_rdev=x12".to_string()),
            "{:?}",
            p.rejected
        );
    }

    #[test]
    fn time_round_trips_through_rclone_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 42);
        assert_eq!(parse_time(&format_time(t)), Some(t));
        assert_eq!(
            parse_time("1700000000.5"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
        );
    }
}
