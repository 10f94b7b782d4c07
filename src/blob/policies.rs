//! The pipeline policies simfs adds to the Azure SDK's, per request (`CountCalls`, before the
//! retry policy) and per attempt (the others, inside it):
//!
//! - `NoRetryOfRefusals`: a service that refuses a feature says so every time, so its 500
//!   FeatureNotSupported reaches the retry policy as a 400 and is not retried for seconds;
//! - `Limit`: every attempt waits for the mount's request and upload rates (`limits`);
//! - `CountAttempts`: every attempt is counted for the metrics by operation and outcome, with
//!   its latency, bytes and whether it is a retry, and throttling answers for the store's
//!   `throttled` count (downloads ease off while it grows).

use async_trait::async_trait;
use azure_core::http::headers::HeaderName;
use azure_core::http::policies::Policy;
use azure_core::http::StatusCode;
use std::sync::Arc;

/// Whether a service's error says it will not compute a range checksum (Azurite without
/// `--loose` answers the header with 500 FeatureNotSupported; a proxy may say
/// UnsupportedHeader).
pub(super) fn refuses_checksums(message: &str) -> bool {
    ["FeatureNotSupported", "UnsupportedHeader"]
        .iter()
        .any(|c| message.contains(c))
}

/// A service that refuses a feature (500 FeatureNotSupported: Azurite without `--loose`, asked
/// for a range checksum) refuses it every time: its answer reaches the retry policy as a 400,
/// which is not retried, instead of a 500, which would be for seconds. `read_range` then
/// asks again without the feature.
#[derive(Debug)]
pub(super) struct NoRetryOfRefusals;

#[async_trait]
impl Policy for NoRetryOfRefusals {
    async fn send(
        &self,
        ctx: &azure_core::http::Context,
        request: &mut azure_core::http::Request,
        next: &[Arc<dyn Policy>],
    ) -> azure_core::http::policies::PolicyResult {
        let rsp = next[0].send(ctx, request, &next[1..]).await?;
        let refused = u16::from(rsp.status()) == 500
            && rsp
                .headers()
                .get_optional_str(&HeaderName::from_static("x-ms-error-code"))
                .is_some_and(refuses_checksums);
        if !refused {
            return Ok(rsp);
        }
        let (_, headers, body) = rsp.deconstruct();
        let body = body.collect().await?;
        Ok(azure_core::http::AsyncRawResponse::from_bytes(
            StatusCode::BadRequest,
            headers,
            body,
        ))
    }
}

/// Holds every attempt to the mount's request and upload rates (see `limits`).
pub(super) struct Limit(pub(super) Arc<super::limits::Limits>);

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Limit")
    }
}

#[async_trait]
impl Policy for Limit {
    async fn send(
        &self,
        ctx: &azure_core::http::Context,
        request: &mut azure_core::http::Request,
        next: &[Arc<dyn Policy>],
    ) -> azure_core::http::policies::PolicyResult {
        self.0.send(request.body().len().unwrap_or(0)).await;
        next[0].send(ctx, request, &next[1..]).await
    }
}

/// The attempts of one request so far (in its context, from `CountCalls`).
struct Attempts(std::sync::atomic::AtomicU32);

/// Gives each request (before the retry policy) a count of its attempts.
#[derive(Debug)]
pub(super) struct CountCalls;

#[async_trait]
impl Policy for CountCalls {
    async fn send(
        &self,
        ctx: &azure_core::http::Context,
        request: &mut azure_core::http::Request,
        next: &[Arc<dyn Policy>],
    ) -> azure_core::http::policies::PolicyResult {
        let ctx = ctx
            .clone()
            .with_value(Attempts(std::sync::atomic::AtomicU32::new(0)));
        next[0].send(&ctx, request, &next[1..]).await
    }
}

/// Counts every attempt of a request (what a proxy in front of the service sees): its
/// operation, outcome, time to the answer's headers and bytes, and the retries.
#[derive(Debug)]
pub(super) struct CountAttempts(pub(super) Arc<std::sync::atomic::AtomicU64>);

#[async_trait]
impl Policy for CountAttempts {
    async fn send(
        &self,
        ctx: &azure_core::http::Context,
        request: &mut azure_core::http::Request,
        next: &[Arc<dyn Policy>],
    ) -> azure_core::http::policies::PolicyResult {
        let method = request.method();
        let copy = request
            .headers()
            .get_optional_str(&HeaderName::from_static("x-ms-copy-source"))
            .is_some();
        let op =
            crate::metrics::blob_op(method.as_str(), request.url().query().unwrap_or(""), copy);
        let sent = request.body().len().unwrap_or(0);
        let start = std::time::Instant::now();
        let r = next[0].send(ctx, request, &next[1..]).await;
        let m = crate::metrics::get();
        let status = r.as_ref().ok().map(|rsp| u16::from(rsp.status()));
        let code = r.as_ref().ok().and_then(|rsp| {
            rsp.headers()
                .get_optional_str(&HeaderName::from_static("x-ms-error-code"))
        });
        let outcome = crate::metrics::blob_outcome(status, code);
        // Per request, for tracing where a wait went (`SIMFS_LOG=simfs::blob=trace`).
        tracing::trace!(
            "{op} {} {sent} bytes: {outcome} in {:.1?}",
            request.url().path(),
            start.elapsed()
        );
        if outcome == "throttled" {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        m.blob_requests
            .get_or_create(&vec![("op", op), ("outcome", outcome)])
            .inc();
        m.blob_seconds
            .get_or_create(&vec![("op", op)])
            .observe(start.elapsed().as_secs_f64());
        if sent > 0 {
            m.blob_bytes
                .get_or_create(&vec![("op", op), ("direction", "out")])
                .inc_by(sent);
        }
        if let (Ok(rsp), Some(200..=299)) = (&r, status) {
            if op == "get" {
                let got = rsp
                    .headers()
                    .get_optional_str(&HeaderName::from_static("content-length"))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                m.blob_bytes
                    .get_or_create(&vec![("op", op), ("direction", "in")])
                    .inc_by(got);
            }
        }
        if let Some(a) = ctx.value::<Attempts>() {
            if a.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
                m.blob_retries.get_or_create(&vec![("op", op)]).inc();
            }
        }
        r
    }
}
