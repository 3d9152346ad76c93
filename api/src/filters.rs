//! Query parameters to an [`EventFilter`], with a 400 that names the
//! parameter for every bad value. Shared by every route that filters events
//! (`/v1/events`, replay, replay jobs).
//!
//! Besides the declared parameters, every blind index of the policy is a
//! parameter of its own (`email=…` with the default policy): its value is
//! turned into blind-index tokens here and never kept. Unknown parameters
//! are refused, so a misspelt filter never silently matches everything.

use std::sync::Arc;

use audit_ledger::protect;
use audit_ledger::query::{BlindMatch, EventFilter, Position, TypePattern};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::problem::ApiError;
use crate::state::{ApiState, DEFAULT_PAGE, MAX_PAGE};

/// The filter parameters every event-filtering route declares.
pub const FILTER_PARAMS: &[&str] = &[
    "stream_id",
    "event_type",
    "source",
    "correlation_id",
    "causation_id",
    "occurred_from",
    "occurred_to",
    "ingested_from",
    "ingested_to",
    "contains",
];

/// The declared filter parameters, as the route received them.
#[derive(Debug, Clone, Default)]
pub struct FilterParams {
    pub stream_id: Option<String>,
    pub event_type: Vec<String>,
    pub source: Option<String>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub occurred_from: Option<DateTime<Utc>>,
    pub occurred_to: Option<DateTime<Utc>>,
    pub ingested_from: Option<DateTime<Utc>>,
    pub ingested_to: Option<DateTime<Utc>>,
    pub contains: Option<String>,
}

/// Builds the filter from the declared parameters and, for blind indexes,
/// the raw query string. `route_params` are the route's other parameters
/// (`limit`, `cursor`, …); anything else that is not a blind index is a 400.
pub fn event_filter(
    state: &Arc<ApiState>,
    params: FilterParams,
    raw_query: Option<&str>,
    route_params: &[&str],
) -> Result<EventFilter, ApiError> {
    let mut event_types = Vec::with_capacity(params.event_type.len());
    for raw in &params.event_type {
        let pattern = raw
            .parse::<TypePattern>()
            .map_err(|e| ApiError::bad_request(format!("parameter `event_type`: {e}")))?;
        event_types.push(pattern);
    }
    let contains = params.contains.as_deref().map(parse_contains).transpose()?;
    check_range("occurred", params.occurred_from, params.occurred_to)?;
    check_range("ingested", params.ingested_from, params.ingested_to)?;
    let blind = blind_matches(state, raw_query, route_params)?;
    Ok(EventFilter {
        stream_id: params.stream_id,
        event_types,
        source: params.source,
        correlation_id: params.correlation_id,
        causation_id: params.causation_id,
        occurred_from: params.occurred_from,
        occurred_to: params.occurred_to,
        ingested_from: params.ingested_from,
        ingested_to: params.ingested_to,
        contains,
        blind,
        from_version: None,
    })
}

fn parse_contains(raw: &str) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| {
        ApiError::bad_request(format!(
            "parameter `contains` is not valid JSON ({e}); pass a URL-encoded JSON object, e.g. contains={{\"status\":\"paid\"}}"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "parameter `contains` must be a JSON object (payloads are objects), e.g. {\"status\":\"paid\"}",
        ));
    }
    Ok(value)
}

fn check_range(
    name: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<(), ApiError> {
    match (from, to) {
        (Some(from), Some(to)) if from > to => Err(ApiError::bad_request(format!(
            "`{name}_from` ({}) is after `{name}_to` ({}); the range is [from, to)",
            from.to_rfc3339(),
            to.to_rfc3339()
        ))),
        _ => Ok(()),
    }
}

/// Blind-index equality filters from the raw query string.
fn blind_matches(
    state: &Arc<ApiState>,
    raw_query: Option<&str>,
    route_params: &[&str],
) -> Result<Vec<BlindMatch>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw_query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("the query string does not parse: {e}")))?;
    let protection = state.protection();
    let mut matches = Vec::new();
    for (name, value) in pairs {
        if FILTER_PARAMS.contains(&name.as_str()) || route_params.contains(&name.as_str()) {
            continue;
        }
        let rule = protection.and_then(|p| p.policy().blind_index(&name));
        let (Some(protection), Some(rule)) = (protection, rule) else {
            return Err(unknown_parameter(state, &name, route_params));
        };
        if value.trim().is_empty() {
            return Err(ApiError::bad_request(format!(
                "blind-index parameter `{name}` is empty; pass the exact value to look for"
            )));
        }
        matches.push(BlindMatch {
            name: name.clone(),
            tokens: protect::query_tokens(protection.blind_key(), rule, &value),
        });
    }
    Ok(matches)
}

fn unknown_parameter(state: &Arc<ApiState>, name: &str, route_params: &[&str]) -> ApiError {
    let mut known: Vec<String> = FILTER_PARAMS
        .iter()
        .chain(route_params)
        .map(|s| (*s).to_owned())
        .collect();
    let blind: Vec<String> = state
        .protection()
        .map(|p| {
            p.policy()
                .blind_indexes()
                .iter()
                .map(|r| r.name.clone())
                .collect()
        })
        .unwrap_or_default();
    known.extend(blind.iter().cloned());
    let blind_note = if blind.is_empty() {
        "this node's policy has no blind index".to_owned()
    } else {
        format!("blind indexes of this node's policy: {}", blind.join(", "))
    };
    ApiError::bad_request(format!(
        "unknown query parameter `{name}`; this route takes {} ({blind_note})",
        known.join(", ")
    ))
}

/// The page size: `limit`, or the default (the route's validator already
/// refused 0 and values above the maximum).
pub fn page_limit(limit: Option<u32>) -> i64 {
    i64::from(limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE))
}

/// An event cursor, or a 400 that says where cursors come from.
pub fn event_cursor(cursor: Option<&str>) -> Result<Option<Position>, ApiError> {
    cursor
        .map(|c| {
            Position::from_cursor(c)
                .map_err(|e| ApiError::bad_request(format!("parameter `cursor`: {e}")))
        })
        .transpose()
}

/// Cursors of tables keyed by a growing `id` (dead letters, access log):
/// base64url of a kind byte and the id, so one kind's cursor is refused by
/// another route.
pub mod id_cursor {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    use crate::problem::ApiError;

    /// Retired: dead letters page by `(tx, id)` now (`dead_letters::cursor`,
    /// kind 0x12), and refuse these.
    pub const DEAD_LETTERS: u8 = 0x10;
    pub const ACCESS_LOG: u8 = 0x11;

    pub fn encode(kind: u8, id: i64) -> String {
        let mut bytes = [0u8; 9];
        bytes[0] = kind;
        bytes[1..].copy_from_slice(&id.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    pub fn decode(kind: u8, cursor: Option<&str>) -> Result<Option<i64>, ApiError> {
        let Some(cursor) = cursor else {
            return Ok(None);
        };
        let mut bytes = [0u8; 9];
        match URL_SAFE_NO_PAD.decode_slice(cursor.trim().as_bytes(), &mut bytes) {
            Ok(9) if bytes[0] == kind => {}
            _ => {
                return Err(ApiError::bad_request(
                    "parameter `cursor`: the cursor is not one this route returned (copy `next_cursor` from a previous response unchanged)",
                ))
            }
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[1..]);
        Ok(Some(i64::from_be_bytes(id)))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn id_cursors_round_trip_per_kind() {
            let c = encode(DEAD_LETTERS, 77);
            assert_eq!(decode(DEAD_LETTERS, Some(&c)).unwrap(), Some(77));
            assert!(decode(ACCESS_LOG, Some(&c)).is_err());
            assert!(decode(ACCESS_LOG, Some("%%%")).is_err());
            assert_eq!(decode(ACCESS_LOG, None).unwrap(), None);
        }
    }
}
