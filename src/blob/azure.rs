//! `BlobStore` on the official `azure_storage_blob` SDK.
//!
//! One `BlobContainerClient` serves every request; the SDK's pipeline brings retries with
//! exponential back-off, and our `SasPolicy` (SAS or account key) or an Entra ID credential
//! authenticates. SDK errors are mapped once, here, onto `BlobError` so the rest of simfs
//! never sees HTTP status codes.

use super::auth::{Credential, SasPolicy};
use super::policies::{refuses_checksums, CountAttempts, CountCalls, Limit, NoRetryOfRefusals};
use super::{
    BlobError, BlobProps, BlobResult, BlobStore, Expect, ListPage, ListQuery, Metadata, ReadError,
    Sink,
};
use super::{Checksum, Got};
use async_trait::async_trait;
use azure_core::error::ErrorKind;
use azure_core::http::headers::{HeaderName, ETAG};
use azure_core::http::policies::Policy;
use azure_core::http::{
    ClientOptions, Etag, ExponentialRetryOptions, RequestContent, RetryOptions, StatusCode, Url,
};
use azure_storage_blob::models::{
    BlobClientDeleteOptions, BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
    BlobClientSetMetadataOptions, BlobClientStartCopyFromUrlOptions,
    BlobClientStartCopyFromUrlResultHeaders, BlobContainerClientListBlobsOptions,
    BlockBlobClientCommitBlockListOptions, BlockBlobClientCommitBlockListResultHeaders,
    BlockBlobClientUploadOptions, BlockLookupList, CopyStatus, ListBlobsIncludeItem,
};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use bytes::Bytes;
use futures::StreamExt;
use std::num::NonZero;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct AzureStore {
    client: BlobContainerClient,
    /// The SAS in use, if any: a server-side copy's source URL must carry it too.
    sas: Option<Arc<SasPolicy>>,
    /// What a blob client made from its own URL needs (see `needs_own_url`).
    token: Option<Arc<dyn azure_core::credentials::TokenCredential>>,
    client_options: ClientOptions,
    /// The service refused to checksum ranges (an emulator in strict mode answers the
    /// header with FeatureNotSupported): [MD5, CRC64]. Not asked again.
    refuses_sum: [std::sync::atomic::AtomicBool; 2],
    limits: Arc<super::limits::Limits>,
    /// Throttling answers seen by `CountAttempts`.
    throttled: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Clone, Debug)]
pub struct AzureOptions {
    /// Retries of a failed request (connection errors, 408/429/5xx) before giving up.
    pub max_retries: u32,
    /// Upper bound on the time one request may spend retrying.
    pub max_retry_time: Duration,
    /// SAS permissions simfs signs for itself with an account key.
    pub sas_permissions: String,
    /// Rates the store holds itself to.
    pub limits: super::limits::RateLimits,
}

impl Default for AzureOptions {
    fn default() -> Self {
        AzureOptions {
            max_retries: 4,
            max_retry_time: Duration::from_secs(30),
            // read, add, create, write, delete, list: what a read-write mount does.
            sas_permissions: "racwdl".into(),
            limits: Default::default(),
        }
    }
}

impl AzureStore {
    /// The client of blob `name`.
    fn blob(&self, name: &str) -> BlobResult<azure_storage_blob::BlobClient> {
        if !needs_own_url(name) {
            return Ok(self.client.blob_client(name));
        }
        let options = azure_storage_blob::BlobClientOptions {
            client_options: self.client_options.clone(),
            ..Default::default()
        };
        azure_storage_blob::BlobClient::new(
            own_blob_url(self.client.url(), name),
            self.token.clone(),
            Some(options),
        )
        .map_err(|e| BlobError::Invalid(format!("{name:?}: {e}")))
    }

    /// A store for the container at `container_url` (no query string), authenticated by `cred`.
    pub fn new(container_url: Url, cred: &Credential, opts: &AzureOptions) -> BlobResult<Self> {
        let container = container_url
            .path_segments()
            .and_then(|mut s| s.next_back().map(str::to_string))
            .unwrap_or_default();
        let mut client_options = ClientOptions {
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: time::Duration::milliseconds(200),
                max_retries: opts.max_retries,
                max_total_elapsed: time::Duration::try_from(opts.max_retry_time)
                    .unwrap_or(time::Duration::seconds(30)),
                max_delay: time::Duration::seconds(5),
            }),
            ..Default::default()
        };
        let sas = cred.sas_policy(&container, &opts.sas_permissions);
        if let Some(p) = &sas {
            client_options
                .per_call_policies
                .push(p.clone() as Arc<dyn Policy>);
        }
        client_options
            .per_call_policies
            .push(Arc::new(CountCalls) as Arc<dyn Policy>);
        let limits = Arc::new(super::limits::Limits::new(opts.limits));
        client_options
            .per_try_policies
            .push(Arc::new(NoRetryOfRefusals) as Arc<dyn Policy>);
        client_options
            .per_try_policies
            .push(Arc::new(Limit(limits.clone())) as Arc<dyn Policy>);
        let throttled = Arc::new(std::sync::atomic::AtomicU64::new(0));
        client_options
            .per_try_policies
            .push(Arc::new(CountAttempts(throttled.clone())) as Arc<dyn Policy>);
        let token = cred
            .token_credential()
            .map_err(|e| BlobError::Auth(format!("{}: {e}", cred.describe())))?;
        let options = BlobContainerClientOptions {
            client_options: client_options.clone(),
            ..Default::default()
        };
        let client = BlobContainerClient::new(container_url, token.clone(), Some(options))
            .map_err(|e| BlobError::Invalid(e.to_string()))?;
        Ok(AzureStore {
            client,
            sas,
            token,
            client_options,
            refuses_sum: Default::default(),
            limits,
            throttled,
        })
    }
}

/// The URL parser drops tab, LF and CR from what it is given (as WHATWG URLs do), so the
/// SDK's `blob_client(name)` would address another blob for a name holding one of them;
/// such names get a URL percent-encoded here, byte by byte, which the parser keeps as is.
fn needs_own_url(name: &str) -> bool {
    name.contains(['\t', '\n', '\r'])
}

/// Everything but unreserved characters and `/` is escaped.
const BLOB_PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// The URL of blob `name` in the container at `container_url`, escaped by simfs.
fn own_blob_url(container_url: &Url, name: &str) -> Url {
    let mut url = container_url.clone();
    let path = format!(
        "{}/{}",
        container_url.path().trim_end_matches('/'),
        percent_encoding::utf8_percent_encode(name, BLOB_PATH)
    );
    url.set_path(&path);
    url
}

/// Retries of a ranged GET whose body was cut off.
const BODY_RETRIES: u32 = 4;

fn conditions(expect: &Expect) -> (Option<Etag>, Option<Etag>) {
    match expect {
        Expect::Absent => (None, Some(Etag::from("*"))),
        Expect::Etag(e) => (Some(etag_header(e)), None),
    }
}

/// An ETag as simfs keeps it: without the quotes response headers put around it, as List
/// Blobs reports it, so the ETag an upload returned and the one a later listing shows for
/// the same version compare equal.
fn etag_text(e: Etag) -> String {
    let s = String::from(e);
    s.trim_matches('"').to_string()
}

/// An ETag for a conditional header: quoted, as HTTP and the Blob service's documentation
/// write it.
fn etag_header(e: &str) -> Etag {
    Etag::from(format!("\"{}\"", e.trim_matches('"')))
}

fn to_hash_map(m: &Metadata) -> std::collections::HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn etag_of(what: &str, e: Option<Etag>) -> BlobResult<String> {
    e.map(etag_text)
        .ok_or_else(|| BlobError::Invalid(format!("{what}: no ETag in the answer")))
}

/// Maps an SDK error onto what it means to simfs.
fn map_err(what: &str, e: azure_core::Error) -> BlobError {
    let (status, code) = match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => (Some(*status), error_code.clone().unwrap_or_default()),
        _ => (None, String::new()),
    };
    let msg = match status {
        Some(s) => format!("{what}: HTTP {} {code}", u16::from(s)),
        None => format!("{what}: {e}"),
    };
    match status {
        Some(StatusCode::NotFound) if code == "ContainerNotFound" => {
            BlobError::ContainerNotFound(msg)
        }
        Some(StatusCode::NotFound) => BlobError::NotFound(msg),
        Some(StatusCode::PreconditionFailed) => BlobError::Changed(msg),
        // A conditional create (If-None-Match: *) of a name that exists is answered 409, not
        // 412: the same failed precondition.
        Some(StatusCode::Conflict) if code == "BlobAlreadyExists" => BlobError::Changed(msg),
        Some(StatusCode::Unauthorized | StatusCode::Forbidden) => BlobError::Auth(msg),
        Some(_) => BlobError::Service(msg),
        None => match e.kind() {
            ErrorKind::Io | ErrorKind::Connection => BlobError::Unreachable(msg),
            ErrorKind::Credential => BlobError::Auth(msg),
            _ => BlobError::Unreachable(msg),
        },
    }
}

fn to_system_time(t: time::OffsetDateTime) -> SystemTime {
    crate::posix::from_ns(
        t.unix_timestamp_nanos()
            .clamp(i64::MIN as i128, i64::MAX as i128) as i64,
    )
}

#[async_trait]
impl BlobStore for AzureStore {
    async fn list(&self, q: &ListQuery) -> BlobResult<ListPage> {
        let opts = BlobContainerClientListBlobsOptions {
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            prefix: (!q.prefix.is_empty()).then(|| q.prefix.clone()),
            start_from: q.start_from.clone(),
            marker: q.marker.clone(),
            maxresults: q.max_results.map(|m| m as i32),
            ..Default::default()
        };
        let mut pages = self
            .client
            .list_blobs(Some(opts))
            .map_err(|e| map_err("list", e))?
            .into_pages();
        let Some(first) = pages.next().await else {
            return Ok(ListPage::default());
        };
        let body = first
            .map_err(|e| map_err("list", e))?
            .into_model()
            .map_err(|e| map_err("list (reading the answer)", e))?;
        let mut page = ListPage {
            blobs: Vec::with_capacity(body.blob_items.len()),
            next_marker: body.next_marker.filter(|m| !m.is_empty()),
        };
        for item in body.blob_items {
            // A listing entry without a name or properties is the service's bug, not a
            // reason to fail the mount: skip it loudly.
            let (Some(name), Some(p)) = (item.name, item.properties) else {
                tracing::warn!("listing returned an entry without name or properties");
                continue;
            };
            let metadata = item
                .metadata
                .and_then(|m| m.values)
                .map(super::normalize_metadata)
                .unwrap_or_default();
            page.blobs.push(BlobProps {
                name,
                size: p.content_length.unwrap_or(0),
                etag: p.etag.map(etag_text).unwrap_or_default(),
                last_modified: p
                    .last_modified
                    .map(to_system_time)
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                content_md5: p.content_md5.filter(|m| !m.is_empty()),
                metadata,
            });
        }
        Ok(page)
    }

    async fn head(&self, name: &str) -> BlobResult<BlobProps> {
        let rsp = self
            .blob(name)?
            .get_properties(None)
            .await
            .map_err(|e| map_err(&format!("HEAD {name:?}"), e))?;
        let bad = |e: azure_core::Error| BlobError::Invalid(format!("HEAD {name:?}: {e}"));
        Ok(BlobProps {
            name: name.to_string(),
            size: rsp.content_length().map_err(bad)?.unwrap_or(0),
            etag: rsp.etag().map_err(bad)?.map(etag_text).unwrap_or_default(),
            last_modified: rsp
                .last_modified()
                .map_err(bad)?
                .map(to_system_time)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            content_md5: rsp.content_md5().map_err(bad)?.filter(|m| !m.is_empty()),
            metadata: super::normalize_metadata(rsp.metadata().map_err(bad)?),
        })
    }

    async fn get_range(&self, name: &str, range: Range<u64>, etag: &str) -> BlobResult<Bytes> {
        // Into a buffer of the range's size: `collect` grows its buffer as frames arrive,
        // copying the body several times over.
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        let into = &mut buf;
        let got = self
            .read_range(name, range, etag, None, &mut |at, d| {
                into[at as usize..at as usize + d.len()].copy_from_slice(&d);
                Ok(())
            })
            .await
            .map_err(|e| match e {
                ReadError::Blob(e) => e,
                ReadError::Sink(e) => BlobError::Invalid(e.to_string()),
            })?;
        debug_assert_eq!(got.bytes, buf.len() as u64);
        Ok(Bytes::from(buf))
    }

    async fn read_range(
        &self,
        name: &str,
        range: Range<u64>,
        etag: &str,
        want: Option<Checksum>,
        sink: &mut Sink<'_>,
    ) -> Result<Got, ReadError> {
        if range.is_empty() {
            return Ok(Got::default());
        }
        let refused = |w: Checksum| &self.refuses_sum[(w == Checksum::Crc64) as usize];
        let mut want = want.filter(|w| !refused(*w).load(std::sync::atomic::Ordering::Relaxed));
        // One request per range: the SDK's download is partitioned (4 MiB pieces by default,
        // fetched one after another with parallel = 1), which halved a fill's rate. The cache
        // chooses the ranges and runs them in parallel itself.
        let whole = usize::try_from(range.end - range.start)
            .ok()
            .and_then(NonZero::new);
        let opts = |want: Option<Checksum>| BlobClientDownloadOptions {
            range: Some(range.clone().into()),
            if_match: Some(etag_header(etag)),
            parallel: NonZero::new(1),
            partition_size: whole,
            range_get_content_md5: (want == Some(Checksum::Md5)).then_some(true),
            range_get_content_crc64: (want == Some(Checksum::Crc64)).then_some(true),
            ..Default::default()
        };
        let what = || format!("GET {name:?} bytes {}..{}", range.start, range.end);
        let expected = range.end - range.start;
        // The SDK retries a request until its answer's headers arrive; a body cut off after
        // them (a reset mid-transfer, a truncating proxy) is retried here, as a whole.
        let mut attempt = 0u32;
        loop {
            let rsp = match self.blob(name)?.download(Some(opts(want))).await {
                Ok(rsp) => rsp,
                Err(e) => match (map_err(&what(), e), want) {
                    (BlobError::Service(m), Some(w)) if refuses_checksums(&m) => {
                        // Asked again without it: the range then comes unchecked by the
                        // service, which the caller handles as a checksum left out.
                        tracing::info!(
                            "the service refuses to checksum ranges ({m}): not asked again"
                        );
                        refused(w).store(true, std::sync::atomic::Ordering::Relaxed);
                        want = None;
                        continue;
                    }
                    (e, _) => return Err(e.into()),
                },
            };
            // A range's checksum, when asked for and given; a header that does not parse
            // counts as not given (the range is then checked as if the service had none).
            let sum = want.and_then(|w| {
                use base64::Engine;
                let header = match w {
                    Checksum::Md5 => HeaderName::from_static("content-md5"),
                    Checksum::Crc64 => HeaderName::from_static("x-ms-content-crc64"),
                };
                let v = rsp.headers.get_optional_str(&header)?;
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .ok()
                    .filter(|s| !s.is_empty())
            });
            let mut body = rsp.body;
            // Each frame goes to the sink as the client received it: no copy into a buffer
            // of the range (that copy, its allocation and its page faults were a sixth of
            // a cold read's CPU).
            let mut at = 0u64;
            let failure = loop {
                match body.next().await {
                    None if at == expected => return Ok(Got { bytes: at, sum }),
                    None => {
                        break BlobError::Unreachable(format!(
                            "{}: the answer ended after {at} of {expected} bytes",
                            what(),
                        ))
                    }
                    Some(Ok(frame)) => {
                        if at + frame.len() as u64 > expected {
                            return Err(BlobError::Invalid(format!(
                                "{}: the answer is longer than the range",
                                what()
                            ))
                            .into());
                        }
                        let n = frame.len() as u64;
                        sink(at, frame).map_err(ReadError::Sink)?;
                        at += n;
                        self.limits.received(n).await;
                    }
                    Some(Err(e)) => break map_err(&format!("{} (reading the body)", what()), e),
                }
            };
            attempt += 1;
            if attempt > BODY_RETRIES || !matches!(failure, BlobError::Unreachable(_)) {
                return Err(failure.into());
            }
            tracing::debug!("{failure}; retrying");
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }

    fn throttled(&self) -> u64 {
        self.throttled.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn check_access(&self) -> BlobResult<()> {
        // A container SAS cannot read container properties; a one-blob listing needs exactly
        // the permission a mount needs.
        let q = ListQuery {
            max_results: Some(1),
            ..Default::default()
        };
        self.list(&q).await.map(|_| ())
    }

    async fn put(
        &self,
        name: &str,
        data: Bytes,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        let (if_match, if_none_match) = conditions(expect);
        let what = format!("PUT {name:?}");
        let opts = BlockBlobClientUploadOptions {
            metadata: Some(to_hash_map(metadata)),
            if_match,
            if_none_match,
            // One request: the caller cuts large files into blocks itself. Saying so also
            // spares the SDK its default, which reads the cgroup's CPU limit from /proc and
            // /sys on every upload.
            partition_size: NonZero::new((data.len() as u64).max(1)),
            parallel: NonZero::new(1),
            ..Default::default()
        };
        // The trait's `from`, not RequestContent's own, which takes a Vec: the block goes
        // out as it is, not copied first.
        let rsp = self
            .blob(name)?
            .block_blob_client()
            .upload(
                <RequestContent<_, _> as From<Bytes>>::from(data),
                Some(opts),
            )
            .await
            .map_err(|e| map_err(&what, e))?;
        etag_of(&what, rsp.etag)
    }

    async fn stage_block(&self, name: &str, id: &[u8], data: Bytes) -> BlobResult<()> {
        let len = data.len() as u64;
        self.blob(name)?
            .block_blob_client()
            .stage_block(
                id,
                len,
                <RequestContent<_, _> as From<Bytes>>::from(data),
                None,
            )
            .await
            .map_err(|e| map_err(&format!("stage block of {name:?}"), e))?;
        Ok(())
    }

    async fn commit_blocks(
        &self,
        name: &str,
        ids: &[Vec<u8>],
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        let (if_match, if_none_match) = conditions(expect);
        let what = format!("commit blocks of {name:?}");
        // The model is non-exhaustive: it can only be built by assignment.
        #[allow(clippy::field_reassign_with_default)]
        let list = {
            let mut list = BlockLookupList::default();
            list.latest = Some(ids.to_vec());
            list
        };
        let opts = BlockBlobClientCommitBlockListOptions {
            metadata: Some(to_hash_map(metadata)),
            if_match,
            if_none_match,
            ..Default::default()
        };
        let body = RequestContent::try_from(list).map_err(|e| map_err(&what, e))?;
        let rsp = self
            .blob(name)?
            .block_blob_client()
            .commit_block_list(body, Some(opts))
            .await
            .map_err(|e| map_err(&what, e))?;
        etag_of(&what, rsp.etag().map_err(|e| map_err(&what, e))?)
    }

    async fn set_metadata(
        &self,
        name: &str,
        metadata: &Metadata,
        etag: &str,
    ) -> BlobResult<String> {
        let what = format!("set metadata of {name:?}");
        let opts = BlobClientSetMetadataOptions {
            if_match: Some(etag_header(etag)),
            ..Default::default()
        };
        let rsp = self
            .blob(name)?
            .set_metadata(&to_hash_map(metadata), Some(opts))
            .await
            .map_err(|e| map_err(&what, e))?;
        etag_of(
            &what,
            rsp.headers().get_optional_string(&ETAG).map(Etag::from),
        )
    }

    async fn copy(
        &self,
        from: &str,
        from_etag: &str,
        to: &str,
        metadata: &Metadata,
        expect: &Expect,
    ) -> BlobResult<String> {
        let what = format!("copy {from:?} to {to:?}");
        let mut source = self.blob(from)?.url().clone();
        if let Some(sas) = &self.sas {
            source.set_query(Some(sas.token_at(SystemTime::now()).expose()));
        }
        let (if_match, if_none_match) = conditions(expect);
        let opts = BlobClientStartCopyFromUrlOptions {
            metadata: Some(to_hash_map(metadata)),
            if_match,
            if_none_match,
            source_if_match: Some(etag_header(from_etag)),
            ..Default::default()
        };
        let target = self.blob(to)?;
        let rsp = target
            .start_copy_from_url(source.to_string(), Some(opts))
            .await
            .map_err(|e| map_err(&what, e))?;
        let bad = |e: azure_core::Error| map_err(&what, e);
        let mut status = rsp.copy_status().map_err(bad)?;
        let mut etag = rsp.etag().map_err(bad)?;
        // Within one account a copy is usually done when the call returns; a large one may
        // still be pending and is polled until it settles.
        let mut delay = Duration::from_millis(50);
        while status == Some(CopyStatus::Pending) {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
            let p = target.get_properties(None).await.map_err(bad)?;
            status = p.copy_status().map_err(bad)?;
            etag = p.etag().map_err(bad)?;
        }
        match status {
            Some(CopyStatus::Success) | None => etag_of(&what, etag),
            Some(s) => Err(BlobError::Service(format!("{what}: copy ended {s:?}"))),
        }
    }

    async fn delete(&self, name: &str, etag: &str) -> BlobResult<()> {
        let opts = BlobClientDeleteOptions {
            if_match: Some(etag_header(etag)),
            ..Default::default()
        };
        self.blob(name)?
            .delete(Some(opts))
            .await
            .map_err(|e| map_err(&format!("DELETE {name:?}"), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blob name the service reads from the URL simfs sends for `name`.
    fn sent_and_decoded(name: &str) -> String {
        let container = Url::parse("https://acct.blob.core.windows.net/c").unwrap();
        let url = if needs_own_url(name) {
            own_blob_url(&container, name)
        } else {
            // What the SDK's blob_client does.
            let mut url = container.clone();
            url.path_segments_mut().unwrap().extend([name]);
            url
        };
        let path = url.path().strip_prefix("/c/").unwrap().to_string();
        percent_encoding::percent_decode_str(&path)
            .decode_utf8()
            .unwrap()
            .into_owned()
    }

    #[test]
    fn every_character_azure_allows_reaches_the_service_unchanged() {
        // Every ASCII character but NUL, then some beyond ASCII, in names of the shapes a
        // real container holds (a directory, a file in it, odd characters at either end).
        for c in (1u8..=127)
            .map(char::from)
            .chain(['é', '日', '\u{1F600}', '\u{FEFF}'])
        {
            for name in [
                format!("d{c}ir/file"),
                format!("{c}lead"),
                format!("trail{c}"),
                format!("a{c}{c}b"),
            ] {
                assert_eq!(sent_and_decoded(&name), name, "{c:?}");
            }
        }
        assert_eq!(sent_and_decoded("100%.txt"), "100%.txt");
        assert_eq!(sent_and_decoded("%2F"), "%2F");
        assert_eq!(sent_and_decoded("tab\tand%25"), "tab\tand%25");
    }
}
