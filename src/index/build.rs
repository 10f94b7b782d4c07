//! Turning a listing into a fresh index file, streaming: files go to SQLite as they arrive,
//! so memory holds the directories and nothing per file.
//!
//! Blobs arrive in any order (the listing is parallel), so every rule here is order
//! independent: a directory always shadows a file of the same name, whichever came first
//! (a directory that appears where a file was written already removes that row); a
//! directory's attributes come from its marker blob (`hdi_isfolder=true` or a zero-length
//! `name/`) when there is one and from the mount defaults otherwise; an implicit directory's
//! mtime is the newest mtime below it, so a rebuilt index shows the same times.
//!
//! Hard links (simfs's own format): a stub blob (`simfs_hardlink=<id>`) becomes one more
//! name of the inode whose data blob carries `simfs_inode=<id>`; a stub whose data blob is
//! missing is hidden and reported, since it has no data to show. Stubs are resolved in SQL
//! once the listing is complete.
//!
//! The index is written to a temporary file and renamed into place only when complete, so a
//! crash while indexing never leaves a half index that a later mount would trust.

use super::names::{split_blob_name, Name};
use super::{kind_code, IndexResult, SourceId, SCHEMA, SCHEMA_VERSION};
use crate::blob::{format, BlobProps};
use crate::posix::{to_ns, Kind};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Attributes for blobs that carry none of their own (mount options).
#[derive(Clone, Debug)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u32,
    pub dir_mode: u32,
}

/// The longest symlink target simfs accepts (PATH_MAX less the NUL).
pub const MAX_TARGET: u64 = 4095;

/// The marker blob of an explicit directory: name, ETag, Content-MD5.
type Marker = (String, String, Option<Vec<u8>>);

/// A directory of the tree being built (all of them stay in memory: there are few).
struct Dir {
    ino: u64,
    /// Index of the parent in `dirs` (the root is its own parent).
    parent: usize,
    name: Name,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    /// The newest mtime of anything below (an implicit directory's own mtime).
    newest: i64,
    marker: Option<Marker>,
    subdirs: u32,
}

/// A hard-link stub waiting to be resolved: its inode, group, entry (directory and name)
/// and blob (name and ETag).
type StubRow = (i64, String, i64, Vec<u8>, Option<String>, Option<String>);

/// Staging tables of a build, dropped before the index is complete.
const STAGING: &str = "
CREATE TABLE build_stubs(ino INTEGER PRIMARY KEY, grp TEXT NOT NULL);
";

pub struct TreeBuilder {
    conn: Connection,
    tmp: PathBuf,
    defaults: Defaults,
    dirs: Vec<Dir>,
    dir_at: HashMap<(usize, Name), usize>,
    next_ino: u64,
}

impl TreeBuilder {
    /// Starts a build whose index will be renamed to `path` by `write`.
    pub fn create(path: &Path, defaults: Defaults) -> IndexResult<TreeBuilder> {
        let tmp = path.with_extension("db.tmp");
        for p in [
            tmp.clone(),
            tmp.with_extension("tmp-wal"),
            tmp.with_extension("tmp-shm"),
        ] {
            let _ = std::fs::remove_file(p);
        }
        let conn = Connection::open(&tmp)?;
        conn.pragma_update(None, "page_size", super::PAGE_SIZE)?;
        // The file is renamed into place only when complete: nothing needs journaling.
        conn.pragma_update(None, "journal_mode", "OFF")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(STAGING)?;
        conn.execute_batch("BEGIN")?;
        let root = Dir {
            ino: 1,
            parent: 0,
            name: Name::new(b"root").expect("a valid name"),
            perm: defaults.dir_mode,
            uid: defaults.uid,
            gid: defaults.gid,
            mtime: to_ns(SystemTime::UNIX_EPOCH),
            newest: to_ns(SystemTime::UNIX_EPOCH),
            marker: None,
            subdirs: 0,
        };
        Ok(TreeBuilder {
            conn,
            tmp,
            defaults,
            dirs: vec![root],
            dir_at: HashMap::new(),
            next_ino: 2,
        })
    }

    /// Hides blob `blob` from the tree, with the reason `simfs check` reports.
    pub fn hide(&mut self, blob: &str, reason: impl AsRef<str>) -> IndexResult<()> {
        self.finding(blob, true, reason.as_ref())
    }

    /// Notes something about a blob that is shown (part of it ignored).
    fn note(&mut self, blob: &str, reason: impl AsRef<str>) -> IndexResult<()> {
        self.finding(blob, false, reason.as_ref())
    }

    fn finding(&self, blob: &str, hidden: bool, reason: &str) -> IndexResult<()> {
        self.conn
            .prepare_cached("INSERT INTO findings(blob, hidden, reason) VALUES (?1, ?2, ?3)")?
            .execute(params![blob, hidden, reason])?;
        Ok(())
    }

    /// The directory `name` in directory `parent`, made (implicit) when missing. A file
    /// already there gives way: the directory wins.
    fn dir(&mut self, parent: usize, name: &Name) -> IndexResult<usize> {
        if let Some(&d) = self.dir_at.get(&(parent, name.clone())) {
            return Ok(d);
        }
        let pino = self.dirs[parent].ino as i64;
        let file: Option<(i64, Option<String>)> = self
            .conn
            .prepare_cached(
                "SELECT d.ino, i.blob FROM dentries d JOIN inodes i ON i.ino = d.ino
                 WHERE d.parent = ?1 AND d.name = ?2",
            )?
            .query_row(params![pino, name.as_bytes()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((ino, blob)) = file {
            self.drop_file(pino, name, ino)?;
            if let Some(b) = blob {
                self.hide(
                    &b,
                    "a directory of the same name exists (the directory wins)",
                )?;
            }
        }
        let epoch = to_ns(SystemTime::UNIX_EPOCH);
        let d = Dir {
            ino: self.next_ino,
            parent,
            name: name.clone(),
            perm: self.defaults.dir_mode,
            uid: self.defaults.uid,
            gid: self.defaults.gid,
            mtime: epoch,
            newest: epoch,
            marker: None,
            subdirs: 0,
        };
        self.next_ino += 1;
        self.dirs.push(d);
        self.dirs[parent].subdirs += 1;
        let id = self.dirs.len() - 1;
        self.dir_at.insert((parent, name.clone()), id);
        Ok(id)
    }

    fn drop_file(&mut self, parent: i64, name: &Name, ino: i64) -> IndexResult<()> {
        self.conn
            .prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")?
            .execute(params![parent, name.as_bytes()])?;
        self.conn
            .prepare_cached("DELETE FROM inodes WHERE ino = ?1")?
            .execute([ino])?;
        self.conn
            .prepare_cached("DELETE FROM build_stubs WHERE ino = ?1")?
            .execute([ino])?;
        Ok(())
    }

    /// Adds one blob, `rel` being its name relative to the mount prefix.
    pub fn add(&mut self, rel: &str, props: BlobProps) -> IndexResult<()> {
        let path = match split_blob_name(rel) {
            Ok(p) => p,
            Err(e) => return self.hide(&props.name, format!("name not representable: {e}")),
        };
        let meta = format::parse(&props.metadata);
        if !meta.rejected.is_empty() {
            let why = format!("ignored metadata: {}", meta.rejected.join(", "));
            self.note(&props.name, why)?;
        }
        let is_marker = meta.is_folder || path.trailing_slash;
        if path.trailing_slash && props.size > 0 && !meta.is_folder {
            return self.hide(&props.name, "name ends in '/' but the blob has data");
        }
        if is_marker && props.size > 0 {
            let why = format!("a directory marker holding {} bytes (ignored)", props.size);
            self.note(&props.name, why)?;
        }
        if meta.hardlink_of.is_some() && props.size > 0 {
            let why = format!(
                "a hard-link stub holding {} bytes (ignored: the data is the group's)",
                props.size
            );
            self.note(&props.name, why)?;
        }
        let (leaf, dirs) = path.segments.split_last().expect("split yields a segment");
        let mut cur = 0;
        for seg in dirs {
            cur = self.dir(cur, seg)?;
        }
        let mtime = to_ns(meta.mtime.unwrap_or(props.last_modified));
        if is_marker {
            let id = self.dir(cur, leaf)?;
            let d = &self.dirs[id];
            if d.marker.is_some() {
                // `a` with hdi_isfolder and `a/` both present: keep the first, report the other.
                return self.hide(&props.name, "a second marker blob for the same directory");
            }
            let defaults = &self.defaults;
            let d = &mut self.dirs[id];
            d.perm = meta.mode.unwrap_or(defaults.dir_mode);
            d.uid = meta.uid.unwrap_or(defaults.uid);
            d.gid = meta.gid.unwrap_or(defaults.gid);
            d.mtime = mtime;
            d.newest = d.newest.max(mtime);
            d.marker = Some((props.name, props.etag, props.content_md5));
            return Ok(());
        }
        if self.dir_at.contains_key(&(cur, leaf.clone())) {
            return self.hide(
                &props.name,
                "a directory of the same name exists (the directory wins)",
            );
        }
        let special = meta.special.as_deref().and_then(Kind::from_special_name);
        let kind = if meta.is_symlink {
            Kind::Symlink
        } else if let (Some(k), 0) = (special, props.size) {
            k
        } else {
            Kind::File
        };
        if kind == Kind::Symlink && (props.size == 0 || props.size > MAX_TARGET) {
            return self.hide(
                &props.name,
                format!("symlink target of {} bytes (1 to {MAX_TARGET})", props.size),
            );
        }
        let ino = self.next_ino as i64;
        let parent = self.dirs[cur].ino as i64;
        let named = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO dentries(parent, name, ino) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![parent, leaf.as_bytes(), ino])?;
        if named == 0 {
            return self.hide(&props.name, "listed twice");
        }
        self.next_ino += 1;
        let perm = match kind {
            Kind::Symlink => 0o777,
            _ => meta.mode.unwrap_or(self.defaults.file_mode),
        };
        let link_id = meta.inode_id.clone().filter(|_| kind == Kind::File);
        self.conn
            .prepare_cached(
                "INSERT INTO inodes(ino, kind, perm, uid, gid, size, mtime_ns, ctime_ns, nlink,
                                    blob, etag, md5, link_id, rdev)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 1, ?8, ?9, ?10, ?11, ?12)",
            )?
            .execute(params![
                ino,
                kind_code(kind),
                perm,
                meta.uid.unwrap_or(self.defaults.uid),
                meta.gid.unwrap_or(self.defaults.gid),
                props.size as i64,
                mtime,
                props.name,
                props.etag,
                props.content_md5,
                link_id,
                meta.rdev.unwrap_or(0),
            ])?;
        if let (Some(group), Kind::File) = (meta.hardlink_of, kind) {
            self.conn
                .prepare_cached("INSERT INTO build_stubs(ino, grp) VALUES (?1, ?2)")?
                .execute(params![ino, group])?;
        }
        let d = &mut self.dirs[cur];
        d.newest = d.newest.max(mtime);
        Ok(())
    }

    /// Symlinks whose targets must be fetched: (inode, blob).
    pub fn pending_symlinks(&self) -> IndexResult<Vec<(u64, BlobProps)>> {
        let mut st = self.conn.prepare(
            "SELECT ino, blob, etag, size, md5 FROM inodes
             WHERE kind = ?1 AND target IS NULL AND blob IS NOT NULL",
        )?;
        let rows = st.query_map([kind_code(Kind::Symlink)], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                BlobProps {
                    name: r.get(1)?,
                    etag: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    last_modified: SystemTime::UNIX_EPOCH,
                    content_md5: r.get(4)?,
                    metadata: BTreeMap::new(),
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a fetched symlink target; an unusable one hides the link.
    pub fn set_target(&mut self, ino: u64, target: Vec<u8>) -> IndexResult<()> {
        if target.is_empty() || target.contains(&0) {
            let gone: Option<(i64, Vec<u8>, Option<String>)> = self
                .conn
                .prepare_cached(
                    "SELECT d.parent, d.name, i.blob FROM dentries d JOIN inodes i
                     ON i.ino = d.ino WHERE d.ino = ?1",
                )?
                .query_row([ino as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            if let Some((parent, name, blob)) = gone {
                let name =
                    Name::new(&name).map_err(|e| super::IndexError::Corrupt(e.to_string()))?;
                self.drop_file(parent, &name, ino as i64)?;
                if let Some(b) = blob {
                    self.hide(&b, "symlink target is empty or contains NUL")?;
                }
            }
            return Ok(());
        }
        self.conn
            .prepare_cached("UPDATE inodes SET target = ?2, size = ?3 WHERE ino = ?1")?
            .execute(params![ino as i64, target, target.len() as i64])?;
        Ok(())
    }

    /// Points every hard-link stub's name at the inode holding the group's data.
    fn resolve_links(&mut self) -> IndexResult<()> {
        let c = &self.conn;
        c.execute_batch("CREATE INDEX build_links ON inodes(link_id) WHERE link_id IS NOT NULL")?;
        let doubled: Vec<String> = c
            .prepare(
                "SELECT link_id FROM inodes WHERE link_id IS NOT NULL AND kind = ?1
                   AND ino NOT IN (SELECT ino FROM build_stubs)
                 GROUP BY link_id HAVING count(*) > 1",
            )?
            .query_map([kind_code(Kind::File)], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for l in doubled {
            // Two data blobs claim one group (a crash mid-move): both stay visible as
            // separate files; stubs join the first.
            tracing::warn!("hard-link group {l} has more than one data blob");
        }
        let stubs: Vec<StubRow> = c
            .prepare(
                "SELECT s.ino, s.grp, d.parent, d.name, i.blob, i.etag FROM build_stubs s
                 JOIN dentries d ON d.ino = s.ino JOIN inodes i ON i.ino = s.ino",
            )?
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut anchor_of = c.prepare(
            "SELECT min(ino) FROM inodes WHERE link_id = ?1 AND kind = ?2
               AND ino NOT IN (SELECT ino FROM build_stubs)",
        )?;
        for (stub, group, parent, name, blob, etag) in stubs {
            let anchor: Option<i64> =
                anchor_of.query_row(params![group, kind_code(Kind::File)], |r| r.get(0))?;
            c.prepare_cached("DELETE FROM inodes WHERE ino = ?1")?
                .execute([stub])?;
            match anchor {
                Some(anchor) => {
                    c.prepare_cached(
                        "UPDATE dentries SET ino = ?3 WHERE parent = ?1 AND name = ?2",
                    )?
                    .execute(params![parent, name, anchor])?;
                    c.prepare_cached("UPDATE inodes SET nlink = nlink + 1 WHERE ino = ?1")?
                        .execute([anchor])?;
                    if let (Some(b), Some(e)) = (blob, etag) {
                        c.prepare_cached(
                            "INSERT OR REPLACE INTO stubs(blob, ino, etag) VALUES (?1, ?2, ?3)",
                        )?
                        .execute(params![b, anchor, e])?;
                    }
                }
                None => {
                    c.prepare_cached("DELETE FROM dentries WHERE parent = ?1 AND name = ?2")?
                        .execute(params![parent, name])?;
                    if let Some(b) = blob {
                        let why = format!("hard link to group {group}, whose data blob is missing");
                        self.finding(&b, true, &why)?;
                    }
                }
            }
        }
        drop(anchor_of);
        c.execute_batch("DROP INDEX build_links; DROP TABLE build_stubs;")?;
        Ok(())
    }

    /// Writes the directories, with their derived attributes: implicit directories take the
    /// newest mtime below them, and link counts are 2 plus their subdirectories.
    fn write_dirs(&mut self) -> IndexResult<()> {
        // Children always come after their parents, so a reverse sweep sees every
        // directory's subdirectories before the directory itself.
        for id in (0..self.dirs.len()).rev() {
            let d = &mut self.dirs[id];
            if d.marker.is_none() {
                d.mtime = d.newest;
            }
            let (mtime, parent) = (d.mtime, d.parent);
            if id != 0 {
                let p = &mut self.dirs[parent];
                p.newest = p.newest.max(mtime);
            }
        }
        let mut ins = self.conn.prepare(
            "INSERT INTO inodes(ino, kind, perm, uid, gid, size, mtime_ns, ctime_ns, nlink,
                                blob, etag, md5)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut dent = self
            .conn
            .prepare("INSERT INTO dentries(parent, name, ino) VALUES (?1, ?2, ?3)")?;
        for (id, d) in self.dirs.iter().enumerate() {
            let (blob, etag, md5) = match &d.marker {
                Some((b, e, m)) => (Some(b.as_str()), Some(e.as_str()), m.as_deref()),
                None => (None, None, None),
            };
            ins.execute(params![
                d.ino as i64,
                kind_code(Kind::Dir),
                d.perm,
                d.uid,
                d.gid,
                d.mtime,
                2 + d.subdirs as i64,
                blob,
                etag,
                md5
            ])?;
            if id != 0 {
                dent.execute(params![
                    self.dirs[d.parent].ino as i64,
                    d.name.as_bytes(),
                    d.ino as i64
                ])?;
            }
        }
        Ok(())
    }

    /// Completes the index and renames it to `path`.
    pub fn write(mut self, path: &Path, source: &SourceId) -> IndexResult<BuildStats> {
        self.resolve_links()?;
        self.write_dirs()?;
        let c = &self.conn;
        let mut meta = c.prepare("INSERT INTO meta(key, value) VALUES (?1, ?2)")?;
        meta.execute(params!["schema", SCHEMA_VERSION])?;
        meta.execute(params!["container_url", source.container_url])?;
        meta.execute(params!["prefix", source.prefix])?;
        meta.execute(params!["complete", "1"])?;
        drop(meta);
        c.execute_batch(super::TOTALS)?;
        let (dir, symlink) = (kind_code(Kind::Dir), kind_code(Kind::Symlink));
        let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> IndexResult<u64> {
            Ok(c.query_row(sql, p, |r| r.get::<_, i64>(0))? as u64)
        };
        let of_kind = "SELECT count(*) FROM inodes WHERE kind = ?1";
        let stats = BuildStats {
            files: count(
                "SELECT count(*) FROM inodes WHERE kind NOT IN (?1, ?2)",
                &[&dir, &symlink],
            )?,
            dirs: count(of_kind, &[&dir])?,
            symlinks: count(of_kind, &[&symlink])?,
            hidden: count("SELECT count(*) FROM findings WHERE hidden", &[])?,
        };
        c.execute_batch("COMMIT")?;
        // The live index runs in WAL mode; the file is complete before it is renamed.
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
        let TreeBuilder { conn, tmp, .. } = self;
        drop(conn);
        for ext in ["db-wal", "db-shm"] {
            let _ = std::fs::remove_file(path.with_extension(ext));
        }
        std::fs::rename(&tmp, path)?;
        Ok(stats)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hidden: u64,
}
