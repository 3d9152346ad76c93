//! Blind indexes: equality search over encrypted fields.
//!
//! A token is a keyed hash of the normalised value, so the store can match
//! `?email=…` without holding the address. With the key, tokens can be
//! tested against guesses: the key is separate from every KEK and never
//! leaves the node. Tokens are truncated to 128 bits: collisions stay
//! negligible and the column stays small.

use std::borrow::Cow;
use std::fmt;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::error::{KeyError, ProtectError};
use super::keys::KEY_LEN;
use super::policy::{BlindIndexRule, Normalize};

const DOMAIN: &[u8] = b"oat-blind-v1\0";
const TOKEN_BYTES: usize = 16;

/// The HMAC-SHA256 key of blind indexes, keyed once (cloning a keyed HMAC
/// saves the two key-block compressions per token). The `hmac` crate cannot
/// wipe its state: this copy lives as long as the key is loaded.
#[derive(Clone)]
pub struct BlindIndexKey {
    mac: Hmac<Sha256>,
}

impl BlindIndexKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Config(format!(
                "blind-index key is {} bytes long, expected {KEY_LEN}",
                bytes.len()
            )));
        }
        let mac = Hmac::<Sha256>::new_from_slice(bytes)
            .map_err(|_| KeyError::Config("blind-index key refused by hmac".to_owned()))?;
        Ok(Self { mac })
    }
}

impl fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindIndexKey(<redacted>)")
    }
}

/// The token of a field value: strings hash as their text, other JSON values
/// as their canonical JSON (so `12345` and `"12345"` share a token, as a
/// query parameter cannot tell them apart).
pub fn token(
    key: &BlindIndexKey,
    rule: &BlindIndexRule,
    value: &Value,
) -> Result<String, ProtectError> {
    if let Value::String(text) = value {
        return Ok(token_of_text(key, &rule.name, rule.normalize, text));
    }
    let mut canonical = Vec::new();
    crate::canonical::write_value(value, &mut canonical).map_err(|e| ProtectError::Canonical {
        pointer: rule.field.to_string(),
        message: e.to_string(),
    })?;
    Ok(token_of_bytes(key, &rule.name, rule.normalize, &canonical))
}

/// The token an API filter `?{rule.name}={raw_input}` looks up.
pub fn query_token(key: &BlindIndexKey, rule: &BlindIndexRule, raw_input: &str) -> String {
    token_of_text(key, &rule.name, rule.normalize, raw_input)
}

/// The tokens a filter value may match when the field's JSON type is not
/// known: the text as a string, and, if the text is a JSON number, boolean
/// or null whose canonical spelling differs (`1200` is stored as `12e2`),
/// that one too. Look up any of them.
pub fn query_tokens(key: &BlindIndexKey, rule: &BlindIndexRule, raw_input: &str) -> Vec<String> {
    let as_text = query_token(key, rule, raw_input);
    let scalar = serde_json::from_str::<Value>(raw_input.trim())
        .ok()
        .filter(|v| !matches!(v, Value::String(_) | Value::Array(_) | Value::Object(_)));
    let as_json = scalar.and_then(|value| token(key, rule, &value).ok());
    match as_json {
        Some(token) if token != as_text => vec![as_text, token],
        _ => vec![as_text],
    }
}

/// The token of a value already serialised as canonical JSON (the protect
/// path has those bytes at hand).
pub(crate) fn token_of_canonical(
    key: &BlindIndexKey,
    rule: &BlindIndexRule,
    value: &Value,
    canonical: &[u8],
) -> String {
    match value {
        Value::String(text) => token_of_text(key, &rule.name, rule.normalize, text),
        _ => token_of_bytes(key, &rule.name, rule.normalize, canonical),
    }
}

/// The token of a string field value, from its decoded text.
pub(crate) fn token_of_str(key: &BlindIndexKey, rule: &BlindIndexRule, text: &str) -> String {
    token_of_text(key, &rule.name, rule.normalize, text)
}

/// The token of a field value that is not a string, from its canonical JSON.
pub(crate) fn token_of_json(
    key: &BlindIndexKey,
    rule: &BlindIndexRule,
    canonical: &[u8],
) -> String {
    token_of_bytes(key, &rule.name, rule.normalize, canonical)
}

fn token_of_text(key: &BlindIndexKey, name: &str, normalize: Normalize, text: &str) -> String {
    let normalised = normalise(normalize, text);
    digest_to_token(key, name, normalised.as_bytes())
}

fn token_of_bytes(key: &BlindIndexKey, name: &str, normalize: Normalize, bytes: &[u8]) -> String {
    // Canonical JSON is UTF-8, so this never replaces anything.
    token_of_text(key, name, normalize, &String::from_utf8_lossy(bytes))
}

fn normalise(normalize: Normalize, text: &str) -> Cow<'_, str> {
    match normalize {
        Normalize::None => Cow::Borrowed(text),
        Normalize::Lowercase => {
            let trimmed = text.trim();
            // Beyond ASCII, titlecase letters also change: let std decide.
            if trimmed.is_ascii() && !trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Borrowed(trimmed)
            } else {
                Cow::Owned(trimmed.to_lowercase())
            }
        }
    }
}

fn digest_to_token(key: &BlindIndexKey, name: &str, normalised: &[u8]) -> String {
    let mut mac = key.mac.clone();
    mac.update(DOMAIN);
    mac.update(name.as_bytes());
    mac.update(b"\0");
    mac.update(normalised);
    let digest = mac.finalize().into_bytes();
    let mut token = String::with_capacity(name.len() + 1 + 2 * TOKEN_BYTES);
    token.push_str(name);
    token.push(':');
    token.push_str(&hex::encode(&digest[..TOKEN_BYTES]));
    token
}

#[cfg(test)]
#[path = "blind_tests.rs"]
mod tests;
