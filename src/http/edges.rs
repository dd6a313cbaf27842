//! The API's edges: request ids, a deadline per request, a rate limit per token, CORS.
//!
//! - **Request ids**: a request's `x-request-id` (printable, 1–128 characters) is kept, else
//!   one is made (`req_` and 16 hex digits); it names the request's log span and comes back
//!   in the response's `x-request-id`.
//! - **Deadline**: a request still unanswered after `http.request_timeout` is answered 504.
//! - **Rate limit**: each token has a bucket of `http.rate_burst` requests refilled at
//!   `http.rate_per_second`; past it, 429 with `Retry-After` (whole seconds, at least 1).
//!   Probes and the scraper (`/livez`, `/readyz`, `/metrics`) take no token and no budget.
//! - **CORS**: only the origins in `http.cors_origins` may call from a browser.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use switchboard_actors::admission::TokenBucket;
use tokio::time::Instant;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use super::problem::Problem;

/// The header that carries a request's id.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Tokens whose buckets are kept at most; past it the fullest (idle) ones are forgotten.
const BUCKETS_KEPT: usize = 100_000;

/// The API's edges, from `http.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct Edges {
    /// Requests per second per token, sustained.
    pub rate_per_second: f64,
    /// Requests per token back to back.
    pub rate_burst: u32,
    /// A request's deadline.
    pub request_timeout: Duration,
    /// Origins allowed to call from a browser.
    pub cors_origins: Vec<String>,
}

impl Default for Edges {
    fn default() -> Self {
        Self {
            rate_per_second: 50.0,
            rate_burst: 100,
            request_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
        }
    }
}

/// Per-token token buckets.
#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: u32,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl RateLimit {
    /// A limit of `per_second` sustained and `burst` back to back, per key.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request of `key`'s budget at `now`; `Err` with the wait until the next.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= BUCKETS_KEPT && !buckets.contains_key(key) {
            buckets.clear();
        }
        let bucket = buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(self.per_second, self.burst, now));
        if bucket.take(now) {
            Ok(())
        } else {
            Err(bucket.wait(now))
        }
    }
}

/// A 429 telling the caller when to come back.
pub fn too_many(wait: Duration) -> Problem {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too many requests",
        format!("this token's rate limit is spent; try again in {secs} s"),
    )
    .with_retry_after(secs)
}

/// Gives each request its id and span, and answers 504 past the deadline.
pub async fn request_id_and_deadline(timeout: Duration, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(
            || format!("req_{:016x}", rand::random::<u64>()),
            str::to_owned,
        );
    let span = tracing::info_span!("request", request_id = %id, method = %req.method());
    let mut response = match tokio::time::timeout(timeout, next.run(req).instrument(span)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timed out",
            format!("no answer within {timeout:?}"),
        )
        .into_response(),
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// CORS for the configured origins only (none: no browser may call).
pub fn cors(origins: &[String]) -> CorsLayer {
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            REQUEST_ID,
        ])
        .expose_headers([REQUEST_ID, header::RETRY_AFTER])
        .max_age(Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_spends_its_burst_then_waits_and_others_are_not_affected() {
        let limit = RateLimit::new(2.0, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| limit.check("a", t0).is_ok()));
        let wait = limit.check("a", t0).expect_err("the burst is spent");
        assert_eq!(wait, Duration::from_millis(500));
        assert!(
            limit.check("b", t0).is_ok(),
            "another token has its own budget"
        );
        assert!(limit.check("a", t0 + Duration::from_millis(500)).is_ok());
        assert_eq!(
            too_many(Duration::from_millis(10)).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
