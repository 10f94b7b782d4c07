//! An in-memory container with Azure's listing semantics (name order, prefix, `startFrom`,
//! opaque markers, page size) and its write preconditions (If-Match, If-None-Match), used by
//! unit tests and benchmarks in place of the service.

use super::{
    BlobError, BlobProps, BlobResult, BlobStore, Expect, ListPage, ListQuery, Metadata, ReadError,
    Sink,
};
use super::{Checksum, Got};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

#[derive(Clone)]
struct Stored {
    props: BlobProps,
    data: Bytes,
    /// The committed block list of a blob made by `commit_blocks` (empty otherwise): as
    /// on the service, a later list may name these again.
    blocks: HashMap<Vec<u8>, Bytes>,
}

pub struct MemoryStore {
    blobs: RwLock<BTreeMap<String, Stored>>,
    page_size: usize,
    etag_counter: std::sync::atomic::AtomicU64,
    staged: Mutex<HashMap<(String, Vec<u8>), Bytes>>,
    /// As Azurite: a name with staged blocks but no committed blob refuses Put Blob's
    /// `If-None-Match: *` (Put Block List's still sees no blob there).
    staged_refuse_put: std::sync::atomic::AtomicBool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_page_size(5000)
    }

    /// From now on, as Azurite: a name with staged blocks but no committed blob refuses a
    /// Put Blob that expects no blob there.
    pub fn staged_blocks_refuse_put_blob(&self) {
        self.staged_refuse_put
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A store whose listing pages hold at most `page_size` blobs (small pages exercise paging).
    pub fn with_page_size(page_size: usize) -> Self {
        MemoryStore {
            blobs: RwLock::new(BTreeMap::new()),
            page_size: page_size.max(1),
            etag_counter: Default::default(),
            staged: Default::default(),
            staged_refuse_put: Default::default(),
        }
    }

    /// Stores `data` at `name` and returns the new ETag (the service's side of every write).
    fn store(&self, name: &str, data: Bytes, metadata: Metadata) -> String {
        self.store_blocks(name, data, metadata, HashMap::new())
    }

    /// The committed block list of `name`, by id (empty for a blob put whole or absent).
    fn committed_blocks(&self, name: &str) -> HashMap<Vec<u8>, Bytes> {
        self.blobs
            .read()
            .unwrap()
            .get(name)
            .map(|b| b.blocks.clone())
            .unwrap_or_default()
    }

    fn store_blocks(
        &self,
        name: &str,
        data: Bytes,
        metadata: Metadata,
        blocks: HashMap<Vec<u8>, Bytes>,
    ) -> String {
        let n = self
            .etag_counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let props = BlobProps {
            name: name.to_string(),
            size: data.len() as u64,
            etag: format!("\"0x{n:016X}\""),
            last_modified: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            content_md5: Some(md5_of(&data)),
            metadata,
        };
        let etag = props.etag.clone();
        self.blobs.write().unwrap().insert(
            name.to_string(),
            Stored {
                props,
                data,
                blocks,
            },
        );
        etag
    }

    fn check(&self, name: &str, expect: &Expect) -> BlobResult<()> {
        let blobs = self.blobs.read().unwrap();
        let ok = match (expect, blobs.get(name)) {
            (Expect::Absent, None) => true,
            (Expect::Etag(e), Some(s)) => &s.props.etag == e,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(BlobError::Changed(format!("{name}: expected {expect:?}")))
        }
    }

    /// The content of `name`, if it exists.
    pub fn data(&self, name: &str) -> Option<Bytes> {
        self.blobs.read().unwrap().get(name).map(|s| s.data.clone())
    }

    /// The ETag of `name`, if it exists.
    pub fn etag(&self, name: &str) -> Option<String> {
        self.blobs
            .read()
            .unwrap()
            .get(name)
            .map(|s| s.props.etag.clone())
    }

    /// Every blob name in order.
    pub fn names(&self) -> Vec<String> {
        self.blobs.read().unwrap().keys().cloned().collect()
    }

    /// Stores `data` at `name` with `metadata`, replacing any blob there, with a fresh ETag.
    pub fn put(&self, name: &str, data: impl Into<Bytes>, metadata: &[(&str, &str)]) {
        self.store(
            name,
            data.into(),
            super::normalize_metadata(metadata.iter().map(|(k, v)| (*k, *v))),
        );
    }

    /// Deletes `name` whatever its ETag (another client's delete); whether it was there.
    pub fn remove(&self, name: &str) -> bool {
        self.blobs.write().unwrap().remove(name).is_some()
    }

    /// Overrides the stored Content-MD5 (tests of verification use a wrong one).
    pub fn set_content_md5(&self, name: &str, md5: Option<Vec<u8>>) {
        if let Some(s) = self.blobs.write().unwrap().get_mut(name) {
            s.props.content_md5 = md5;
        }
    }
}

/// The size of the pieces `read_range` hands on.
pub const PIECE: usize = 64 << 10;

pub fn md5_of(data: &[u8]) -> Vec<u8> {
    use md5::{Digest, Md5};
    Md5::digest(data).to_vec()
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn list(&self, q: &ListQuery) -> BlobResult<ListPage> {
        let blobs = self.blobs.read().unwrap();
        let mut lower = q.prefix.clone();
        if let Some(s) = &q.start_from {
            if *s > lower {
                lower = s.clone();
            }
        }
        let max = q
            .max_results
            .map(|m| m as usize)
            .unwrap_or(self.page_size)
            .min(self.page_size);
        let mut page = ListPage::default();
        // A page starts after the marker (like the service: a seek, not a scan from the
        // start of the prefix, which made long listings quadratic here).
        use std::ops::Bound;
        let from = match &q.marker {
            Some(m) if *m >= lower => Bound::Excluded(m.clone()),
            _ => Bound::Included(lower),
        };
        let iter = blobs
            .range((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(&q.prefix));
        for (name, stored) in iter {
            if page.blobs.len() == max {
                page.next_marker = page.blobs.last().map(|b| b.name.clone());
                break;
            }
            page.blobs.push(BlobProps {
                name: name.clone(),
                ..stored.props.clone()
            });
        }
        Ok(page)
    }

    async fn head(&self, name: &str) -> BlobResult<BlobProps> {
        self.blobs
            .read()
            .unwrap()
            .get(name)
            .map(|s| s.props.clone())
            .ok_or_else(|| BlobError::NotFound(name.to_string()))
    }

    async fn get_range(&self, name: &str, range: Range<u64>, etag: &str) -> BlobResult<Bytes> {
        let blobs = self.blobs.read().unwrap();
        let s = blobs
            .get(name)
            .ok_or_else(|| BlobError::NotFound(name.to_string()))?;
        if s.props.etag != etag {
            return Err(BlobError::Changed(name.to_string()));
        }
        let end = range.end.min(s.data.len() as u64) as usize;
        let start = (range.start as usize).min(end);
        Ok(s.data.slice(start..end))
    }

    /// In pieces of `PIECE` bytes, as an HTTP client hands on the frames of an answer; a
    /// checksum asked for comes with ranges of at most 4 MiB, as from the service.
    async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &str,
        want: Option<Checksum>,
        sink: &mut Sink<'_>,
    ) -> Result<Got, ReadError> {
        let data = self.get_range(name, range.clone(), etag).await?;
        let mut at = 0;
        while at < data.len() {
            let end = (at + PIECE).min(data.len());
            sink(at as u64, data.slice(at..end)).map_err(ReadError::Sink)?;
            at = end;
        }
        let sum = want
            .filter(|_| range.end - range.start <= 4 << 20)
            .map(|w| crate::cache::verify::sum_of(w, &data));
        Ok(Got {
            bytes: data.len() as u64,
            sum,
        })
    }

    async fn check_access(&self) -> BlobResult<()> {
        Ok(())
    }

    async fn put(
        &self,
        name: &str,
        data: Bytes,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        self.check(name, expect)?;
        if matches!(expect, Expect::Absent)
            && self
                .staged_refuse_put
                .load(std::sync::atomic::Ordering::Relaxed)
            && self.staged.lock().unwrap().keys().any(|(n, _)| n == name)
        {
            return Err(BlobError::Changed(format!(
                "{name}: BlobAlreadyExists (staged blocks)"
            )));
        }
        Ok(self.store(name, data, metadata.clone()))
    }

    async fn stage_block(&self, name: &str, id: &[u8], data: Bytes) -> BlobResult<()> {
        let mut staged = self.staged.lock().unwrap();
        // As the service: the blocks staged on one blob must all have ids of one length.
        if staged
            .keys()
            .any(|(n, other)| n == name && other.len() != id.len())
        {
            return Err(BlobError::Service(format!(
                "stage block of {name:?}: HTTP 400 InvalidBlobOrBlock"
            )));
        }
        staged.insert((name.to_string(), id.to_vec()), data);
        Ok(())
    }

    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[Vec<u8>],
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        self.check(name, expect)?;
        let mut staged = self.staged.lock().unwrap();
        let committed = self.committed_blocks(name);
        let mut data = Vec::new();
        let mut blocks = HashMap::new();
        for id in ids {
            // "Latest": an uncommitted block of that id, else a committed one.
            let block = staged
                .get(&(name.to_string(), id.clone()))
                .or_else(|| committed.get(id))
                .ok_or_else(|| BlobError::Service(format!("{name}: HTTP 400 InvalidBlockList")))?;
            data.extend_from_slice(block);
            blocks.insert(id.clone(), block.clone());
        }
        staged.retain(|(n, _), _| n != name);
        drop(staged);
        Ok(self.store_blocks(name, data.into(), metadata.clone(), blocks))
    }

    async fn set_metadata(
        &self,
        name: &str,
        metadata: &Metadata,
        etag: &str,
    ) -> BlobResult<String> {
        self.check(name, &Expect::Etag(etag.to_string()))?;
        // New metadata keeps the data and the committed block list.
        let blocks = self.committed_blocks(name);
        let data = self.data(name).unwrap_or_default();
        Ok(self.store_blocks(name, data, metadata.clone(), blocks))
    }

    async fn copy(
        &self,
        from: &str,
        from_etag: &str,
        to: &str,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        self.check(from, &Expect::Etag(from_etag.to_string()))?;
        self.check(to, expect)?;
        let data = self.data(from).unwrap_or_default();
        Ok(self.store(to, data, metadata.clone()))
    }

    async fn delete(&self, name: &str, etag: &str) -> BlobResult<()> {
        let mut blobs = self.blobs.write().unwrap();
        match blobs.get(name) {
            None => Err(BlobError::NotFound(name.to_string())),
            Some(s) if s.props.etag != etag => Err(BlobError::Changed(name.into())),
            Some(_) => {
                blobs.remove(name);
                Ok(())
            }
        }
    }
}
