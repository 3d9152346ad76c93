//! A Kafka record as the pipeline sees it, independent of the client library.

use serde_json::Value;

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

    /// [`Self::headers_json`] as JSON text, written directly in the
    /// canonical form (docs/INTEGRITY.md): it is on the hot path of every
    /// event, and the chain record hashes it in that form.
    pub fn headers_json_text(&self) -> String {
        use crate::canonical::write_str;
        use base64::Engine as _;
        let mut out = Vec::with_capacity(
            2 + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(4, Vec::len) + 24)
                .sum::<usize>(),
        );
        out.push(b'[');
        for (i, h) in self.headers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"key\":");
            if h.key.contains('\0') {
                write_str(&h.key.replace('\0', "\u{FFFD}"), &mut out);
            } else {
                write_str(&h.key, &mut out);
            }
            match &h.value {
                None => out.extend_from_slice(b",\"value\":null"),
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) if !text.contains('\0') => {
                        out.extend_from_slice(b",\"value\":");
                        write_str(text, &mut out);
                    }
                    _ => {
                        out.extend_from_slice(b",\"value_base64\":");
                        write_str(
                            &base64::engine::general_purpose::STANDARD.encode(bytes),
                            &mut out,
                        );
                    }
                },
            }
            out.push(b'}');
        }
        out.push(b']');
        // Built from `&str`s and ASCII punctuation: valid UTF-8.
        String::from_utf8(out).unwrap_or_else(|_| "[]".into())
    }

    /// Headers as JSON, lossless: UTF-8 values without NUL are kept as text,
    /// anything else as base64 so PostgreSQL can store it. (The value of
    /// [`Self::headers_json_text`]; only dead letters need it as a tree.)
    pub fn headers_json(&self) -> Value {
        serde_json::from_str(&self.headers_json_text()).unwrap_or(Value::Array(Vec::new()))
    }
}

#[cfg(test)]
mod headers_tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// The definition of the headers' JSON, built as a `Value` tree.
    fn reference_headers_json(record: &RawRecord) -> Value {
        use base64::Engine as _;
        let list: Vec<Value> = record
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

    /// The hand-written text is the lossless headers JSON, and already in
    /// canonical form (the chain hashes it without another pass).
    #[test]
    fn headers_text_is_canonical_and_lossless() {
        let pieces: [&[u8]; 9] = [
            b"a",
            b"\"",
            b"\\",
            b"\n",
            b"\0",
            b"\x7f",
            "é€😀".as_bytes(),
            b"\xff",
            b"/",
        ];
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2_000 {
            let bytes = |rng: &mut StdRng| -> Vec<u8> {
                (0..rng.gen_range(0..6))
                    .flat_map(|_| pieces[rng.gen_range(0..pieces.len())].to_vec())
                    .collect()
            };
            let headers = (0..rng.gen_range(0..4))
                .map(|_| Header {
                    key: String::from_utf8_lossy(&bytes(&mut rng)).into_owned(),
                    value: rng.gen_bool(0.8).then(|| bytes(&mut rng)),
                })
                .collect();
            let record = RawRecord {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                key: None,
                value: None,
                headers,
                timestamp_ms: None,
            };
            let text = record.headers_json_text();
            let value: Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(value, reference_headers_json(&record), "{text}");
            assert_eq!(
                crate::canonical::canonical_text(&text).expect("canonical"),
                text
            );
        }
    }
}
