//! Staging: hydrating whole trees ahead of a job, and dropping them from the cache again.
//!
//! `simfs stage` asks for a plan first: every regular file under the given paths (each
//! counted once, however many names it has), what is cached already, and the room the cache
//! has. A plan larger than that room is refused before anything is fetched, since staging it
//! would evict what it had just staged; forced, only the files that fit are staged, in walk
//! order. Staged files are ordinary cached files: least recently used and evictable once no
//! one has them open. Files with a local copy (written, not yet uploaded) are on the disk
//! already and count as staged. Symlinks are not followed: a tree is staged as it is stored.

use super::{FsResult, SimFs};
use crate::blob::BlobRef;
use crate::index::ROOT_INO;
use crate::posix::Kind;
use std::collections::HashSet;
use std::ffi::OsStr;

/// One file of a plan.
#[derive(Clone, Debug)]
pub struct StageItem {
    pub ino: u64,
    /// Relative to the mount's root.
    pub path: String,
    pub size: u64,
    /// The blob to hydrate; None for a file whose data is its local copy.
    pub blob: Option<BlobRef>,
    pub cached: bool,
}

#[derive(Clone, Debug, Default)]
pub struct StagePlan {
    pub items: Vec<StageItem>,
    /// Bytes of every file in the plan, and of those already on the disk.
    pub bytes: u64,
    pub cached_bytes: u64,
    /// What the cache may hold without trimming it (its high watermark, or what the disk
    /// has room for).
    pub room: u64,
}

impl StagePlan {
    /// Whether everything fits in the cache at once.
    pub fn fits(&self) -> bool {
        self.bytes <= self.room
    }

    /// The files to stage: all of them, or (forced) those that fit, in walk order.
    pub fn within_room(&self) -> (Vec<StageItem>, Vec<StageItem>) {
        let mut used = 0u64;
        self.items.iter().cloned().partition(|i| {
            let fits = used + i.size <= self.room;
            if fits {
                used += i.size;
            }
            fits
        })
    }
}

impl SimFs {
    /// The inode at `rel` (a path relative to the mount's root; empty is the root).
    pub fn resolve(&self, rel: &str) -> FsResult<u64> {
        let mut ino = ROOT_INO;
        for seg in rel.split('/').filter(|s| !s.is_empty() && *s != ".") {
            ino = self.lookup(ino, OsStr::new(seg))?.ino;
        }
        Ok(ino)
    }

    /// Every regular file under `paths` (relative to the root), each once.
    pub fn stage_plan(&self, paths: &[String]) -> FsResult<StagePlan> {
        let mut plan = StagePlan {
            room: self.cache.room()?,
            ..Default::default()
        };
        let mut seen = HashSet::new();
        for p in paths {
            let ino = self.resolve(p)?;
            let mut stack = vec![(ino, p.trim_matches('/').to_string())];
            while let Some((ino, path)) = stack.pop() {
                let attr = self.attr(ino)?;
                match attr.kind {
                    Kind::Dir => {
                        // Reversed onto the stack: files come out in name order.
                        for e in self.index.readdir(ino)?.into_iter().rev() {
                            let name = String::from_utf8_lossy(e.name.as_bytes()).into_owned();
                            let child = if path.is_empty() {
                                name
                            } else {
                                format!("{path}/{name}")
                            };
                            stack.push((e.attr.ino, child));
                        }
                    }
                    Kind::File if seen.insert(ino) => {
                        let local = self.index.is_local(ino)?;
                        let blob = if local {
                            None
                        } else {
                            self.index.blob_of(ino)?
                        };
                        let cached = local
                            || attr.size == 0
                            || blob.as_ref().is_some_and(|b| self.cache.is_hydrated(b));
                        plan.bytes += attr.size;
                        if cached {
                            plan.cached_bytes += attr.size;
                        }
                        plan.items.push(StageItem {
                            ino,
                            path,
                            size: attr.size,
                            blob,
                            cached,
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(plan)
    }

    /// Hydrates one file of a plan (nothing to do when it is cached or local).
    pub fn stage_one(&self, item: &StageItem) -> FsResult<()> {
        match &item.blob {
            Some(b) if b.size > 0 => Ok(self.cache.hydrate(item.ino, b)?),
            _ => Ok(()),
        }
    }

    /// Drops the clean cached copies of every file under `paths`; files open now, and local
    /// copies (not yet uploaded), stay. Returns the files and bytes dropped.
    pub fn evict_tree(&self, paths: &[String]) -> FsResult<(u64, u64)> {
        let plan = self.stage_plan(paths)?;
        let (mut files, mut bytes) = (0, 0);
        for item in plan.items {
            if let Some(b) = &item.blob {
                if let Some(freed) = self.cache.evict(item.ino, b) {
                    files += 1;
                    bytes += freed;
                }
            }
        }
        Ok((files, bytes))
    }
}
