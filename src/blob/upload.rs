//! Uploading a local file as one block blob.
//!
//! Small files go up in one PUT. Larger ones are cut into fixed-size blocks staged in
//! parallel (read with `pread`, so memory stays at `parallel` blocks) and committed in one
//! request that also carries the metadata and the precondition: the blob changes atomically
//! from the old version to the new one, and a crash before the commit leaves the old version
//! whole (staged blocks expire on their own).

use super::{BlobError, BlobStore, Expect, Metadata};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use std::fs::File;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Files up to this size go up in a single PUT.
    pub single_put_max: u64,
    pub block_size: u64,
    /// Blocks in flight at once.
    pub parallel: usize,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            single_put_max: 8 << 20,
            block_size: 8 << 20,
            parallel: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("reading the local copy: {0}")]
    Local(#[from] std::io::Error),
}

impl UploadError {
    /// The blob is not the version the upload expected.
    pub fn is_changed(&self) -> bool {
        matches!(self, UploadError::Blob(e) if e.is_changed())
    }
}

/// The length of every block id simfs stages: the service refuses a block whose id length
/// differs from that of blocks already staged (uncommitted) on the same blob, so an upload
/// cut short by a crash would otherwise block the next one with another id scheme until the
/// service drops the leftovers, a week later.
pub const BLOCK_ID_LEN: usize = 40;

/// Opens a local copy to read it back for an upload. Readahead is off: what an upload reads
/// was just written and is in the page cache, while readahead would go on past it into a
/// region the writer reserved (fio's fallocate) and not yet written, and fill zeroed pages
/// for it (a quarter of the daemon's CPU while fio wrote 1 GiB, perf).
pub fn open_local_copy(path: &Path) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    // SAFETY: a plain advice call on a descriptor this function owns.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    Ok(file)
}

/// Up to `len` bytes of a local copy at `offset`, fewer where the file ends.
pub fn read_local(file: &File, offset: u64, len: u64) -> std::io::Result<Bytes> {
    Ok(crate::cache::pread_vec(file, len as usize, offset)?.into())
}

/// Whether `len` bytes of a local copy at `offset` are there and have CRC64 `sum`.
pub fn range_has(file: &File, offset: u64, len: u64, sum: u64) -> bool {
    read_local(file, offset, len).is_ok_and(|d| d.len() as u64 == len && crc64(&d) == sum)
}

fn read_range(file: &File, offset: u64, len: u64) -> std::io::Result<Bytes> {
    let data = read_local(file, offset, len)?;
    if (data.len() as u64) < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(data)
}

/// Uploads `path` as blob `name`; returns the committed ETag, and the length and CRC64 of
/// each part of the body it committed, in order (the one PUT, or each block).
pub async fn upload_file(
    store: &dyn BlobStore,
    name: &str,
    path: &Path,
    metadata: &Metadata,
    expect: &Expect,
    opts: &UploadOptions,
) -> Result<(String, Vec<(u64, u64)>), UploadError> {
    let file = open_local_copy(path)?;
    let size = file.metadata()?.len();
    if size <= opts.single_put_max {
        let data = read_range(&file, 0, size)?;
        let sum = (size, crc64(&data));
        let etag = match store.put(name, data.clone(), metadata, expect).await {
            Err(BlobError::Changed(_)) if only_staged_blocks(store, name, expect).await => {
                let ids = block_ids(u64::from(size > 0));
                for id in &ids {
                    store.stage_block(name, id, data.clone()).await?;
                }
                store.commit_blocks(name, &ids, metadata, expect).await?
            }
            r => r?,
        };
        return Ok((etag, vec![sum]));
    }
    // A block blob holds at most 50,000 blocks: very large files get larger blocks.
    let block = opts.block_size.max(size.div_ceil(50_000)).max(1);
    let ids = block_ids(size.div_ceil(block));
    let file = &file;
    // Unordered, so a slow block holds up no other; each part is put back in its place.
    let mut parts = futures::stream::iter(ids.iter().enumerate().map(|(i, id)| async move {
        let off = i as u64 * block;
        let data = read_range(file, off, block.min(size - off))?;
        let sum = (data.len() as u64, crc64(&data));
        store.stage_block(name, id, data).await?;
        Ok::<_, UploadError>((i, sum))
    }))
    .buffer_unordered(opts.parallel.max(1))
    .try_collect::<Vec<_>>()
    .await?;
    parts.sort_unstable_by_key(|(i, _)| *i);
    let parts = parts.into_iter().map(|(_, sum)| sum).collect();
    Ok((
        store.commit_blocks(name, &ids, metadata, expect).await?,
        parts,
    ))
}

/// Whether a create (`expect`ing no blob) was refused at `name` while no blob is committed
/// there: the name holds only staged blocks (an earlier, longer version of the file, streamed
/// while it was written and then truncated; or someone else's upload in progress). Azurite
/// counts those as a blob for Put Blob's `If-None-Match: *`, though not for Put Block
/// List's, so the body goes up as one block committed under the same precondition.
async fn only_staged_blocks(store: &dyn BlobStore, name: &str, expect: &Expect) -> bool {
    matches!(expect, Expect::Absent)
        && matches!(store.head(name).await, Err(BlobError::NotFound(_)))
}

/// Ids for `count` blocks: of equal length, unique per upload so a concurrent or abandoned
/// upload's blocks never mix with ours.
fn block_ids(count: u64) -> Vec<Vec<u8>> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let ids: Vec<Vec<u8>> = (0..count)
        .map(|i| format!("{nonce:032x}{i:08x}").into_bytes())
        .collect();
    debug_assert!(ids.iter().all(|id| id.len() == BLOCK_ID_LEN));
    ids
}

/// The CRC64 (NVMe polynomial, as `x-ms-content-crc64`) of `data`.
pub fn crc64(data: &[u8]) -> u64 {
    let mut d = crc64fast_nvme::Digest::new();
    d.write(data);
    d.sum64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::memory::MemoryStore;

    /// How many of the pages of `file` in `range` are in the page cache (mincore).
    fn resident(file: &File, range: std::ops::Range<usize>) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        let len = range.end - range.start;
        // SAFETY: a read-only shared mapping of a file this test owns, unmapped below;
        // mincore writes one byte per page into a vector of that many bytes.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                range.start as libc::off_t,
            );
            assert_ne!(at, libc::MAP_FAILED);
            let mut pages = vec![0u8; len / page];
            assert_eq!(libc::mincore(at, len, pages.as_mut_ptr()), 0);
            libc::munmap(at, len);
            pages.iter().filter(|p| *p & 1 == 1).count()
        }
    }

    #[tokio::test]
    async fn a_small_file_is_created_where_only_staged_blocks_are_and_not_over_a_committed_blob() {
        let store = MemoryStore::new();
        store.staged_blocks_refuse_put_blob();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        std::fs::write(&path, b"the file, truncated and written again").unwrap();
        // Blocks of a longer version, staged while it was written, never committed.
        let old_id = format!("{:040x}", 7).into_bytes();
        store
            .stage_block("ckpt.pt", &old_id, Bytes::from(vec![1u8; 100]))
            .await
            .unwrap();
        let opts = UploadOptions::default();
        let meta = Metadata::new();
        let (etag, parts) = upload_file(&store, "ckpt.pt", &path, &meta, &Expect::Absent, &opts)
            .await
            .unwrap();
        let data = store.data("ckpt.pt").expect("committed");
        assert_eq!(&data[..], b"the file, truncated and written again");
        assert_eq!(store.etag("ckpt.pt"), Some(etag));
        assert_eq!(parts, vec![(37, crc64(&data))]);
        // A committed blob there is someone else's: still refused.
        let err = upload_file(&store, "ckpt.pt", &path, &meta, &Expect::Absent, &opts)
            .await
            .unwrap_err();
        assert!(
            err.is_changed(),
            "a committed blob is not overwritten: {err}"
        );
    }

    #[test]
    fn reading_a_local_copy_back_fills_no_pages_past_what_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1 << 20;
        let fresh = |name: &str| {
            // Reserved and not yet written, as fio leaves a file it lays out.
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_len(64 * mib as u64).unwrap();
            dir.path().join(name)
        };
        let plain = File::open(fresh("plain")).unwrap();
        read_local(&plain, 0, mib as u64).unwrap();
        assert!(
            resident(&plain, mib..4 * mib) > 0,
            "the control: a plain open reads ahead on this kernel"
        );
        let copy = open_local_copy(&fresh("copy")).unwrap();
        let data = read_local(&copy, 0, mib as u64).unwrap();
        assert_eq!(data.len(), mib);
        assert_eq!(resident(&copy, 0..mib), mib / 4096, "what was read");
        assert_eq!(resident(&copy, mib..4 * mib), 0, "nothing past it");
    }

    #[test]
    fn large_file_is_committed_from_blocks_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let store = MemoryStore::new();
        let opts = UploadOptions {
            single_put_max: 1000,
            block_size: 7000,
            parallel: 3,
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let meta = Metadata::from([("permissions".to_string(), "0644".to_string())]);
        let up = |name: &str, opts: &UploadOptions| {
            rt.block_on(upload_file(
                &store,
                name,
                &path,
                &meta,
                &Expect::Absent,
                opts,
            ))
        };
        let (_, parts) = up("a/f", &opts).unwrap();
        assert_eq!(store.data("a/f").unwrap(), data);
        let blocks: Vec<(u64, u64)> = data
            .chunks(7000)
            .map(|b| (b.len() as u64, crc64(b)))
            .collect();
        assert_eq!(parts, blocks, "an upload in blocks reports each block");
        let (_, parts) = up("a/g", &UploadOptions::default()).unwrap();
        assert_eq!(
            parts,
            vec![(100_000, crc64(&data))],
            "one PUT reports its body"
        );
        // A second upload expecting "absent" is refused: the blob exists now.
        let again = up("a/f", &opts);
        assert!(matches!(
            again,
            Err(UploadError::Blob(BlobError::Changed(_)))
        ));
    }
}
