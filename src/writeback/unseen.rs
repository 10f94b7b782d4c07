//! Streams of files written in place, whose writes simfs never sees.
//!
//! A writer in place (`fs::in_place`: FUSE passthrough) writes the local copy through the
//! kernel with no WRITE request, so no change is counted per block (`stream.rs`). Its
//! checkpoint is streamed all the same, by looking instead of being told:
//!
//! - every `POLL` the file's length is looked at, and the whole blocks it has grown into
//!   since the writers in place opened it (or since a truncate below them) are staged, each
//!   once, with the CRC64 of what it held. A file laid out first and then overwritten (fio,
//!   databases: `fallocate` or `ftruncate`, then writes) does not grow by writes, so nothing
//!   of it is staged ahead: its blocks would be staged before they were written (a
//!   truncate or an allocation moves the first block that may be staged to its end);
//! - once the length has stayed the same for the quiet spell (`WritebackOptions::quiet`),
//!   the partial last block is staged too, with its own length and CRC64 (`stream.rs`);
//! - the commit reads every staged block again and reuses it only where its checksum still
//!   matches, so a block rewritten after it was staged is staged again, and the committed
//!   blob is the file as the commit read it. That costs a local read of what was staged
//!   (page cache or disk speed), and no block goes up twice unless it changed;
//! - each look hands the file's growth to `grew` (the cache makes room for it, evicting
//!   clean copies: the kernel's writes never ask simfs for room);
//! - a stream that was fed by seen writes (a checkpoint written through simfs, then opened
//!   read-write in place to be fsynced) keeps its staged blocks: every staged block's CRC64
//!   is kept from its staging on, so the commit checks those like the rest;
//! - the poll ends with the last writer in place, or when the stream goes (its commit once
//!   no one writes, an unlink); a poll restarted for a new writer ends any older one.

use super::stream::{lock, tail_worth_staging, Stream, MAX_BLOCKS};
use super::Writeback;
use crate::blob::upload::{open_local_copy, range_has};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a file written in place is looked at.
const POLL: Duration = Duration::from_millis(50);

/// Told how many bytes a file written in place grew by since the last look.
pub type Grew = Arc<dyn Fn(u64) + Send + Sync>;

/// What a stream of unseen writes keeps besides the staged blocks.
#[derive(Default)]
pub(super) struct Unseen {
    /// Blocks before this one were there when the writers in place opened the file: they
    /// are not staged ahead (they may be rewritten in place, and nothing would tell).
    pub(super) from: u64,
    /// The poll that may run; bumped to end it.
    poll: u64,
    /// Whether writers in place have the file open (a poll runs).
    polling: bool,
}

impl Writeback {
    /// `ino`'s local copy, `size` bytes now, is written in place from now on: its stream
    /// becomes one of unseen writes (or one is made), and the poll runs, telling `grew` how
    /// the file grows. Blocks a stream staged before keep serving the commit, checked like
    /// the rest: a checkpoint saved, closed and opened again read-write to be fsynced (the
    /// README's recipe) still pays only its tail.
    pub fn write_unseen(self: &Arc<Self>, ino: u64, size: u64, grew: Grew) {
        let block = self.streams.opts().block_size.max(1);
        let stream = self.streams.get(ino);
        let poll = {
            let mut s = lock(&stream);
            let u = s.unseen.get_or_insert_with(|| Unseen {
                from: size / block,
                ..Default::default()
            });
            if u.polling {
                return;
            }
            u.polling = true;
            u.poll += 1;
            u.poll
        };
        self.poll_unseen(ino, stream, poll, size, grew);
    }

    /// Whether writers in place have `ino` open.
    pub(super) fn written_in_place(&self, ino: u64) -> bool {
        self.streams
            .find(ino)
            .is_some_and(|s| lock(&s).unseen.as_ref().is_some_and(|u| u.polling))
    }

    /// The last writer in place of `ino` is done: the poll ends, and the commit its close
    /// made due stages what is left. A stream that staged nothing has nothing to offer that
    /// commit, and goes.
    pub fn unseen_done(&self, ino: u64) {
        let Some(stream) = self.streams.find(ino) else {
            return;
        };
        let mut s = lock(&stream);
        let Some(u) = &mut s.unseen else {
            return;
        };
        u.polling = false;
        u.poll += 1;
        if s.staged.is_empty() && s.staging.is_empty() {
            drop(s);
            self.streams.remove_if(ino, &stream);
        }
    }

    /// Stages the blocks `ino` grows into from `size` bytes, every `POLL`, while poll number
    /// `poll` of `stream` is the one that may run.
    fn poll_unseen(
        self: &Arc<Self>,
        ino: u64,
        stream: Arc<Mutex<Stream>>,
        poll: u64,
        mut size: u64,
        grew: Grew,
    ) {
        let wb = self.clone();
        let path = self.local.path(ino);
        let opts = self.streams.opts().clone();
        let block = opts.block_size.max(1);
        let quiet = self.streams.quiet;
        self.rt.spawn(async move {
            // How long the length has stayed the same: the writer may have gone quiet.
            let mut still = Duration::ZERO;
            loop {
                tokio::time::sleep(POLL).await;
                if !wb
                    .streams
                    .find(ino)
                    .is_some_and(|s| Arc::ptr_eq(&s, &stream))
                {
                    break;
                }
                let Ok(now) = std::fs::metadata(&path).map(|m| m.len()) else {
                    continue;
                };
                if now > size {
                    let grew = grew.clone();
                    let _ = tokio::task::spawn_blocking(move || grew(now - size)).await;
                }
                still = if now == size {
                    still + POLL
                } else {
                    Duration::ZERO
                };
                size = now;
                let ready: Vec<(u64, bool)> = {
                    let mut s = lock(&stream);
                    let from = match &s.unseen {
                        Some(u) if u.poll == poll => u.from,
                        _ => break,
                    };
                    if s.closed || size <= opts.single_put_max {
                        continue;
                    }
                    let end = (size / block).min(MAX_BLOCKS);
                    // (A block staged partial while the writer paused is not whole yet.)
                    let whole =
                        |b: &u64| s.staged.contains_key(b) && s.tail.is_none_or(|(t, _)| t != *b);
                    let mut ready: Vec<(u64, bool)> = (s.cursor.max(from)..end)
                        .filter(|b| !s.staging.contains(b) && !whole(b))
                        .map(|b| (b, false))
                        .collect();
                    // Quiet: the partial last block too (the commit checks its checksum).
                    let (last, len) = (size / block, size % block);
                    if quiet.is_some_and(|q| still >= q)
                        && len > 0
                        && last >= from
                        && last < MAX_BLOCKS
                        && !s.staging.contains(&last)
                        && s.tail != Some((last, len))
                        && tail_worth_staging(&s, last, len, block)
                    {
                        ready.push((last, true));
                    }
                    s.staging.extend(ready.iter().map(|(b, _)| *b));
                    s.cursor = s.cursor.max(end);
                    ready
                };
                for (b, partial) in ready {
                    wb.stage(ino, stream.clone(), b, partial);
                }
            }
        });
    }

    /// For a stream of unseen writes, its staged blocks whose data at `path` still has the
    /// checksum it was staged with (None: the stream's writes are seen and counted).
    pub(super) async fn unseen_unchanged(
        &self,
        stream: &Mutex<Stream>,
        path: &Path,
    ) -> Option<HashSet<u64>> {
        let block = self.streams.opts().block_size;
        // Each staged block with its checksum and length (the partial last one's is its own).
        let sums: Vec<(u64, u64, u64)> = {
            let s = lock(stream);
            s.unseen.as_ref()?;
            s.staged
                .keys()
                .filter_map(|b| {
                    let len = s.tail.filter(|(t, _)| t == b).map_or(block, |(_, l)| l);
                    s.sums.get(b).map(|sum| (*b, *sum, len))
                })
                .collect()
        };
        let path = path.to_owned();
        let unchanged = tokio::task::spawn_blocking(move || {
            // One open for all of them (a large checkpoint has thousands staged).
            let Ok(file) = open_local_copy(&path) else {
                return HashSet::new();
            };
            sums.into_iter()
                .filter(|(b, want, len)| range_has(&file, b * block, *len, *want))
                .map(|(b, _, _)| b)
                .collect()
        });
        Some(unchanged.await.unwrap_or_default())
    }
}
