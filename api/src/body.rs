//! Request bodies: an optional JSON body, and the body size limit.

use poem::http::StatusCode;
use poem::{Endpoint, FromRequest, Request, RequestBody, Response};
use poem_openapi::error::ParseRequestPayloadError;
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::ParseFromJSON;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use crate::problem::problem_response;

/// A JSON body that may be absent (no body, or an empty one, is `None`,
/// whatever the `Content-Type`). poem-openapi's `Json<Option<T>>` insists
/// on a `Content-Type` even without a body.
pub struct OptionalJson<T>(pub Option<T>);

impl<'a, T: ParseFromJSON> ApiExtractor<'a> for OptionalJson<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];

    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(MetaRequest {
            description: None,
            content: vec![MetaMediaType {
                content_type: "application/json; charset=utf-8",
                schema: T::schema_ref(),
            }],
            required: false,
        })
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let data = <Vec<u8> as FromRequest>::from_request(request, body).await?;
        if data.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        let is_json = request
            .content_type()
            .is_none_or(|ct| ct.starts_with("application/json") || ct.contains("+json"));
        if !is_json {
            return Err(ParseRequestPayloadError {
                reason: "send the body as JSON with `Content-Type: application/json`".to_owned(),
            }
            .into());
        }
        let value: serde_json::Value =
            serde_json::from_slice(&data).map_err(|e| ParseRequestPayloadError {
                reason: format!("not JSON: {e}"),
            })?;
        let parsed = T::parse_from_json(Some(value)).map_err(|e| ParseRequestPayloadError {
            reason: e.into_message(),
        })?;
        Ok(Self(Some(parsed)))
    }
}

/// Middleware: refuses request bodies larger than `max` bytes with 413,
/// whether announced by `Content-Length` or streamed without one.
pub async fn limit_body<E: Endpoint>(
    next: E,
    mut req: Request,
    max: usize,
) -> poem::Result<Response> {
    let too_large = || {
        problem_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {max} bytes, the most this node accepts (--api-max-body-bytes)"
            ),
        )
    };
    let announced = req
        .headers()
        .get(poem::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > max as u64 => return Ok(too_large()),
        Some(_) => {}
        None => {
            // Read at most max + 1 bytes to tell whether it is too large.
            use tokio::io::AsyncReadExt as _;
            let mut buffer = Vec::new();
            let reader = req.take_body().into_async_read();
            reader
                .take(max as u64 + 1)
                .read_to_end(&mut buffer)
                .await
                .map_err(|e| poem::Error::new(e, StatusCode::BAD_REQUEST))?;
            if buffer.len() > max {
                return Ok(too_large());
            }
            req.set_body(buffer);
        }
    }
    next.call(req).await.map(poem::IntoResponse::into_response)
}
