//! Index snapshots in the container: one node lists, a fleet downloads.
//!
//! `publish` lists the container into a fresh index (no local state can leak into it),
//! compresses it with gzip and uploads it as one block blob, `SNAPSHOT` under the mount's
//! prefix, with metadata naming the index schema and the prefix it describes. The upload is
//! conditional on the ETag the previous snapshot had when the publish began, so of two
//! publishers racing, one commits and the other fails cleanly: a reader only ever sees a whole
//! snapshot. The reserved prefix `.simfs/` is hidden from every mount (`is_reserved`).
//!
//! `fetch` downloads the newest snapshot for a mount that has no index yet and installs it
//! as the index, after checking its schema and prefix; anything else (no snapshot, another
//! simfs version, another prefix, a damaged file) is refused with a message and the caller
//! lists the container instead. A snapshot is as old as its publish: the mount's refresh
//! brings it up to date.

use super::ingest::{build_index, no_progress, IngestError, IngestOptions};
use super::{Index, IndexError, SourceId, SCHEMA_VERSION};
use crate::blob::upload::{upload_file, UploadError, UploadOptions};
use crate::blob::{BlobError, BlobStore, Expect, Metadata};
use futures::StreamExt;
use rusqlite::Connection;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

/// Where the snapshot of a prefix's index lives, below that prefix.
pub const SNAPSHOT: &str = ".simfs/index/snapshot.db.gz";

const KEY_SCHEMA: &str = "simfs_index_schema";
const KEY_PREFIX: &str = "simfs_index_prefix";
const KEY_ENTRIES: &str = "simfs_index_entries";
/// Bytes per ranged GET when downloading a snapshot.
const CHUNK: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no index snapshot at {0}")]
    Missing(String),
    #[error("the snapshot at {0} {1}")]
    Incompatible(String, String),
    #[error(
        "another publisher replaced {0} while this one was listing; nothing was overwritten (run it again)"
    )]
    Raced(String),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
}

impl From<UploadError> for SnapshotError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Blob(b) => SnapshotError::Blob(b),
            UploadError::Local(io) => SnapshotError::Io(io),
        }
    }
}

/// What a publish wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub blob: String,
    pub entries: u64,
    pub index_bytes: u64,
    pub snapshot_bytes: u64,
}

/// The snapshot blob of `source`.
pub fn blob_name(source: &SourceId) -> String {
    format!("{}{SNAPSHOT}", source.prefix)
}

fn gzip(from: &Path, to: &Path) -> std::io::Result<u64> {
    let mut input = std::fs::File::open(from)?;
    let out = std::fs::File::create(to)?;
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    std::io::copy(&mut input, &mut enc)?;
    let out = enc.finish()?;
    out.sync_all()?;
    Ok(out.metadata()?.len())
}

/// Lists `source` into a fresh index under `work` and publishes it (see the module).
pub async fn publish(
    store: Arc<dyn BlobStore>,
    source: &SourceId,
    opts: &IngestOptions,
    work: &Path,
) -> Result<Published, SnapshotError> {
    let name = blob_name(source);
    // The version this publish replaces, read before listing: a snapshot committed by
    // someone else meanwhile (possibly from a newer listing) is never overwritten.
    let expect = match store.head(&name).await {
        Ok(p) => Expect::Etag(p.etag),
        Err(BlobError::NotFound(_)) => Expect::Absent,
        Err(e) => return Err(e.into()),
    };
    let db = work.join("publish.db");
    let (index, stats) = build_index(store.clone(), source, &db, opts, &no_progress).await?;
    drop(index);
    let index_bytes = std::fs::metadata(&db)?.len();
    let gz = work.join("publish.db.gz");
    let snapshot_bytes = {
        let (db, gz) = (db.clone(), gz.clone());
        tokio::task::spawn_blocking(move || gzip(&db, &gz))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??
    };
    let entries = stats.files + stats.dirs + stats.symlinks;
    let mut meta = Metadata::new();
    meta.insert(KEY_SCHEMA.into(), SCHEMA_VERSION.into());
    meta.insert(KEY_PREFIX.into(), source.prefix.clone());
    meta.insert(KEY_ENTRIES.into(), entries.to_string());
    let up = UploadOptions {
        block_size: 32 << 20,
        ..Default::default()
    };
    let result = upload_file(store.as_ref(), &name, &gz, &meta, &expect, &up).await;
    for f in [&db, &gz] {
        let _ = std::fs::remove_file(f);
    }
    match result {
        Ok(_) => Ok(Published {
            blob: name,
            entries,
            index_bytes,
            snapshot_bytes,
        }),
        Err(e) if e.is_changed() => Err(SnapshotError::Raced(name)),
        Err(e) => Err(e.into()),
    }
}

/// Downloads the snapshot of `source` and installs it as the complete index at `db`,
/// opened. Checks come first: the blob's schema and prefix, then the file itself.
pub async fn fetch(
    store: Arc<dyn BlobStore>,
    source: &SourceId,
    db: &Path,
) -> Result<Index, SnapshotError> {
    let name = blob_name(source);
    let props = match store.head(&name).await {
        Ok(p) => p,
        Err(BlobError::NotFound(_)) => return Err(SnapshotError::Missing(name)),
        Err(e) => return Err(e.into()),
    };
    let refuse = |why: String| SnapshotError::Incompatible(name.clone(), why);
    let schema = props.metadata.get(KEY_SCHEMA).map(String::as_str);
    if schema != Some(SCHEMA_VERSION) {
        return Err(refuse(format!(
            "has index schema {} and this simfs reads schema {SCHEMA_VERSION} (publish it again with this version)",
            schema.unwrap_or("(none)")
        )));
    }
    let prefix = props.metadata.get(KEY_PREFIX).map(String::as_str);
    if prefix != Some(source.prefix.as_str()) {
        return Err(refuse(format!(
            "describes prefix {:?}, not {:?}",
            prefix.unwrap_or(""),
            source.prefix
        )));
    }
    // Ranged GETs, several in flight, written in order: memory holds a few chunks.
    let gz = db.with_extension("db.fetch.gz");
    {
        let mut file = std::fs::File::create(&gz)?;
        let chunks = (0..props.size.div_ceil(CHUNK)).map(|i| {
            let (store, name, etag) = (store.clone(), name.clone(), props.etag.clone());
            let range = i * CHUNK..((i + 1) * CHUNK).min(props.size);
            async move { store.get_range(&name, range, &etag).await }
        });
        let mut chunks = futures::stream::iter(chunks).buffered(8);
        while let Some(data) = chunks.next().await {
            file.write_all(&data?)?;
        }
    }
    let tmp = db.with_extension("db.fetch");
    let (gz2, tmp2, db2, source2) = (gz.clone(), tmp.clone(), db.to_path_buf(), source.clone());
    let installed = tokio::task::spawn_blocking(move || install(&gz2, &tmp2, &db2, &source2))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_file(&gz);
    installed.map_err(&refuse)?;
    Index::open_existing(db, source)?
        .ok_or_else(|| refuse("did not open as a complete index".into()))
}

/// Decompresses `gz` into `tmp`, checks it is a complete index of `source.prefix`, points
/// it at this mount's container URL (the same container, however this node spells it) and
/// renames it to `db`. The error says what was wrong with the file.
fn install(gz: &Path, tmp: &Path, db: &Path, source: &SourceId) -> Result<(), String> {
    let mut out = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
    let input = std::fs::File::open(gz).map_err(|e| e.to_string())?;
    let mut dec = flate2::read::GzDecoder::new(std::io::BufReader::new(input));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = dec
            .read(&mut buf)
            .map_err(|e| format!("is not a gzip file ({e})"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    out.sync_all().map_err(|e| e.to_string())?;
    drop(out);
    let check = || -> rusqlite::Result<Result<(), String>> {
        let c = Connection::open(tmp)?;
        let get = |k: &str| super::meta_value(&c, k);
        if get("schema")?.as_deref() != Some(SCHEMA_VERSION)
            || get("complete")?.as_deref() != Some("1")
        {
            return Ok(Err("is not a complete index of this schema".into()));
        }
        if get("prefix")?.as_deref() != Some(source.prefix.as_str()) {
            return Ok(Err("holds an index of another prefix".into()));
        }
        let ok: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Ok(Err(format!("is damaged ({ok})")));
        }
        c.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'container_url'",
            [&source.container_url],
        )?;
        c.execute(
            "DELETE FROM meta WHERE key IN ('writer', 'last_refresh')",
            [],
        )?;
        Ok(Ok(()))
    };
    check().map_err(|e| format!("is not a readable index ({e})"))??;
    for ext in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(db.with_extension(ext));
    }
    std::fs::rename(tmp, db).map_err(|e| e.to_string())
}
