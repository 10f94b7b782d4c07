//! Checkpoints streamed while written: the blocks a sequential writer has finished are staged
//! (Put Block) in the background, so the close or fsync that commits the file stages only
//! what is left and commits the block list, and a 10 GB checkpoint's fsync pays its tail.
//!
//! Per inode being written, a `Stream` keeps for each block of `block_size` bytes a sequence
//! number, bumped by every write, truncate or allocation that touches the block, and for a
//! staged block the id it was staged under and the sequence number it had when its data was
//! read back from the local copy. A block is staged once the writer has moved past its end
//! and the file is larger than one PUT. The commit (`upload_local`) reuses a staged block
//! only while its sequence number is unchanged: a block written again after it was staged
//! is staged again, and whatever a random writer or a truncate left unstaged or stale is
//! staged at the commit. So the committed blob is always the file as it was at the commit.
//!
//! A stream is made by the first write that reaches past one PUT's size: nothing was staged
//! before it, so changes before it need no record.
//!
//! A commit while a handle still writes the file (an fsync mid-stream, a log appended and
//! fsynced) keeps the stream: the blocks it committed stay known, and the next commit names
//! them again (the block list asks for the "latest" block of each id, which the service
//! finds among the committed ones), so each fsync pays what changed since the last, not the
//! whole file again. The stream goes with the last commit after the writers are done.
//!
//! Memory stays bounded: a block is read back from the local copy when it is staged, with
//! at most `IN_FLIGHT` blocks in flight across the mount. Staged blocks belong to one blob
//! name: a rename before the commit (or a commit by anyone else to the name, after which the
//! service drops uncommitted blocks and refuses the list) makes the upload fall back to a
//! whole one, and the stream starts over. Nothing here is journaled: after a crash the
//! previous version is still the committed one, and the next mount uploads the file whole.
//!
//! A writer appending to a file that goes quiet with the file still open (`git index-pack`
//! resolving deltas before it fsyncs the pack it wrote, a trainer between a save and its
//! fsync) has its unstaged blocks staged after a quiet spell (`WritebackOptions::quiet`),
//! the partial last one too. That part serves the commit as the first part of its block
//! while no write or truncate reached into it (unseen writes: while its checksum holds);
//! what was appended after it goes up at the commit as a block of its own, so block sizes
//! in a list vary. A tail is staged again while quiet only once it has doubled, and not
//! below a quarter block, so a log appended slowly costs at most about twice its bytes.
//!
//! Writers in place (`fs::in_place`) write where simfs cannot see it; their streams are fed
//! and checked differently (`unseen.rs`).

use super::settled::Parts;
use super::Writeback;
use crate::blob::upload::UploadOptions;
use crate::blob::{Expect, Metadata};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Blocks being staged at once across the mount (each is read into memory).
const IN_FLIGHT: usize = 8;
/// A block blob holds at most this many blocks.
pub(super) const MAX_BLOCKS: u64 = 50_000;

/// One block of a commit.
struct Planned {
    id: Vec<u8>,
    /// The service has it (staged ahead).
    done: bool,
    /// The sequence number of the file's block its data is read at.
    seq: u64,
    /// Where in the file it starts, and its length: a whole block, the file's last
    /// (partial) one, or a part of one (a prefix staged while the writer was quiet, and
    /// the rest).
    off: u64,
    len: u64,
}

#[derive(Default)]
pub(super) struct Stream {
    /// The blob name the blocks are staged for, from the first staging on.
    name: Option<String>,
    /// Distinguishes this stream's block ids from any other upload's.
    nonce: u128,
    /// Sequence number of the last change, per block (0: never written).
    changed: Vec<u64>,
    /// Staged (or staged and committed) blocks: id and the sequence number their data was
    /// read at.
    pub(super) staged: HashMap<u64, (Vec<u8>, u64)>,
    /// The CRC64 of each staged block's data as it was staged: what the commit checks the
    /// blocks against once writes are no longer seen (`unseen.rs`; a stream can become one
    /// of unseen writes, when a writer in place opens the file, without losing its blocks).
    pub(super) sums: HashMap<u64, u64>,
    /// Blocks being staged now.
    pub(super) staging: std::collections::HashSet<u64>,
    /// The partial last block staged while the writer was quiet, and its length: the only
    /// entry of `staged` shorter than a block.
    pub(super) tail: Option<(u64, u64)>,
    /// A task waits for the writer to go quiet.
    quiet_armed: bool,
    /// Where the last seen write ended: a writer whose last write ended at the file's end
    /// is appending, and only such a writer has its blocks staged when it goes quiet (a
    /// database rewriting blocks here and there would have them staged again and again).
    last_end: u64,
    next_seq: u64,
    /// Changes counted, and their count when the last commit planned: equal when nothing
    /// changed since.
    touches: u64,
    committed_touches: u64,
    /// The first block not yet looked at for staging.
    pub(super) cursor: u64,
    /// A commit is under way (or the stream was dropped): no new staging.
    pub(super) closed: bool,
    /// Its writes are not seen (writers in place): see `unseen.rs`.
    pub(super) unseen: Option<super::unseen::Unseen>,
}

impl Stream {
    fn new(ino: u64) -> Stream {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            ^ (ino as u128) << 64;
        Stream {
            nonce,
            ..Default::default()
        }
    }

    fn touch(&mut self, first: u64, last: u64) {
        if self.changed.len() <= last as usize {
            self.changed.resize(last as usize + 1, 0);
        }
        self.next_seq += 1;
        self.touches += 1;
        for b in first..=last {
            self.changed[b as usize] = self.next_seq;
        }
    }

    /// Forgets every staged block: they belong to a name no longer written, or the service
    /// no longer has them.
    fn start_over(&mut self) {
        self.name = None;
        self.staged.clear();
        self.tail = None;
        self.cursor = 0;
        self.sums.clear();
    }

    /// Bytes from `from` on changed (a write, or a truncate to `from`): a prefix staged
    /// while the writer was quiet that reaches past `from` no longer holds the file's data.
    /// (Appends past it keep it: the commit stages the rest of its block after it.)
    fn tail_overwritten(&mut self, from: u64, block: u64) {
        if let Some((b, len)) = self.tail {
            if from < b * block + len {
                self.tail = None;
                self.staged.remove(&b);
                self.sums.remove(&b);
            }
        }
    }

    /// Block `b`, `len` bytes read at write number `seq`, is the service's under `id`
    /// (staged, or committed), with CRC64 `sum` when it was sent just now. A partial one,
    /// the file's last, becomes the tail the next commit starts its block with; it is only
    /// known to hold the file's data if nothing wrote to its block while it was read and
    /// sent (an unseen stream's sum is checked at the commit), so otherwise it is not kept.
    /// Returns whether it was kept.
    fn staged_as(
        &mut self,
        b: u64,
        id: Vec<u8>,
        seq: u64,
        len: u64,
        sum: Option<u64>,
        block: u64,
    ) -> bool {
        let partial = len < block;
        if partial && self.unseen.is_none() && self.changed.get(b as usize) != Some(&seq) {
            return false;
        }
        self.staged.insert(b, (id, seq));
        if let Some(sum) = sum {
            self.sums.insert(b, sum);
        }
        self.tail = match partial {
            true => Some((b, len)),
            false => self.tail.filter(|(t, _)| *t != b),
        };
        true
    }

    /// A fresh id for block `block`, never used before by this stream.
    fn fresh_id(&mut self, block: u64) -> Vec<u8> {
        self.next_seq += 1;
        self.id(block, self.next_seq)
    }

    /// The id of block `block` staged at sequence number `seq`: as long as every other id
    /// simfs stages (`BLOCK_ID_LEN`).
    fn id(&self, block: u64, seq: u64) -> Vec<u8> {
        let id = format!("{:016x}{block:08x}{seq:016x}", self.nonce as u64).into_bytes();
        debug_assert_eq!(id.len(), crate::blob::upload::BLOCK_ID_LEN);
        id
    }
}

/// The streams of a mount's inodes being written.
pub(super) struct Streams {
    map: Mutex<HashMap<u64, Arc<Mutex<Stream>>>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Block size and the single-PUT bound, as the upload uses them.
    opts: UploadOptions,
    /// How long a writer must have written nothing before the rest is staged.
    pub(super) quiet: Option<std::time::Duration>,
}

impl Streams {
    pub(super) fn new(opts: &UploadOptions, quiet: Option<std::time::Duration>) -> Streams {
        Streams {
            map: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            opts: opts.clone(),
            quiet,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Mutex<Stream>>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ino`'s stream, made if it has none.
    pub(super) fn get(&self, ino: u64) -> Arc<Mutex<Stream>> {
        self.map()
            .entry(ino)
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(ino))))
            .clone()
    }

    /// `ino`'s stream, if any.
    pub(super) fn find(&self, ino: u64) -> Option<Arc<Mutex<Stream>>> {
        self.map().get(&ino).cloned()
    }

    fn take(&self, ino: u64) -> Option<Arc<Mutex<Stream>>> {
        self.map().remove(&ino)
    }

    /// Drops `ino`'s stream if it is still `stream`.
    pub(super) fn remove_if(&self, ino: u64, stream: &Arc<Mutex<Stream>>) {
        let mut map = self.map();
        if map.get(&ino).is_some_and(|s| Arc::ptr_eq(s, stream)) {
            map.remove(&ino);
        }
    }

    /// The block size and the single-PUT bound.
    pub(super) fn opts(&self) -> &UploadOptions {
        &self.opts
    }
}

pub(super) fn lock(s: &Mutex<Stream>) -> std::sync::MutexGuard<'_, Stream> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writeback {
    /// Bytes `off..off + len` of `ino`'s local copy changed (a write, or an allocation):
    /// blocks the writer has moved past are staged in the background.
    pub fn wrote_range(self: &Arc<Self>, ino: u64, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let block = self.streams.opts.block_size.max(1);
        let (first, last) = (off / block, (off + len - 1) / block);
        if last >= MAX_BLOCKS {
            // Larger than a block blob of this block size holds: uploaded whole at commit.
            self.streams.take(ino);
            return;
        }
        // A file that fits in one PUT needs no stream: none is made for it (pip's thousands
        // of small files), but one that exists keeps counting changes.
        let small = off + len <= self.streams.opts.single_put_max;
        // (Bound first: a guard in a match's scrutinee lives through the whole match.)
        let existing = self.streams.map().get(&ino).cloned();
        let stream = match existing {
            Some(s) => s,
            None if small => return,
            None => self.streams.get(ino),
        };
        let (ready, arm) = {
            let mut s = lock(&stream);
            s.touch(first, last);
            s.tail_overwritten(off, block);
            s.last_end = off + len;
            if let Some(u) = &mut s.unseen {
                // Written in place, so this is an allocation (`fallocate`): room laid out
                // for writes to come, not staged ahead (see `unseen.rs`).
                u.from = u.from.max((off + len) / block);
                return;
            }
            if s.closed || small {
                return;
            }
            // Blocks wholly below this write's first block are finished for a sequential
            // writer; one written since it was looked at is looked at again next time.
            let ready: Vec<u64> = (s.cursor.min(first)..first)
                .filter(|b| {
                    !s.staging.contains(b)
                        && s.staged
                            .get(b)
                            .is_none_or(|(_, seq)| *seq != s.changed[*b as usize])
                })
                .collect();
            s.staging.extend(&ready);
            s.cursor = first;
            let arm = self.streams.quiet.is_some() && !s.quiet_armed;
            s.quiet_armed |= arm;
            (ready, arm)
        };
        for b in ready {
            self.stage(ino, stream.clone(), b, false);
        }
        if arm {
            self.when_quiet(ino, stream);
        }
    }

    /// Once `stream`'s writer has written nothing for the quiet spell, stages the blocks it
    /// has not staged, the partial last one included (see the module's notes).
    fn when_quiet(self: &Arc<Self>, ino: u64, stream: Arc<Mutex<Stream>>) {
        let Some(quiet) = self.streams.quiet else {
            return;
        };
        let wb = self.clone();
        self.rt.spawn(async move {
            let mut seen = lock(&stream).touches;
            loop {
                tokio::time::sleep(quiet).await;
                let mut s = lock(&stream);
                if s.touches != seen && !s.closed && s.unseen.is_none() {
                    seen = s.touches;
                    continue;
                }
                s.quiet_armed = false;
                if s.closed || s.unseen.is_some() {
                    return;
                }
                drop(s);
                let Ok(size) = std::fs::metadata(wb.local.path(ino)).map(|m| m.len()) else {
                    return;
                };
                let ready = {
                    let mut s = lock(&stream);
                    if size != s.last_end {
                        return;
                    }
                    unstaged(&mut s, size, wb.streams.opts())
                };
                for (b, partial) in ready {
                    wb.stage(ino, stream.clone(), b, partial);
                }
                return;
            }
        });
    }

    /// `ino` was truncated to `size`: blocks from the one holding the new end on change.
    pub fn truncated(&self, ino: u64, size: u64) {
        let block = self.streams.opts.block_size.max(1);
        let Some(stream) = self.streams.map().get(&ino).cloned() else {
            return;
        };
        let mut s = lock(&stream);
        let from = size / block;
        let to = (s.changed.len() as u64).max(from + 1) - 1;
        s.touch(from, to);
        s.tail_overwritten(size, block);
        s.cursor = s.cursor.min(from);
        if let Some(u) = &mut s.unseen {
            // Their data is gone; a file growing again is staged again, and one extended
            // by the truncate is laid out for writes to come, not staged ahead.
            u.from = from;
            s.staged.retain(|b, _| *b < from);
        }
    }

    /// `ino` has no name left to stage for (unlinked): its stream stages nothing more.
    pub fn forget_stream(&self, ino: u64) {
        if let Some(s) = self.streams.take(ino) {
            lock(&s).closed = true;
        }
    }

    /// The last writer of `ino` closed it: a stream with no change since its last commit
    /// has nothing left to do (a file fsynced, then closed unchanged, is not uploaded
    /// again); one with changes serves the upload the close made due.
    pub(super) fn writers_done(&self, ino: u64) {
        // Unseen writes count no change: such a stream serves the commit the close made due.
        let idle = self.streams.map().get(&ino).is_some_and(|s| {
            let s = lock(s);
            s.touches == s.committed_touches
                && s.staging.is_empty()
                && !s.closed
                && s.unseen.is_none()
        });
        if idle {
            self.streams.take(ino);
        }
    }

    /// Stages block `b` (already counted in `staging`) on the runtime; a `partial` one may be
    /// shorter than a block (the file's last).
    pub(super) fn stage(
        self: &Arc<Self>,
        ino: u64,
        stream: Arc<Mutex<Stream>>,
        b: u64,
        partial: bool,
    ) {
        let wb = self.clone();
        self.rt.spawn(async move {
            let staged = wb.stage_one(ino, &stream, b, partial).await;
            let mut s = lock(&stream);
            s.staging.remove(&b);
            let whole = wb.streams.opts.block_size;
            match staged {
                Some((id, seq, len, sum)) => {
                    if s.staged_as(b, id, seq, len, Some(sum), whole) {
                        tracing::debug!("inode {ino}: block {b} staged ({len} bytes)");
                    } else {
                        tracing::debug!("inode {ino}: block {b} changed while staged in part");
                    }
                }
                None => tracing::debug!("inode {ino}: block {b} left for the commit"),
            }
        });
    }

    /// Stages block `b` of `ino` as it is now (`partial`: even if shorter than a block);
    /// its id, the sequence number it was read at, its length and the checksum of what it
    /// held.
    async fn stage_one(
        &self,
        ino: u64,
        stream: &Mutex<Stream>,
        b: u64,
        partial: bool,
    ) -> Option<(Vec<u8>, u64, u64, u64)> {
        let _permit = self.streams.in_flight.clone().acquire_owned().await.ok()?;
        // (Bound first: a guard in a match's scrutinee lives through the whole match.)
        let known = lock(stream).name.clone();
        let name = match known {
            Some(n) => n,
            None => {
                let n = self.anchor_of(ino).ok()??;
                lock(stream).name.get_or_insert(n).clone()
            }
        };
        let (id, seq) = {
            let mut s = lock(stream);
            if s.closed {
                return None;
            }
            match s.unseen.is_some() {
                // No change is counted: each staging gets an id of its own, so one that
                // lands late never passes for a later one.
                true => (s.fresh_id(b), 0),
                false => {
                    let seq = *s.changed.get(b as usize)?;
                    (s.id(b, seq), seq)
                }
            }
        };
        let block = self.streams.opts.block_size;
        let path = self.local.path(ino);
        let (data, sum) = tokio::task::spawn_blocking(move || {
            read_block(&path, b * block, block).map(|d| {
                let sum = crate::blob::upload::crc64(&d);
                (d, sum)
            })
        })
        .await
        .ok()?
        .ok()?;
        let len = data.len() as u64;
        if len != block && !(partial && len > 0) {
            return None;
        }
        self.store.stage_block(&name, &id, data).await.ok()?;
        Some((id, seq, len, sum))
    }

    /// The name `ino`'s data would be uploaded to now (None: it has no name).
    fn anchor_of(&self, ino: u64) -> super::WbResult<Option<String>> {
        match self.index.pending_inode(ino)? {
            Some(p) if !p.names.is_empty() => Ok(Some(self.anchor(&p)?.1)),
            _ => Ok(None),
        }
    }

    /// Uploads `ino`'s local copy at `path` as blob `name` using the blocks its stream staged
    /// there; None when there is no stream for that name (the caller uploads whole). With
    /// the ETag, the committed body's parts, when each one's checksum is known
    /// (`settled.rs`).
    pub(super) async fn commit_stream(
        &self,
        ino: u64,
        name: &str,
        path: &Path,
        meta: &Metadata,
        expect: &Expect,
    ) -> Option<Result<(String, Option<Parts>), crate::blob::upload::UploadError>> {
        let stream = self.streams.map().get(&ino).cloned()?;
        lock(&stream).closed = true;
        // Blocks being staged finish first (at most a few): their ids may be reused.
        while !lock(&stream).staging.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let result = self.commit_with(&stream, name, path, meta, expect).await;
        let mut s = lock(&stream);
        match &result {
            Some(Ok(_)) => {}
            // The blocks are not (or no longer) the service's for this name.
            _ => s.start_over(),
        }
        if self.pins.is_writing(ino) {
            s.closed = false;
        } else {
            drop(s);
            self.streams.take(ino);
        }
        result
    }

    /// Stages what `stream` lacks of the file at `path` and commits it as `name`; records
    /// the blocks committed for the next commit to name again.
    async fn commit_with(
        &self,
        stream: &Mutex<Stream>,
        name: &str,
        path: &Path,
        meta: &Metadata,
        expect: &Expect,
    ) -> Option<Result<(String, Option<Parts>), crate::blob::upload::UploadError>> {
        let block = self.streams.opts.block_size;
        let size = std::fs::metadata(path).ok()?.len();
        let count = size.div_ceil(block);
        if size <= self.streams.opts.single_put_max || count > MAX_BLOCKS {
            return None;
        }
        // Unseen writes: the staged blocks that still hold what they were staged with.
        let unchanged = self.unseen_unchanged(stream, path).await;
        let plan: Vec<Planned> = {
            let mut s = lock(stream);
            // Nothing staged yet: this commit stages every block, for the next to reuse
            // (a file rewritten here and there and fsynced, as databases do).
            if s.staged.is_empty() && s.staging.is_empty() {
                s.name = Some(name.to_owned());
            }
            if s.name.as_deref() != Some(name) {
                return None;
            }
            let touches = s.touches;
            s.committed_touches = touches;
            let mut plan = Vec::with_capacity(count as usize + 1);
            for b in 0..count {
                let seq = s.changed.get(b as usize).copied().unwrap_or(0);
                let (off, len) = (b * block, block.min(size - b * block));
                let staged = s.staged.get(&b).cloned();
                // Seen writes: whole blocks by their numbers, a partial prefix while no
                // write overlapped it (it goes otherwise). Unseen: by their checksums.
                let good = |at: u64| match &unchanged {
                    Some(u) => u.contains(&b),
                    None => at == seq,
                };
                match (staged, s.tail) {
                    (Some((id, _)), Some((t, l)))
                        if t == b
                            && l <= len
                            && unchanged.as_ref().is_none_or(|u| u.contains(&b)) =>
                    {
                        plan.push(Planned {
                            id,
                            done: true,
                            seq,
                            off,
                            len: l,
                        });
                        if l < len {
                            let id = s.fresh_id(b);
                            plan.push(Planned {
                                id,
                                done: false,
                                seq,
                                off: off + l,
                                len: len - l,
                            });
                        }
                    }
                    (Some((id, at)), tail)
                        if good(at) && len == block && tail.is_none_or(|(t, _)| t != b) =>
                    {
                        plan.push(Planned {
                            id,
                            done: true,
                            seq,
                            off,
                            len,
                        })
                    }
                    // A fresh id: never one a stale staging used.
                    _ => {
                        let id = s.fresh_id(b);
                        plan.push(Planned {
                            id,
                            done: false,
                            seq,
                            off,
                            len,
                        })
                    }
                }
            }
            plan
        };
        if plan.len() as u64 > MAX_BLOCKS {
            return None;
        }
        tracing::debug!(
            "{name}: committing {} blocks, {} of them staged ahead",
            plan.len(),
            plan.iter().filter(|p| p.done).count()
        );
        let result = self
            .stage_rest_and_commit(name, path, &plan, meta, expect)
            .await;
        let (etag, sums) = match result {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let mut s = lock(stream);
        // The committed body's parts: a block staged ahead has the checksum of the data it
        // was staged with (an unseen one was checked against it above), one staged here
        // that of the data just sent.
        let parts = plan
            .iter()
            .zip(&sums)
            .map(|(p, sent)| match sent {
                Some(sent) => Some(*sent),
                None => s.sums.get(&(p.off / block)).map(|sum| (p.len, *sum)),
            })
            .collect::<Option<Parts>>();
        // Whole blocks read at `seq` are the service's now under their ids; a write since
        // then changed the block's number, so it is staged again. The partial last block,
        // sent here in one part, is kept as a tail staged while quiet is: a look at a
        // writer still holding the file open (the quiet spell, the poll of a writer in
        // place) must not send it again, and the next commit starts its block with it
        // while no write reached into it.
        for (p, sent) in plan.into_iter().zip(sums) {
            let b = p.off / block;
            if p.len == block {
                let sum = sent.filter(|(len, _)| *len == block).map(|(_, sum)| sum);
                s.staged_as(b, p.id, p.seq, block, sum, block);
            } else if let Some((len, sum)) = sent.filter(|_| p.off % block == 0) {
                if p.off + len == size {
                    s.staged_as(b, p.id, p.seq, len, Some(sum), block);
                }
            }
        }
        Some(Ok((etag, parts)))
    }

    async fn stage_rest_and_commit(
        &self,
        name: &str,
        path: &Path,
        plan: &[Planned],
        meta: &Metadata,
        expect: &Expect,
    ) -> Result<(String, Vec<Option<(u64, u64)>>), crate::blob::upload::UploadError> {
        use futures::{StreamExt, TryStreamExt};
        let file = crate::blob::upload::open_local_copy(path)?;
        let file = &file;
        // The checksum of each part staged here, as sent: for the next commit to check a
        // whole block against once writes are no longer seen, and for `settled.rs`.
        // Unordered, so a slow block holds up no other; each sum is put back in its place.
        let staged = futures::stream::iter(plan.iter().enumerate().filter(|(_, p)| !p.done).map(
            |(i, p)| async move {
                let data = crate::blob::upload::read_local(file, p.off, p.len)?;
                let sent = (data.len() as u64, crate::blob::upload::crc64(&data));
                self.store.stage_block(name, &p.id, data).await?;
                Ok::<_, crate::blob::upload::UploadError>((i, sent))
            },
        ))
        .buffer_unordered(self.streams.opts.parallel.max(1))
        .try_collect::<Vec<_>>()
        .await?;
        let mut sums = vec![None; plan.len()];
        for (i, sent) in staged {
            sums[i] = Some(sent);
        }
        let ids: Vec<Vec<u8>> = plan.iter().map(|p| p.id.clone()).collect();
        let etag = self.store.commit_blocks(name, &ids, meta, expect).await?;
        Ok((etag, sums))
    }
}

/// The blocks of a file of `size` bytes that `s` has not staged as they are now, marked as
/// staging; each with whether it is the partial last block. That one is left out while
/// shorter than a quarter block, or than twice what was staged of it before.
fn unstaged(s: &mut Stream, size: u64, opts: &UploadOptions) -> Vec<(u64, bool)> {
    let block = opts.block_size.max(1);
    let count = size.div_ceil(block);
    if size <= opts.single_put_max || count > MAX_BLOCKS {
        return Vec::new();
    }
    let ready: Vec<(u64, bool)> = (s.cursor.min(count)..count)
        .filter(|b| !s.staging.contains(b))
        .filter(|b| {
            let seq = s.changed.get(*b as usize).copied().unwrap_or(0);
            s.staged.get(b).is_none_or(|(_, at)| *at != seq)
        })
        .map(|b| (b, (b + 1) * block > size))
        .filter(|&(b, partial)| !partial || tail_worth_staging(s, b, size - b * block, block))
        .collect();
    s.staging.extend(ready.iter().map(|(b, _)| *b));
    ready
}

/// Whether `len` bytes of partial block `b` are worth staging while the writer is quiet: a
/// quarter block at least, and twice what was staged of it before.
pub(super) fn tail_worth_staging(s: &Stream, b: u64, len: u64, block: u64) -> bool {
    let before = s.tail.filter(|(t, _)| *t == b).map_or(0, |(_, l)| l);
    len >= block / 4 && len >= 2 * before
}

fn read_block(path: &Path, off: u64, len: u64) -> std::io::Result<Bytes> {
    use crate::blob::upload::{open_local_copy, read_local};
    read_local(&open_local_copy(path)?, off, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_block_ids_are_as_long_as_every_other_upload_s() {
        let s = Stream {
            nonce: u128::MAX,
            ..Default::default()
        };
        for (b, seq) in [(0, 0), (MAX_BLOCKS - 1, u64::MAX)] {
            assert_eq!(s.id(b, seq).len(), crate::blob::upload::BLOCK_ID_LEN);
        }
        assert_ne!(s.id(1, 2), s.id(2, 1));
    }
}
