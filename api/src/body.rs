//! Request bodies: an optional JSON body, strict JSON strings, and the body
//! size limit.

use poem::http::StatusCode;
use poem::{Endpoint, FromRequest, Request, RequestBody, Response};
use poem_openapi::error::ParseRequestPayloadError;
use poem_openapi::registry::MetaSchemaRef;
use poem_openapi::registry::{MetaMediaType, MetaRequest, Registry};
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};
use serde_json::Value;

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
        let value: Value = serde_json::from_slice(&data).map_err(|e| ParseRequestPayloadError {
            reason: format!("not JSON: {e}"),
        })?;
        let parsed = T::parse_from_json(Some(value)).map_err(|e| ParseRequestPayloadError {
            reason: e.into_message(),
        })?;
        Ok(Self(Some(parsed)))
    }
}

/// A string field of a JSON body that takes JSON strings only. poem-openapi's
/// `String` also takes numbers and booleans (`{"reason": false}` would read
/// as `"false"`), which the schema (`type: string`) does not allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text(pub String);

impl Text {
    pub fn into_string(self) -> String {
        self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Type for Text {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> std::borrow::Cow<'static, str> {
        String::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        String::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value.unwrap_or_default() {
            Value::String(s) => Ok(Self(s)),
            other => Err(ParseError::expected_type(other)),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
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
