//! Field encryption: a protected field's value becomes
//! `{"$enc":{"v":1,"kid":…,"n":<nonce>,"c":<ciphertext+tag>}}`.
//!
//! The AAD binds each ciphertext to its event id and field path, so a
//! ciphertext copied into another event or field fails authentication
//! instead of revealing a value in the wrong place.
//!
//! Nonces are random (96 bits, thread-local CSPRNG): keep each data key
//! under 2^32 encrypted fields (NIST SP 800-38D), e.g. a key per subject or
//! a shared key replaced daily.

use std::fmt::Write as _;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::Nonce;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::{CryptoRng, RngCore};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::blind::{token_of_canonical, BlindIndexKey};
use super::error::ProtectError;
use super::keys::DataKey;
use super::policy::{push_token, BlindIndexRule, Pointer};

/// The key marking an encrypted-field envelope.
pub const ENVELOPE_KEY: &str = "$enc";
/// Replaces a field whose data key was erased.
pub const ERASED_KEY: &str = "$erased";
/// Replaces a field the reader may not see.
pub const REDACTED_KEY: &str = "$redacted";

const ENVELOPE_VERSION: u64 = 1;
const AAD_PREFIX: &[u8] = b"oat-field-v1\0";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What `protect_payload` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Protected<'p> {
    /// The fields encrypted, in the order given (absent ones are skipped).
    pub fields: Vec<&'p Pointer>,
    /// `name:hex` tokens of the blind-indexed fields among them.
    pub blind_tokens: Vec<String>,
}

impl Protected<'_> {
    pub fn encrypted_any(&self) -> bool {
        !self.fields.is_empty()
    }
}

/// Encrypts each of `fields` present in `payload` in place under `key`, and
/// computes the blind-index tokens of those the rules name.
///
/// Refuses a payload that already holds an envelope anywhere, so that every
/// envelope in the store was written here and a failing one means
/// tampering, never a producer's odd field. Call it for every event (even
/// with no fields) to keep that true.
pub fn protect_payload<'p>(
    payload: &mut Value,
    event_id: Uuid,
    fields: impl Iterator<Item = &'p Pointer>,
    key: &DataKey,
    blind: Option<(&BlindIndexKey, &[BlindIndexRule])>,
) -> Result<Protected<'p>, ProtectError> {
    let mut rng = rand::thread_rng();
    protect_payload_with(payload, event_id, fields, key, blind, &mut rng)
}

/// [`protect_payload`] with the nonces drawn from `rng`, one per encrypted
/// field in the order of `fields` (so tests can give two paths the same).
pub(crate) fn protect_payload_with<'p, R: RngCore + CryptoRng>(
    payload: &mut Value,
    event_id: Uuid,
    fields: impl Iterator<Item = &'p Pointer>,
    key: &DataKey,
    blind: Option<(&BlindIndexKey, &[BlindIndexRule])>,
    rng: &mut R,
) -> Result<Protected<'p>, ProtectError> {
    if let Some(pointer) = find_envelope(payload) {
        return Err(ProtectError::AlreadyProtected { pointer });
    }
    let mut aad = FieldAad::new(event_id);
    let mut buffer = Vec::with_capacity(256);
    let mut protected = Protected::default();
    for pointer in fields {
        let Some(slot) = pointer.get_mut(payload) else {
            continue;
        };
        if is_envelope(slot) {
            // Only reachable when `fields` names a pointer twice.
            return Err(ProtectError::AlreadyProtected {
                pointer: pointer.to_string(),
            });
        }
        buffer.clear();
        crate::canonical::write_value(slot, &mut buffer).map_err(|e| ProtectError::Canonical {
            pointer: pointer.to_string(),
            message: e.to_string(),
        })?;
        if let Some((blind_key, rules)) = blind {
            for rule in rules
                .iter()
                .filter(|r| r.field.as_str() == pointer.as_str())
            {
                let token = token_of_canonical(blind_key, rule, slot, &buffer);
                protected.blind_tokens.push(token);
            }
        }
        // The plaintext is the value as the producer wrote it (numbers keep
        // their spelling: `100` reads back as `100`, not `1e2`); only the
        // blind index needs the canonical form.
        buffer.clear();
        serde_json::to_writer(&mut buffer, &*slot).map_err(|e| ProtectError::Canonical {
            pointer: pointer.to_string(),
            message: e.to_string(),
        })?;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        key.cipher()
            .encrypt_in_place(
                Nonce::from_slice(&nonce),
                aad.for_field(pointer.as_str()),
                &mut buffer,
            )
            .map_err(|_| ProtectError::Encrypt {
                pointer: pointer.to_string(),
                reason: "value too large for aes-gcm",
            })?;
        *slot = envelope(key.id(), &nonce, &buffer);
        protected.fields.push(pointer);
    }
    Ok(protected)
}

/// Replaces each of `fields` present in `payload` with `{"$erased":true}`:
/// events of an erased subject keep no personal data, not even encrypted.
pub fn erase_fields<'p>(payload: &mut Value, fields: impl Iterator<Item = &'p Pointer>) {
    for pointer in fields {
        if let Some(slot) = pointer.get_mut(payload) {
            *slot = marker(ERASED_KEY);
        }
    }
}

/// The result of looking up a data key by id.
pub enum KeyLookup<'k> {
    Found(&'k DataKey),
    /// Erased on purpose (crypto-shredding): the field reads as `{"$erased":true}`.
    Erased,
    /// Unknown to the key store: an error, not an erasure.
    Missing,
}

/// What `reveal_payload` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Revealed {
    pub decrypted: usize,
    pub erased: usize,
}

/// Decrypts every envelope in `payload` in place, restoring the original
/// JSON values; fields whose key is erased become `{"$erased":true}`.
pub fn reveal_payload<'k>(
    payload: &mut Value,
    event_id: Uuid,
    keys: &dyn Fn(&str) -> KeyLookup<'k>,
) -> Result<Revealed, ProtectError> {
    let mut walk = RevealWalk {
        aad: FieldAad::new(event_id),
        keys,
        buffer: Vec::with_capacity(256),
        path: String::new(),
        revealed: Revealed::default(),
    };
    walk.visit(payload)?;
    Ok(walk.revealed)
}

/// Replaces every envelope with `{"$redacted":true}`, for readers without
/// the right to see protected fields. Returns how many were replaced.
pub fn redact_payload(payload: &mut Value) -> usize {
    if is_envelope(payload) {
        *payload = marker(REDACTED_KEY);
        return 1;
    }
    match payload {
        Value::Object(map) => map.values_mut().map(redact_payload).sum(),
        Value::Array(items) => items.iter_mut().map(redact_payload).sum(),
        _ => 0,
    }
}

/// The data key ids the envelopes of `payload` need, sorted and distinct:
/// fetch them all before `reveal_payload`.
pub fn key_ids(payload: &Value) -> Vec<String> {
    fn collect(value: &Value, ids: &mut Vec<String>) {
        if is_envelope(value) {
            let kid = value[ENVELOPE_KEY].get("kid").and_then(Value::as_str);
            ids.extend(kid.map(str::to_owned));
            return;
        }
        match value {
            Value::Object(map) => map.values().for_each(|v| collect(v, ids)),
            Value::Array(items) => items.iter().for_each(|v| collect(v, ids)),
            _ => {}
        }
    }
    let mut ids = Vec::new();
    collect(payload, &mut ids);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// An envelope is an object whose only key is `$enc`.
pub fn is_envelope(value: &Value) -> bool {
    matches!(value, Value::Object(map) if map.len() == 1 && map.contains_key(ENVELOPE_KEY))
}

/// The pointer of the first object holding a `$enc` key (stricter than
/// `is_envelope`: no look-alikes either), as `protect_payload` refuses them.
/// Paths are built only on a hit.
pub fn find_envelope(value: &Value) -> Option<String> {
    fn reversed_path(value: &Value) -> Option<Vec<String>> {
        match value {
            Value::Object(map) if map.contains_key(ENVELOPE_KEY) => Some(Vec::new()),
            Value::Object(map) => map.iter().find_map(|(key, child)| {
                let mut path = reversed_path(child)?;
                path.push(key.clone());
                Some(path)
            }),
            Value::Array(items) => items.iter().enumerate().find_map(|(index, child)| {
                let mut path = reversed_path(child)?;
                path.push(index.to_string());
                Some(path)
            }),
            _ => None,
        }
    }
    let tokens = reversed_path(value)?;
    let mut pointer = String::new();
    for token in tokens.iter().rev() {
        push_token(&mut pointer, token);
    }
    if pointer.is_empty() {
        pointer.push_str("the payload root");
    }
    Some(pointer)
}

fn envelope(kid: &str, nonce: &[u8; NONCE_LEN], sealed: &[u8]) -> Value {
    let mut fields = Map::new();
    fields.insert("v".to_owned(), Value::from(ENVELOPE_VERSION));
    fields.insert("kid".to_owned(), Value::String(kid.to_owned()));
    fields.insert("n".to_owned(), Value::String(BASE64.encode(nonce)));
    fields.insert("c".to_owned(), Value::String(BASE64.encode(sealed)));
    let mut outer = Map::new();
    outer.insert(ENVELOPE_KEY.to_owned(), Value::Object(fields));
    Value::Object(outer)
}

/// `{"$erased":true}` as canonical JSON.
pub(crate) const ERASED_JSON: &[u8] = br#"{"$erased":true}"#;

/// Encrypts `plaintext` in place under `key` with a fresh nonce from `rng`,
/// and appends the envelope of the field as canonical JSON to `out`: the
/// bytes `write_value` gives for what `protect_payload` puts in the field.
pub(crate) fn write_envelope<R: RngCore + CryptoRng>(
    key: &DataKey,
    aad: &[u8],
    plaintext: &mut Vec<u8>,
    rng: &mut R,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    key.cipher()
        .encrypt_in_place(Nonce::from_slice(&nonce), aad, plaintext)
        .map_err(|_| "value too large for aes-gcm")?;
    // Members in canonical (bytewise) order: c, kid, n, v. The version is
    // written as its canonical number.
    out.extend_from_slice(br#"{"$enc":{"c":""#);
    push_base64(plaintext, out)?;
    out.extend_from_slice(br#"","kid":"#);
    crate::canonical::write_str(key.id(), out);
    out.extend_from_slice(br#","n":""#);
    push_base64(&nonce, out)?;
    out.extend_from_slice(br#"","v":"#);
    crate::canonical::write_number(ENVELOPE_VERSION_TEXT, out)
        .map_err(|_| "invalid envelope version")?;
    out.extend_from_slice(b"}}");
    Ok(())
}

/// [`ENVELOPE_VERSION`] as JSON text.
const ENVELOPE_VERSION_TEXT: &str = "1";
const _: () = assert!(ENVELOPE_VERSION == 1, "update ENVELOPE_VERSION_TEXT");

/// Appends standard base64 with padding, as `BASE64.encode` gives it.
fn push_base64(bytes: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    const TOO_LARGE: &str = "value too large for base64";
    let len = base64::encoded_len(bytes.len(), true).ok_or(TOO_LARGE)?;
    let start = out.len();
    out.resize(start + len, 0);
    let written = BASE64
        .encode_slice(bytes, &mut out[start..])
        .map_err(|_| TOO_LARGE)?;
    out.truncate(start + written);
    Ok(())
}

fn marker(key: &str) -> Value {
    let mut map = Map::new();
    map.insert(key.to_owned(), Value::Bool(true));
    Value::Object(map)
}

/// `oat-field-v1\0<event id>\0<pointer>`, with the fixed part built once.
#[derive(Debug, Default)]
pub(crate) struct FieldAad {
    bytes: Vec<u8>,
    fixed_len: usize,
}

impl FieldAad {
    pub(crate) fn new(event_id: Uuid) -> Self {
        let mut aad = Self {
            bytes: Vec::with_capacity(AAD_PREFIX.len() + 37 + 64),
            fixed_len: 0,
        };
        aad.reset(event_id);
        aad
    }

    /// Starts over for another event, keeping the buffer.
    pub(crate) fn reset(&mut self, event_id: Uuid) {
        self.bytes.clear();
        self.bytes.extend_from_slice(AAD_PREFIX);
        let mut id = Uuid::encode_buffer();
        self.bytes
            .extend_from_slice(event_id.hyphenated().encode_lower(&mut id).as_bytes());
        self.bytes.push(0);
        self.fixed_len = self.bytes.len();
    }

    pub(crate) fn for_field(&mut self, pointer: &str) -> &[u8] {
        self.bytes.truncate(self.fixed_len);
        self.bytes.extend_from_slice(pointer.as_bytes());
        &self.bytes
    }
}

struct RevealWalk<'a, 'k> {
    aad: FieldAad,
    keys: &'a dyn Fn(&str) -> KeyLookup<'k>,
    buffer: Vec<u8>,
    /// The pointer of the value being visited.
    path: String,
    revealed: Revealed,
}

impl RevealWalk<'_, '_> {
    fn visit(&mut self, value: &mut Value) -> Result<(), ProtectError> {
        if is_envelope(value) {
            let Some(plain) = self.open(value)? else {
                *value = marker(ERASED_KEY);
                self.revealed.erased += 1;
                return Ok(());
            };
            *value = plain;
            self.revealed.decrypted += 1;
            // A protected parent may hold protected children.
            return self.visit(value);
        }
        let depth = self.path.len();
        match value {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    push_token(&mut self.path, key);
                    self.visit(child)?;
                    self.path.truncate(depth);
                }
            }
            Value::Array(items) => {
                for (index, child) in items.iter_mut().enumerate() {
                    // Writing to a String cannot fail.
                    let _ = write!(self.path, "/{index}");
                    self.visit(child)?;
                    self.path.truncate(depth);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The decrypted value, or `None` when its key was erased.
    fn open(&mut self, envelope: &Value) -> Result<Option<Value>, ProtectError> {
        let malformed = |reason| ProtectError::Malformed {
            pointer: self.path.clone(),
            reason,
        };
        let Some(fields) = envelope[ENVELOPE_KEY].as_object() else {
            return Err(malformed("\"$enc\" is not an object"));
        };
        if fields.len() != 4 {
            return Err(malformed("\"$enc\" must hold exactly v, kid, n and c"));
        }
        if fields.get("v").and_then(Value::as_u64) != Some(ENVELOPE_VERSION) {
            return Err(malformed(
                "unsupported envelope version (this build reads v = 1)",
            ));
        }
        let text = |name| fields.get(name).and_then(Value::as_str);
        let (Some(kid), Some(nonce_b64), Some(sealed_b64)) = (text("kid"), text("n"), text("c"))
        else {
            return Err(malformed("kid, n and c must be strings"));
        };
        let mut nonce = [0u8; NONCE_LEN];
        let nonce_ok = matches!(BASE64.decode_slice(nonce_b64, &mut nonce), Ok(NONCE_LEN));
        if !nonce_ok {
            return Err(malformed("n is not a base64 96-bit nonce"));
        }
        self.buffer.clear();
        if BASE64.decode_vec(sealed_b64, &mut self.buffer).is_err() || self.buffer.len() < TAG_LEN {
            return Err(malformed("c is not base64 ciphertext with its tag"));
        }
        let key = match (self.keys)(kid) {
            KeyLookup::Found(key) => key,
            KeyLookup::Erased => return Ok(None),
            KeyLookup::Missing => {
                return Err(ProtectError::MissingKey {
                    pointer: self.path.clone(),
                    kid: kid.to_owned(),
                })
            }
        };
        let aad = self.aad.for_field(&self.path);
        if key
            .cipher()
            .decrypt_in_place(Nonce::from_slice(&nonce), aad, &mut self.buffer)
            .is_err()
        {
            return Err(ProtectError::Integrity {
                pointer: self.path.clone(),
                kid: kid.to_owned(),
            });
        }
        let plain = serde_json::from_slice(&self.buffer)
            .map_err(|_| malformed("the decrypted value is not json"))?;
        Ok(Some(plain))
    }
}

#[cfg(test)]
#[path = "cipher_tests.rs"]
mod tests;
