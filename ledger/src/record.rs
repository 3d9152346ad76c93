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
