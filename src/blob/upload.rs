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
use std::os::unix::fs::FileExt;
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

fn read_range(file: &File, offset: u64, len: u64) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf.into())
}

/// Uploads `path` as blob `name`; returns the committed ETag.
pub async fn upload_file(
    store: &dyn BlobStore,
    name: &str,
    path: &Path,
    metadata: &Metadata,
    expect: &Expect,
    opts: &UploadOptions,
) -> Result<String, UploadError> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if size <= opts.single_put_max {
        let data = read_range(&file, 0, size)?;
        return Ok(store.put(name, data, metadata, expect).await?);
    }
    // A block blob holds at most 50,000 blocks: very large files get larger blocks.
    let block = opts.block_size.max(size.div_ceil(50_000)).max(1);
    let count = size.div_ceil(block);
    // Equal-length ids, unique per upload so a concurrent or abandoned upload's blocks never
    // mix with ours.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let ids: Vec<Vec<u8>> = (0..count)
        .map(|i| format!("{nonce:032x}{i:08x}").into_bytes())
        .collect();
    debug_assert!(ids.iter().all(|id| id.len() == BLOCK_ID_LEN));
    let file = &file;
    futures::stream::iter(ids.iter().enumerate().map(|(i, id)| async move {
        let off = i as u64 * block;
        let data = read_range(file, off, block.min(size - off))?;
        store.stage_block(name, id, data).await?;
        Ok::<_, UploadError>(())
    }))
    .buffer_unordered(opts.parallel.max(1))
    .try_collect::<Vec<_>>()
    .await?;
    Ok(store.commit_blocks(name, &ids, metadata, expect).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::memory::MemoryStore;

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
        rt.block_on(upload_file(
            &store,
            "a/f",
            &path,
            &meta,
            &Expect::Absent,
            &opts,
        ))
        .unwrap();
        assert_eq!(store.data("a/f").unwrap(), data);
        // A second upload expecting "absent" is refused: the blob exists now.
        let again = rt.block_on(upload_file(
            &store,
            "a/f",
            &path,
            &meta,
            &Expect::Absent,
            &opts,
        ));
        assert!(matches!(
            again,
            Err(UploadError::Blob(BlobError::Changed(_)))
        ));
    }
}
