//! A Kafka record as the pipeline sees it, independent of the client library.

use serde_json::{json, Value};

/// One Kafka header. Values are bytes: producers may put anything there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// A record read from one partition, owned so it can cross task boundaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    /// Kafka's record timestamp in milliseconds, when the broker gave one.
    pub timestamp_ms: Option<i64>,
}

impl RawRecord {
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value.as_deref())
    }

    /// [`Self::headers_json`] as JSON text, built without a `Value` tree
    /// (it is on the hot path of every event).
    pub fn headers_json_text(&self) -> Box<serde_json::value::RawValue> {
        use base64::Engine as _;
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            key: std::borrow::Cow<'a, str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            value: Option<Option<&'a str>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            value_base64: Option<String>,
        }
        let entries: Vec<Entry<'_>> = self
            .headers
            .iter()
            .map(|h| {
                let key = if h.key.contains('\0') {
                    std::borrow::Cow::Owned(h.key.replace('\0', "\u{FFFD}"))
                } else {
                    std::borrow::Cow::Borrowed(h.key.as_str())
                };
                match &h.value {
                    None => Entry {
                        key,
                        value: Some(None),
                        value_base64: None,
                    },
                    Some(bytes) => match std::str::from_utf8(bytes) {
                        Ok(text) if !text.contains('\0') => Entry {
                            key,
                            value: Some(Some(text)),
                            value_base64: None,
                        },
                        _ => Entry {
                            key,
                            value: None,
                            value_base64: Some(
                                base64::engine::general_purpose::STANDARD.encode(bytes),
                            ),
                        },
                    },
                }
            })
            .collect();
        // Serialising strings cannot fail; the default (`null`) is unreachable.
        serde_json::value::to_raw_value(&entries).unwrap_or_default()
    }

    /// Headers as JSON, lossless: UTF-8 values without NUL are kept as text,
    /// anything else as base64 so PostgreSQL can store it.
    pub fn headers_json(&self) -> Value {
        use base64::Engine as _;
        let list: Vec<Value> = self
            .headers
            .iter()
            .map(|h| {
                let key = h.key.replace('\0', "\u{FFFD}");
                match &h.value {
                    None => json!({ "key": key, "value": null }),
                    Some(bytes) => match std::str::from_utf8(bytes) {
                        Ok(text) if !text.contains('\0') => json!({ "key": key, "value": text }),
                        _ => json!({
                            "key": key,
                            "value_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
                        }),
                    },
                }
            })
            .collect();
        Value::Array(list)
    }
}
