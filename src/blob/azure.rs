//! `BlobStore` on the official `azure_storage_blob` SDK.
//!
//! One `BlobContainerClient` serves every request; the SDK's pipeline brings retries with
//! exponential back-off, and our `SasPolicy` (SAS or account key) or an Entra ID credential
//! authenticates. SDK errors are mapped once, here, onto `BlobError` so the rest of simfs
//! never sees HTTP status codes.

use super::auth::Credential;
use super::{BlobError, BlobProps, BlobResult, BlobStore, ListPage, ListQuery};
use async_trait::async_trait;
use azure_core::error::ErrorKind;
use azure_core::http::policies::Policy;
use azure_core::http::{
    ClientOptions, Etag, ExponentialRetryOptions, RetryOptions, StatusCode, Url,
};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
    BlobContainerClientListBlobsOptions, ListBlobsIncludeItem,
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
}

#[derive(Clone, Debug)]
pub struct AzureOptions {
    /// Retries of a failed request (connection errors, 408/429/5xx) before giving up.
    pub max_retries: u32,
    /// Upper bound on the time one request may spend retrying.
    pub max_retry_time: Duration,
    /// SAS permissions simfs signs for itself with an account key.
    pub sas_permissions: String,
}

impl Default for AzureOptions {
    fn default() -> Self {
        AzureOptions {
            max_retries: 4,
            max_retry_time: Duration::from_secs(30),
            sas_permissions: "rl".into(),
        }
    }
}

impl AzureStore {
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
        if let Some(p) = cred.sas_policy(&container, &opts.sas_permissions) {
            client_options.per_call_policies.push(p as Arc<dyn Policy>);
        }
        let token = cred
            .token_credential()
            .map_err(|e| BlobError::Auth(format!("{}: {e}", cred.describe())))?;
        let options = BlobContainerClientOptions {
            client_options,
            ..Default::default()
        };
        let client = BlobContainerClient::new(container_url, token, Some(options))
            .map_err(|e| BlobError::Invalid(e.to_string()))?;
        Ok(AzureStore { client })
    }
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
        Some(StatusCode::PreconditionFailed) => BlobError::PreconditionFailed(msg),
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
    crate::index::from_ns(
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
                etag: p.etag.map(String::from).unwrap_or_default(),
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
            .client
            .blob_client(name)
            .get_properties(None)
            .await
            .map_err(|e| map_err(&format!("HEAD {name:?}"), e))?;
        let bad = |e: azure_core::Error| BlobError::Invalid(format!("HEAD {name:?}: {e}"));
        Ok(BlobProps {
            name: name.to_string(),
            size: rsp.content_length().map_err(bad)?.unwrap_or(0),
            etag: rsp
                .etag()
                .map_err(bad)?
                .map(String::from)
                .unwrap_or_default(),
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
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let opts = BlobClientDownloadOptions {
            range: Some(range.clone().into()),
            if_match: Some(Etag::from(etag)),
            parallel: NonZero::new(1),
            ..Default::default()
        };
        let what = || format!("GET {name:?} bytes {}..{}", range.start, range.end);
        let rsp = self
            .client
            .blob_client(name)
            .download(Some(opts))
            .await
            .map_err(|e| map_err(&what(), e))?;
        rsp.body.collect().await.map_err(|e| map_err(&what(), e))
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
}
