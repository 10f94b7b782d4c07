//! Turning a listing into a tree, and the tree into a fresh index file.
//!
//! Blobs arrive in any order (the listing is parallel), so every rule here is order
//! independent: a directory always shadows a file of the same name, whichever came first;
//! a directory's attributes come from its marker blob (`hdi_isfolder=true` or a zero-length
//! `name/`) when there is one and from the mount defaults otherwise; an implicit directory's
//! mtime is the newest mtime below it, so a rebuilt index shows the same times.
//!
//! Hard links (simfs's own format): a stub blob (`simfs_hardlink=<id>`) becomes one more
//! name of the inode whose data blob carries `simfs_inode=<id>`; a stub whose data blob is
//! missing is hidden and reported, since it has no data to show.
//!
//! The index is written to a temporary file and renamed into place only when complete, so a
//! crash while indexing never leaves a half index that a later mount would trust.

use super::names::{split_blob_name, Name};
use super::{Finding, IndexResult, SourceId, SCHEMA, SCHEMA_VERSION};
use crate::blob::{format, BlobProps};
use crate::posix::{to_ns, Kind};
use rusqlite::{params, Connection};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
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

struct Node {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: SystemTime,
    /// The blob behind this node: data for files and symlinks, the marker for directories.
    blob: Option<BlobProps>,
    target: Option<Vec<u8>>,
    children: BTreeMap<Name, usize>,
    /// Whether a directory's attributes came from a marker blob (else they are derived).
    explicit: bool,
    link_id: Option<String>,
    rdev: u32,
}

pub struct TreeBuilder {
    nodes: Vec<Node>,
    findings: Vec<Finding>,
    defaults: Defaults,
    /// Hard-link stubs seen: (parent node, name, stub node, group id).
    stubs: Vec<(usize, Name, usize, String)>,
    /// Stub blobs resolved to their inode: (inode node, blob name, etag).
    stub_blobs: Vec<(usize, String, String)>,
}

impl TreeBuilder {
    pub fn new(defaults: Defaults) -> Self {
        let root = Self::dir_node(&defaults);
        TreeBuilder {
            nodes: vec![root],
            findings: Vec::new(),
            defaults,
            stubs: Vec::new(),
            stub_blobs: Vec::new(),
        }
    }

    fn dir_node(d: &Defaults) -> Node {
        Node {
            kind: Kind::Dir,
            perm: d.dir_mode,
            uid: d.uid,
            gid: d.gid,
            size: 0,
            mtime: SystemTime::UNIX_EPOCH,
            blob: None,
            target: None,
            children: BTreeMap::new(),
            explicit: false,
            link_id: None,
            rdev: 0,
        }
    }

    /// Hides blob `blob` from the tree, with the reason `simfs check` reports.
    pub fn hide(&mut self, blob: &str, reason: impl Into<String>) {
        self.findings.push(Finding {
            blob: blob.to_string(),
            hidden: true,
            reason: reason.into(),
        });
    }

    /// Notes something about a blob that is shown (part of it ignored).
    fn note(&mut self, blob: &str, reason: impl Into<String>) {
        self.findings.push(Finding {
            blob: blob.to_string(),
            hidden: false,
            reason: reason.into(),
        });
    }

    /// Turns node `id` (a file or symlink in the way of a directory) into an implicit
    /// directory, hiding the blob that was there.
    fn make_dir(&mut self, id: usize) {
        if self.nodes[id].kind == Kind::Dir {
            return;
        }
        if let Some(b) = self.nodes[id].blob.take() {
            self.hide(
                &b.name,
                "a directory of the same name exists (the directory wins)",
            );
        }
        let children = std::mem::take(&mut self.nodes[id].children);
        self.nodes[id] = Self::dir_node(&self.defaults);
        self.nodes[id].children = children;
    }

    fn child(&mut self, parent: usize, name: &Name) -> Option<usize> {
        self.nodes[parent].children.get(name).copied()
    }

    fn insert(&mut self, parent: usize, name: Name, node: Node) -> usize {
        let id = self.nodes.len();
        self.nodes.push(node);
        self.nodes[parent].children.insert(name, id);
        id
    }

    /// Adds one blob, `rel` being its name relative to the mount prefix.
    pub fn add(&mut self, rel: &str, props: BlobProps) {
        let path = match split_blob_name(rel) {
            Ok(p) => p,
            Err(e) => return self.hide(&props.name, format!("name not representable: {e}")),
        };
        let meta = format::parse(&props.metadata);
        if !meta.rejected.is_empty() {
            let why = format!("ignored metadata: {}", meta.rejected.join(", "));
            self.note(&props.name, why);
        }
        let is_marker = meta.is_folder || path.trailing_slash;
        if path.trailing_slash && props.size > 0 && !meta.is_folder {
            return self.hide(&props.name, "name ends in '/' but the blob has data");
        }
        if is_marker && props.size > 0 {
            self.note(
                &props.name,
                format!("a directory marker holding {} bytes (ignored)", props.size),
            );
        }
        if meta.hardlink_of.is_some() && props.size > 0 {
            self.note(
                &props.name,
                format!(
                    "a hard-link stub holding {} bytes (ignored: the data is the group's)",
                    props.size
                ),
            );
        }
        let (leaf, dirs) = path.segments.split_last().expect("split yields a segment");
        let mut cur = 0;
        for seg in dirs {
            cur = match self.child(cur, seg) {
                Some(id) => {
                    self.make_dir(id);
                    id
                }
                None => self.insert(cur, seg.clone(), Self::dir_node(&self.defaults)),
            };
        }
        let mtime = meta.mtime.unwrap_or(props.last_modified);
        let existing = self.child(cur, leaf);
        if is_marker {
            let id = match existing {
                Some(id) => {
                    self.make_dir(id);
                    id
                }
                None => self.insert(cur, leaf.clone(), Self::dir_node(&self.defaults)),
            };
            let d = &self.defaults;
            let n = &mut self.nodes[id];
            if n.explicit {
                // `a` with hdi_isfolder and `a/` both present: keep the first, report the other.
                let name = props.name.clone();
                return self.hide(&name, "a second marker blob for the same directory");
            }
            n.perm = meta.mode.unwrap_or(d.dir_mode);
            n.uid = meta.uid.unwrap_or(d.uid);
            n.gid = meta.gid.unwrap_or(d.gid);
            n.mtime = mtime;
            n.blob = Some(props);
            n.explicit = true;
            return;
        }
        if let Some(id) = existing {
            let why = if self.nodes[id].kind == Kind::Dir {
                "a directory of the same name exists (the directory wins)"
            } else {
                "listed twice"
            };
            return self.hide(&props.name, why);
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
        let node = Node {
            kind,
            perm: match kind {
                Kind::Symlink => 0o777,
                _ => meta.mode.unwrap_or(self.defaults.file_mode),
            },
            uid: meta.uid.unwrap_or(self.defaults.uid),
            gid: meta.gid.unwrap_or(self.defaults.gid),
            size: props.size,
            mtime,
            link_id: meta.inode_id.clone().filter(|_| kind == Kind::File),
            rdev: meta.rdev.unwrap_or(0),
            blob: Some(props),
            target: None,
            children: BTreeMap::new(),
            explicit: true,
        };
        let id = self.insert(cur, leaf.clone(), node);
        if let (Some(group), Kind::File) = (meta.hardlink_of, kind) {
            self.stubs.push((cur, leaf.clone(), id, group));
        }
    }

    /// Points every hard-link stub's name at the inode holding the group's data.
    fn resolve_links(&mut self) {
        let mut anchors: HashMap<String, usize> = HashMap::new();
        let stub_ids: HashSet<usize> = self.stubs.iter().map(|s| s.2).collect();
        for (id, n) in self.nodes.iter().enumerate() {
            if let (Some(l), false) = (&n.link_id, stub_ids.contains(&id)) {
                if anchors.insert(l.clone(), id).is_some() {
                    // Two data blobs claim one group (a crash mid-move): both stay visible
                    // as separate files; stubs join the first.
                    tracing::warn!("hard-link group {l} has more than one data blob");
                }
            }
        }
        for (parent, name, stub, group) in std::mem::take(&mut self.stubs) {
            // A stub may have been displaced by a directory of the same name.
            if self.nodes[parent].children.get(&name) != Some(&stub) {
                continue;
            }
            let blob = self.nodes[stub].blob.clone();
            match anchors.get(&group) {
                Some(&anchor) if self.nodes[anchor].kind == Kind::File => {
                    self.nodes[parent].children.insert(name, anchor);
                    if let Some(b) = blob {
                        self.stub_blobs.push((anchor, b.name, b.etag));
                    }
                }
                _ => {
                    self.nodes[parent].children.remove(&name);
                    if let Some(b) = blob {
                        self.hide(
                            &b.name,
                            format!("hard link to group {group}, whose data blob is missing"),
                        );
                    }
                }
            }
        }
    }

    /// Symlinks whose targets must be fetched: (node id, blob).
    pub fn pending_symlinks(&self) -> Vec<(usize, BlobProps)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.kind == Kind::Symlink && n.target.is_none())
            .filter_map(|(i, n)| n.blob.clone().map(|b| (i, b)))
            .collect()
    }

    /// Records a fetched symlink target; an unusable one hides the link.
    pub fn set_target(&mut self, id: usize, target: Vec<u8>) {
        if target.is_empty() || target.contains(&0) {
            let name = self.nodes[id].blob.as_ref().map(|b| b.name.clone());
            // The node stays out of the tree: detach it from its parent.
            for n in self.nodes.iter_mut() {
                n.children.retain(|_, c| *c != id);
            }
            if let Some(name) = name {
                self.hide(&name, "symlink target is empty or contains NUL");
            }
            return;
        }
        let n = &mut self.nodes[id];
        n.size = target.len() as u64;
        n.target = Some(target);
    }

    /// Derived attributes: implicit directories take the newest mtime below them, and
    /// directory link counts are 2 plus their subdirectories.
    fn finish(&mut self) -> Vec<u32> {
        self.resolve_links();
        let mut nlink = vec![0u32; self.nodes.len()];
        nlink[0] = 1;
        for n in &self.nodes {
            for &c in n.children.values() {
                nlink[c] += 1;
            }
        }
        // Children always have larger ids than their parents, so a reverse sweep sees every
        // child before its parent.
        for id in (0..self.nodes.len()).rev() {
            if self.nodes[id].kind != Kind::Dir {
                continue;
            }
            let mut subdirs = 0u32;
            let mut newest = self.nodes[id].mtime;
            for &c in self.nodes[id].children.values() {
                if self.nodes[c].kind == Kind::Dir {
                    subdirs += 1;
                }
                newest = newest.max(self.nodes[c].mtime);
            }
            nlink[id] = 2 + subdirs;
            if !self.nodes[id].explicit {
                self.nodes[id].mtime = newest;
            }
        }
        nlink
    }

    /// Writes the tree as a complete index at `path` (through a temporary file).
    pub fn write(mut self, path: &Path, source: &SourceId) -> IndexResult<BuildStats> {
        let nlink = self.finish();
        let tmp = path.with_extension("db.tmp");
        for p in [
            tmp.clone(),
            tmp.with_extension("tmp-wal"),
            tmp.with_extension("tmp-shm"),
        ] {
            let _ = std::fs::remove_file(p);
        }
        let mut conn = Connection::open(&tmp)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        let mut stats = BuildStats::default();
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare(
                "INSERT INTO inodes(ino, kind, perm, uid, gid, size, mtime_ns, ctime_ns, nlink,
                                    blob, etag, md5, target, link_id, rdev)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            let mut dent =
                tx.prepare("INSERT INTO dentries(parent, name, ino) VALUES (?1, ?2, ?3)")?;
            // Only nodes reachable from the root are written (a hidden symlink is detached).
            let mut stack = vec![0usize];
            let mut written = HashSet::new();
            while let Some(id) = stack.pop() {
                // A hard-linked inode is reached once per name but written once.
                if !written.insert(id) {
                    continue;
                }
                let n = &self.nodes[id];
                let ino = id as i64 + 1;
                ins.execute(params![
                    ino,
                    super::kind_code(n.kind),
                    n.perm,
                    n.uid,
                    n.gid,
                    n.size as i64,
                    to_ns(n.mtime),
                    nlink[id],
                    n.blob.as_ref().map(|b| b.name.as_str()),
                    n.blob.as_ref().map(|b| b.etag.as_str()),
                    n.blob.as_ref().and_then(|b| b.content_md5.as_deref()),
                    n.target.as_deref(),
                    n.link_id,
                    n.rdev,
                ])?;
                match n.kind {
                    Kind::Dir => stats.dirs += 1,
                    Kind::Symlink => stats.symlinks += 1,
                    _ => stats.files += 1,
                }
                for (name, &c) in &n.children {
                    dent.execute(params![ino, name.as_bytes(), c as i64 + 1])?;
                    stack.push(c);
                }
            }
            let mut stub = tx.prepare("INSERT INTO stubs(blob, ino, etag) VALUES (?1, ?2, ?3)")?;
            for (anchor, blob, etag) in &self.stub_blobs {
                stub.execute(params![blob, *anchor as i64 + 1, etag])?;
            }
            let mut find =
                tx.prepare("INSERT INTO findings(blob, hidden, reason) VALUES (?1, ?2, ?3)")?;
            for f in &self.findings {
                find.execute(params![f.blob, f.hidden, f.reason])?;
                if f.hidden {
                    stats.hidden += 1;
                }
            }
            let mut meta = tx.prepare("INSERT INTO meta(key, value) VALUES (?1, ?2)")?;
            meta.execute(params!["schema", SCHEMA_VERSION])?;
            meta.execute(params!["container_url", source.container_url])?;
            meta.execute(params!["prefix", source.prefix])?;
            meta.execute(params!["complete", "1"])?;
        }
        tx.execute_batch(super::TOTALS)?;
        tx.commit()?;
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
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
