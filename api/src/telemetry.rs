//! Request logs and metrics of the API. The query string is never logged:
//! it may hold personal data (blind-index values such as `email=`).

use std::time::Instant;

use poem::{Endpoint, IntoResponse as _, Request, Response};

/// Middleware: one log line and one count per request.
pub async fn log_requests<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let started = Instant::now();
    let response = match next.call(req).await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    request_finished(&method, &path, status, elapsed.as_secs_f64());
    Ok(response)
}

fn request_finished(method: &str, path: &str, status: u16, seconds: f64) {
    metrics::counter!(
        "audit_api_requests_total",
        "method" => method.to_owned(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("audit_api_request_duration_seconds").record(seconds);
    let elapsed_ms = (seconds * 1000.0).round() as u64;
    if status >= 500 {
        tracing::warn!(method, path, status, elapsed_ms, "request failed");
    } else {
        tracing::debug!(method, path, status, elapsed_ms, "request served");
    }
}
