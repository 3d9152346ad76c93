//! Every error as an RFC 9457 problem (`application/problem+json`):
//! `type`, `title`, `status` and a `detail` that says what to fix.
//!
//! Handlers return [`ApiError`]; [`problem_errors`] (the outermost
//! middleware) turns every other error (a parameter that does not parse, a
//! missing token, an unknown path) into the same shape, so no client ever
//! sees another error format.

use poem::http::{header, HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};

use audit_ledger::query::QueryError;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";
/// The `WWW-Authenticate` challenge of every 401.
pub const BEARER_CHALLENGE: &str = "Bearer realm=\"order-audit-trail\"";

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, PartialEq, Eq, Object)]
pub struct Problem {
    /// Problem type (a URI reference); `about:blank` means the status says it all.
    #[oai(rename = "type")]
    pub problem_type: String,
    /// Short summary of the status.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong and what to change in the request.
    pub detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            problem_type: "about:blank".to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
        }
    }
}

/// The error responses of every route.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// A parameter or the body is invalid; `detail` names it and says how to fix it.
    #[oai(status = 400, content_type = "application/problem+json")]
    BadRequest(Json<Problem>),
    /// No bearer token, or one that is not configured.
    #[oai(status = 401, content_type = "application/problem+json")]
    Unauthorized(
        Json<Problem>,
        /// `Bearer realm="order-audit-trail"`.
        #[oai(header = "WWW-Authenticate")]
        String,
    ),
    /// The token's role may not use this route or option.
    #[oai(status = 403, content_type = "application/problem+json")]
    Forbidden(Json<Problem>),
    /// The event, stream or record does not exist.
    #[oai(status = 404, content_type = "application/problem+json")]
    NotFound(Json<Problem>),
    /// The request body is larger than the node accepts.
    #[oai(status = 413, content_type = "application/problem+json")]
    PayloadTooLarge(Json<Problem>),
    /// Too many concurrent streams; retry after the given seconds.
    #[oai(status = 429, content_type = "application/problem+json")]
    TooManyRequests(
        Json<Problem>,
        /// Seconds to wait before retrying.
        #[oai(header = "Retry-After")]
        u32,
    ),
    /// A bug; the node's log has the details.
    #[oai(status = 500, content_type = "application/problem+json")]
    Internal(Json<Problem>),
    /// The database is unavailable or the query ran into the statement timeout.
    #[oai(status = 503, content_type = "application/problem+json")]
    Unavailable(
        Json<Problem>,
        /// Seconds to wait before retrying.
        #[oai(header = "Retry-After")]
        u32,
    ),
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest(Json(Problem::new(StatusCode::BAD_REQUEST, detail)))
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::Unauthorized(
            Json(Problem::new(StatusCode::UNAUTHORIZED, detail)),
            BEARER_CHALLENGE.to_owned(),
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::Forbidden(Json(Problem::new(StatusCode::FORBIDDEN, detail)))
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::NotFound(Json(Problem::new(StatusCode::NOT_FOUND, detail)))
    }

    pub fn payload_too_large(detail: impl Into<String>) -> Self {
        Self::PayloadTooLarge(Json(Problem::new(StatusCode::PAYLOAD_TOO_LARGE, detail)))
    }

    pub fn too_many_requests(detail: impl Into<String>, retry_after_secs: u32) -> Self {
        Self::TooManyRequests(
            Json(Problem::new(StatusCode::TOO_MANY_REQUESTS, detail)),
            retry_after_secs,
        )
    }

    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u32) -> Self {
        Self::Unavailable(
            Json(Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail)),
            retry_after_secs,
        )
    }

    /// A bug. The cause goes to the log only: it may name tables or values.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(context, error = %error, "request failed");
        Self::Internal(Json(Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error while {context}; the node's log has the details"),
        )))
    }

    pub fn problem(&self) -> &Problem {
        match self {
            Self::BadRequest(p)
            | Self::Unauthorized(p, _)
            | Self::Forbidden(p)
            | Self::NotFound(p)
            | Self::PayloadTooLarge(p)
            | Self::TooManyRequests(p, _)
            | Self::Internal(p)
            | Self::Unavailable(p, _) => &p.0,
        }
    }

    /// Maps a failed read. The statement timeout is named with its flag, so
    /// the client knows to narrow its filters and the operator what to raise.
    pub fn from_query(error: QueryError, context: &str) -> Self {
        match error {
            QueryError::Timeout(_) => {
                tracing::warn!(context, "query cancelled by the statement timeout");
                Self::unavailable(
                    format!(
                        "the query ran longer than the statement timeout while {context}; narrow the filters \
                         (stream_id, event_type, a time range) or use a smaller limit \
                         (the operator sets the timeout with --api-statement-timeout-ms)"
                    ),
                    1,
                )
            }
            QueryError::Unavailable(message) => {
                tracing::warn!(context, error = %message, "database unavailable");
                Self::unavailable(
                    format!("the event store is unavailable while {context}; retry shortly"),
                    1,
                )
            }
            QueryError::Input(message) => {
                Self::bad_request(format!("the database refused a filter value: {message}"))
            }
            QueryError::Fatal(message) => Self::internal(context, &message),
        }
    }

    pub fn from_sqlx(error: sqlx::Error, context: &str) -> Self {
        Self::from_query(QueryError::from(error), context)
    }
}

/// A problem response for an error that did not come from a handler.
pub fn problem_response(status: StatusCode, detail: impl Into<String>) -> Response {
    let problem = Problem::new(status, detail);
    let body = serde_json::json!({
        "type": problem.problem_type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    });
    let mut response = Response::builder()
        .status(status)
        .content_type(PROBLEM_CONTENT_TYPE)
        .body(body.to_string());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(BEARER_CHALLENGE),
        );
    }
    response
}

/// What to tell a client about an error another layer raised.
fn detail_for(error: &poem::Error, path: &str) -> String {
    let status = error.status();
    if let Some(e) = error.downcast_ref::<poem_openapi::error::ParseParamError>() {
        return format!(
            "parameter `{}` is invalid: {}; see /openapi.json for its type and range",
            e.name, e.reason
        );
    }
    if let Some(e) = error.downcast_ref::<poem_openapi::error::ParsePathError>() {
        // e.name is poem-openapi's internal name (param0): show the path.
        return format!(
            "a parameter in the path {path} is invalid ({}); see /openapi.json for its type",
            e.reason
        );
    }
    if let Some(e) = error.downcast_ref::<poem_openapi::error::ParseRequestPayloadError>() {
        return format!("the request body is invalid: {}", e.reason);
    }
    match status {
        StatusCode::UNAUTHORIZED => {
            "send `Authorization: Bearer <token>`; an operator creates tokens with `audit-node tokens create`"
                .to_owned()
        }
        StatusCode::NOT_FOUND => {
            "no such route; the routes are listed in /openapi.json (Swagger UI at /docs)".to_owned()
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            "this route does not take that method; see /openapi.json".to_owned()
        }
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is too large".to_owned(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "send the body as JSON with `Content-Type: application/json`".to_owned()
        }
        s if s.is_server_error() => {
            tracing::error!(status = s.as_u16(), error = %error, "request failed outside a handler");
            "internal error; the node's log has the details".to_owned()
        }
        _ => error.to_string(),
    }
}

/// Middleware: every error becomes a problem response. A 405 carries the
/// `Allow` header RFC 9110 requires (the methods the path takes).
pub async fn problem_errors<E: Endpoint>(next: E, req: Request) -> poem::Result<Response> {
    let path = req.uri().path().to_owned();
    match next.call(req).await {
        Ok(response) => Ok(response.into_response()),
        // Our own ApiError responses are problems already.
        Err(error) if error.is_from_response() => Ok(error.into_response()),
        Err(error) => {
            let status = error.status();
            let mut response = problem_response(status, detail_for(&error, &path));
            if status == StatusCode::METHOD_NOT_ALLOWED {
                if let Some(allow) = allowed_methods(&path) {
                    if let Ok(value) = HeaderValue::from_str(&allow) {
                        response.headers_mut().insert(header::ALLOW, value);
                    }
                }
            }
            Ok(response)
        }
    }
}

/// A route's path template split into segments (`None`: a `{parameter}`),
/// and the methods it takes, upper case.
type RouteMethods = (Vec<Option<String>>, Vec<String>);

/// Every route's methods, read once from the OpenAPI document, plus the
/// routes outside it (`/openapi.json`, `/docs`).
static ROUTES: std::sync::LazyLock<Vec<RouteMethods>> = std::sync::LazyLock::new(|| {
    let spec: serde_json::Value =
        serde_json::from_str(&crate::openapi_json()).unwrap_or(serde_json::Value::Null);
    let mut routes: Vec<RouteMethods> = Vec::new();
    if let Some(paths) = spec.get("paths").and_then(|p| p.as_object()) {
        for (template, operations) in paths {
            let mut methods: Vec<String> = operations
                .as_object()
                .map(|ops| ops.keys().map(|m| m.to_ascii_uppercase()).collect())
                .unwrap_or_default();
            // poem answers HEAD wherever it answers GET.
            if methods.iter().any(|m| m == "GET") {
                methods.push("HEAD".to_owned());
            }
            methods.sort();
            routes.push((segments_of_template(template), methods));
        }
    }
    for open in ["/openapi.json", "/docs"] {
        routes.push((
            segments_of_template(open),
            vec!["GET".to_owned(), "HEAD".to_owned()],
        ));
    }
    routes
});

fn segments_of_template(template: &str) -> Vec<Option<String>> {
    template
        .trim_matches('/')
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                None
            } else {
                Some(s.to_owned())
            }
        })
        .collect()
}

/// The `Allow` value for `path`: the methods of the routes it matches.
pub fn allowed_methods(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut methods: Vec<&str> = ROUTES
        .iter()
        .filter(|(template, _)| {
            template.len() == segments.len()
                && template
                    .iter()
                    .zip(&segments)
                    .all(|(t, s)| t.as_deref().is_none_or(|t| t == *s))
        })
        .flat_map(|(_, methods)| methods.iter().map(String::as_str))
        .collect();
    methods.sort_unstable();
    methods.dedup();
    (!methods.is_empty()).then(|| methods.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_titles_follow_the_status() {
        let p = Problem::new(StatusCode::TOO_MANY_REQUESTS, "slow down");
        assert_eq!(p.title, "Too Many Requests");
        assert_eq!(p.status, 429);
        assert_eq!(p.problem_type, "about:blank");
    }

    #[test]
    fn allow_lists_the_methods_of_the_matching_route() {
        assert_eq!(
            allowed_methods("/v1/subjects/customer-1").as_deref(),
            Some("DELETE")
        );
        assert_eq!(allowed_methods("/v1/replays").as_deref(), Some("POST"));
        assert_eq!(
            allowed_methods("/v1/events/abc").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(
            allowed_methods("/openapi.json").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(allowed_methods("/nowhere/at/all"), None);
    }

    #[test]
    fn timeouts_are_503_and_name_the_flag() {
        let e = ApiError::from_query(QueryError::Timeout("x".into()), "listing events");
        assert_eq!(e.problem().status, 503);
        assert!(e.problem().detail.contains("--api-statement-timeout-ms"));
    }
}
