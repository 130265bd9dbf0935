//! Reading request bodies within bounds: a size limit checked against
//! `Content-Length` before any byte is read and again while reading, and a
//! deadline so a client that trickles its body cannot hold the server.
//! Handlers call [`read_body`] only after the request is authenticated.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::api::ApiError;

/// The slowest upload the server waits for, in bytes per second (on top
/// of the request timeout): a 64 MiB chunk may take up to 34 minutes.
pub(crate) const MIN_BODY_RATE: u64 = 32 << 10;

/// The most bytes reserved before any arrive.
const MAX_PREALLOCATION: u64 = 1 << 20;

/// The request's `Content-Length`, if it has one.
fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let parsed = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    parsed
        .map(Some)
        .ok_or_else(|| ApiError::bad_request("the request has a malformed Content-Length".into()))
}

/// The unit of the upload memory budget ([`reserve_memory`]).
pub(crate) const MEMORY_UNIT: u64 = 1 << 10;

/// Reserves room for an upload body (its `Content-Length`, else `limit`)
/// in the server-wide budget of upload memory `budget` (in
/// [`MEMORY_UNIT`]s), waiting at most `timeout` for other uploads to
/// finish; the reservation lasts as long as the returned permit. So
/// uploads held in memory at once never pass the budget, however many
/// connections send them.
pub(crate) async fn reserve_memory(
    budget: &std::sync::Arc<Semaphore>,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<OwnedSemaphorePermit, ApiError> {
    let bytes = declared_length(headers)?
        .unwrap_or(limit as u64)
        .min(limit as u64);
    let units = u32::try_from(bytes.div_ceil(MEMORY_UNIT)).unwrap_or(u32::MAX);
    let wait = std::sync::Arc::clone(budget).acquire_many_owned(units);
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) | Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the server is holding as many uploads in memory as it allows (--max-upload-memory); try again".into(),
        )),
    }
}

/// The refusal of a body over `limit` bytes.
fn too_large(limit: usize, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("{what} is larger than the {limit} bytes the server accepts"),
    )
}

/// How long a body of `expected` bytes may take to arrive.
pub(crate) fn body_deadline(expected: u64, timeout: Duration) -> Duration {
    timeout + Duration::from_secs(expected / MIN_BODY_RATE)
}

/// Reads the whole body of at most `limit` bytes (`what` names it in
/// refusals). Each piece must come within `timeout` and the whole body
/// within [`body_deadline`]; otherwise 408, and hyper closes the
/// connection since the body was not read to its end.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
    what: &str,
) -> Result<Bytes, ApiError> {
    let declared = declared_length(headers)?;
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit, what));
    }
    let expected = declared.unwrap_or(limit as u64);
    let deadline = Instant::now() + body_deadline(expected, timeout);
    let capacity = declared.unwrap_or(0).min(MAX_PREALLOCATION);
    let mut out = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    let mut body = body;
    loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(timeout);
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Err(too_slow(what, out.len(), expected)),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!("cannot read {what}: {e}")))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                drain(body).await;
                return Err(too_large(limit, what));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(out))
}

/// Bytes of an oversized body read and thrown away before the refusal.
const DRAIN_BYTES: usize = 4 << 20;
/// How long an oversized body is read and thrown away at most.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// How long the drain waits for the next piece of the body.
const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// Reads and discards what the client is still sending of a body refused
/// as too large (a bounded amount, for a bounded time, holding nothing):
/// closing a connection whose peer is still sending makes the kernel
/// answer with a reset, which can destroy the refusal before the client
/// reads it, so the client would see "connection reset" instead of 413.
async fn drain(mut body: Body) {
    let until = Instant::now() + DRAIN_TIME;
    let mut drained = 0;
    while drained < DRAIN_BYTES {
        let wait = until
            .saturating_duration_since(Instant::now())
            .min(DRAIN_IDLE);
        match tokio::time::timeout(wait, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                drained += frame.data_ref().map_or(0, |d| d.len());
            }
            _ => return,
        }
    }
}

/// The refusal of a body that did not arrive in time.
fn too_slow(what: &str, received: usize, expected: u64) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        format!(
            "{what} arrived too slowly ({received} of {expected} bytes in time; the server needs at least {MIN_BODY_RATE} bytes per second): the connection is closed"
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;

    fn length(n: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_str(n).unwrap());
        headers
    }

    #[tokio::test]
    async fn bodies_are_bounded_before_and_while_reading() {
        let t = Duration::from_secs(5);
        let ok = read_body(Body::from("abc"), &length("3"), 3, t, "the body").await;
        assert_eq!(ok.unwrap(), Bytes::from("abc"));
        // Declared too large: refused before reading.
        let err = read_body(Body::from("abcd"), &length("4"), 3, t, "the body")
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // No length (chunked): refused once it grows past the limit.
        let err = read_body(Body::from("abcd"), &HeaderMap::new(), 3, t, "the body")
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let err = read_body(Body::from("a"), &length("x"), 3, t, "the body")
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn attack_slow_body_is_cut_off() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        // One byte, then nothing more (the sender stays open).
        tx.send(Ok(Bytes::from("a"))).await.unwrap();
        let err = read_body(
            Body::from_stream(stream),
            &length("100"),
            100,
            Duration::from_millis(200),
            "the body",
        )
        .await
        .unwrap_err();
        assert_eq!(err.status(), StatusCode::REQUEST_TIMEOUT);
        drop(tx);
    }

    #[tokio::test]
    async fn attack_many_large_uploads_wait_for_the_memory_budget() {
        let budget = std::sync::Arc::new(Semaphore::new(100));
        let t = Duration::from_millis(200);
        let first = reserve_memory(&budget, &length("81920"), 1 << 20, t)
            .await
            .unwrap();
        // A second 80 KiB upload does not fit beside the first.
        let err = reserve_memory(&budget, &length("81920"), 1 << 20, t)
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        // A body without a length is counted at the limit.
        assert!(reserve_memory(&budget, &HeaderMap::new(), 40 << 10, t)
            .await
            .is_err());
        drop(first);
        let _second = reserve_memory(&budget, &length("81920"), 1 << 20, t)
            .await
            .unwrap();
    }

    #[test]
    fn big_bodies_get_time_in_proportion() {
        let t = Duration::from_secs(60);
        assert_eq!(body_deadline(0, t), t);
        assert!(body_deadline(64 << 20, t) >= t + Duration::from_secs(2048));
    }
}
