//! Protecting a payload straight from its JSON text, on the ingest path:
//! the stored form that `protect_payload` then `canonical::write_value`
//! give for the parsed payload, without building a `serde_json::Value`.
//!
//! Two phases, because the data key depends on the payload's subject and
//! keys are resolved for a whole batch at once:
//!
//! 1. [`PayloadBatch::scan`] canonicalises the payload (the single pass of
//!    [`crate::canonical`]) and records where the protected fields and the
//!    subject are in its output, and [`PayloadBatch::subject`] reads the
//!    subject as [`Policy::subject_from`](super::Policy::subject_from) would;
//! 2. [`PayloadBatch::seal`] encrypts (or erases) the recorded fields and
//!    writes the stored form: the canonical text with each field's value
//!    replaced by its envelope.
//!
//! The reference path ([`reference_form`]: parse, `protect_payload` or
//! `erase_fields`, `write_value`) stays the definition. Payloads the single
//! pass does not handle go to it: invalid JSON (for serde_json's message),
//! a `$enc` key, a number without canonical form (the error depends on
//! where it is), or a field list naming a pointer twice or reaching into an
//! envelope written for an earlier field. Producers never send those.

use std::ops::Range;

use rand::{CryptoRng, RngCore};
use serde_json::Value;
use uuid::Uuid;

use super::blind::{token_of_json, token_of_str, BlindIndexKey};
use super::cipher::{
    erase_fields, find_envelope, protect_payload_with, write_envelope, FieldAad, ENVELOPE_KEY,
    ERASED_JSON, ERASED_KEY,
};
use super::error::ProtectError;
use super::keys::DataKey;
use super::policy::{is_valid_subject, subject_at, BlindIndexRule, Pointer};
use crate::canonical::{
    uses_private_keys, write_value, CanonicalError, Canonicalizer, PathTrie, Slot, Stop, Substitute,
};

/// The protected fields of an event type, with the blind indexes and the
/// subject pointer, compiled for [`PayloadBatch`]. [`super::Policy`] builds
/// one per field list (`Policy::plan_for`).
#[derive(Debug, Clone)]
pub struct FieldPlan {
    /// The fields in the order given: the order they are encrypted in.
    fields: Vec<Pointer>,
    /// Every blind-index rule (the reference path filters them itself).
    rules: Vec<BlindIndexRule>,
    /// For each field: the indexes in `rules` of those naming it.
    field_rules: Vec<Vec<usize>>,
    subject: Option<Pointer>,
    /// The fields that get encrypted and the subject, as a trie.
    paths: PathTrie,
    /// For each trie node: the field recorded there.
    node_fields: Vec<Option<usize>>,
    subject_node: Option<u32>,
    /// Every payload takes the reference path (see the module docs).
    reference_only: bool,
}

impl FieldPlan {
    /// Compiles `fields` (in the order they are encrypted), the blind-index
    /// rules that may name them and the subject pointer.
    pub fn new<'p>(
        fields: impl IntoIterator<Item = &'p Pointer>,
        blind_indexes: &[BlindIndexRule],
        subject: Option<&Pointer>,
    ) -> Self {
        let fields: Vec<Pointer> = fields.into_iter().cloned().collect();
        let field_rules = fields
            .iter()
            .map(|field| {
                let naming =
                    |(_, rule): &(usize, &BlindIndexRule)| rule.field.as_str() == field.as_str();
                blind_indexes
                    .iter()
                    .enumerate()
                    .filter(naming)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let mut paths = PathTrie::default();
        let mut recorded = Vec::new();
        let mut reference_only = false;
        for (index, field) in fields.iter().enumerate() {
            match earlier_fields(&fields[..index], field) {
                Earlier::None => recorded.push((paths.insert(field.steps()), index)),
                // Inside an earlier field's envelope: never found (the
                // value was replaced), unless it names the envelope itself.
                Earlier::Ancestor { next_token } => {
                    reference_only |= next_token == ENVELOPE_KEY || next_token == ERASED_KEY;
                }
                Earlier::Same => reference_only = true,
            }
        }
        let subject_node = subject.map(|pointer| paths.insert(pointer.steps()));
        let mut node_fields = vec![None; paths.len()];
        for (node, field) in recorded {
            node_fields[node as usize] = Some(field);
        }
        Self {
            fields,
            rules: blind_indexes.to_vec(),
            field_rules,
            subject: subject.cloned(),
            paths,
            node_fields,
            subject_node,
            reference_only,
        }
    }

    /// The fields, in the order they are encrypted.
    pub fn fields(&self) -> &[Pointer] {
        &self.fields
    }

    fn field_at(&self, node: u32) -> Option<usize> {
        self.node_fields.get(node as usize).copied().flatten()
    }
}

enum Earlier<'f> {
    None,
    /// An earlier field holds this one; `next_token` is this one's token
    /// inside it.
    Ancestor {
        next_token: &'f str,
    },
    Same,
}

fn earlier_fields<'f>(earlier: &[Pointer], field: &'f Pointer) -> Earlier<'f> {
    let tokens = field.tokens();
    for other in earlier {
        let prefix = other.tokens();
        if prefix == tokens {
            return Earlier::Same;
        }
        if tokens.starts_with(prefix) {
            return Earlier::Ancestor {
                next_token: &tokens[prefix.len()],
            };
        }
    }
    Earlier::None
}

/// How to store the protected fields of a payload.
#[derive(Clone, Copy)]
pub enum Treatment<'k> {
    /// No protection: the canonical form only (no plan was given, or the
    /// fields stay as they are).
    Plain,
    /// Encrypt each field under `key`, with blind-index tokens if `blind`.
    Encrypt {
        key: &'k DataKey,
        blind: Option<&'k BlindIndexKey>,
    },
    /// The subject was erased: each field becomes `{"$erased":true}`.
    Erase,
}

/// Why a payload has no stored form. Each is the producer's fault.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// An object starts with one of serde_json's private keys, which
    /// serde_json would read as something else.
    #[error("the payload uses the reserved key prefix `$serde_json::private::`")]
    Reserved,
    /// Not JSON (serde_json's message).
    #[error("{0}")]
    NotJson(String),
    /// A `$enc` object, or a field that cannot be encrypted.
    #[error(transparent)]
    Protect(#[from] ProtectError),
    /// The stored form has no canonical JSON.
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
}

/// A payload in stored form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sealed {
    /// The canonical JSON, protected fields replaced.
    pub text: String,
    /// How many fields were encrypted.
    pub encrypted: usize,
    /// `name:hex` tokens of the blind-indexed fields among them, in the
    /// order of the fields, then of the rules.
    pub blind_tokens: Vec<String>,
}

/// A payload after [`PayloadBatch::scan`].
pub struct Scanned<'a> {
    json: &'a str,
    plan: Option<&'a FieldPlan>,
    outcome: Outcome,
}

enum Outcome {
    /// Its canonical text and recorded values, in the batch.
    Fast {
        text: Range<usize>,
        slots: Range<usize>,
    },
    Reserved,
    /// Left to the reference path: the parsed payload, or serde_json's error.
    Reference(Result<Value, String>),
}

impl Scanned<'_> {
    /// Why the payload cannot be stored at all, whatever its protection:
    /// it is not JSON, or serde_json would misread it.
    pub fn error(&self) -> Option<PayloadError> {
        match &self.outcome {
            Outcome::Reserved => Some(PayloadError::Reserved),
            Outcome::Reference(Err(message)) => Some(PayloadError::NotJson(message.clone())),
            Outcome::Fast { .. } | Outcome::Reference(Ok(_)) => None,
        }
    }
}

/// Scratch space of [`PayloadBatch::scan`] and [`PayloadBatch::seal`]:
/// the canonical texts and recorded values of a batch's payloads. Keep one
/// and [`clear`](Self::clear) it between batches, so that a warmed-up
/// batch does not allocate except for what it returns.
#[derive(Debug, Default)]
pub struct PayloadBatch {
    canonicalizer: Canonicalizer,
    /// The canonical texts of the scanned payloads, one after the other.
    text: Vec<u8>,
    slots: Vec<Slot>,
    /// The event being sealed: its live fields in field order.
    live: Vec<LiveField>,
    /// The envelopes (or markers) of `live`.
    envelopes: Vec<u8>,
    /// Indexes into `live`.
    nested: Vec<usize>,
    substitutes: Vec<Substitute>,
    plaintext: Vec<u8>,
    /// A field's canonical form with its nested fields' envelopes.
    canonical: Vec<u8>,
    aad: FieldAad,
}

#[derive(Debug, Clone)]
struct LiveField {
    /// Index in `PayloadBatch::slots`.
    slot: usize,
    /// Index in `FieldPlan::fields`.
    field: usize,
    /// Its envelope in `PayloadBatch::envelopes`.
    envelope: Range<usize>,
}

/// Scratch buffers larger than this are released by `clear`.
const KEEP_SCRATCH: usize = 4 << 20;

impl PayloadBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the scanned payloads (their [`Scanned`] must not be sealed
    /// after this).
    pub fn clear(&mut self) {
        self.text.clear();
        self.slots.clear();
        if self.text.capacity() > KEEP_SCRATCH {
            self.text = Vec::new();
        }
        if self.slots.capacity() * std::mem::size_of::<Slot>() > KEEP_SCRATCH {
            self.slots = Vec::new();
        }
    }

    /// Phase 1: canonicalises `json` and finds the fields of `plan` and its
    /// subject. Without a plan, the payload is only canonicalised (and may
    /// hold `$enc` keys).
    pub fn scan<'a>(&mut self, json: &'a str, plan: Option<&'a FieldPlan>) -> Scanned<'a> {
        let outcome = match plan {
            Some(plan) if plan.reference_only => reference_outcome(json),
            _ => self.scan_fast(json, plan),
        };
        Scanned {
            json,
            plan,
            outcome,
        }
    }

    fn scan_fast(&mut self, json: &str, plan: Option<&FieldPlan>) -> Outcome {
        static NO_PATHS: PathTrie = PathTrie::new();
        let text_start = self.text.len();
        let slots_start = self.slots.len();
        let (paths, refuse) = match plan {
            Some(plan) => (&plan.paths, Some(ENVELOPE_KEY.as_bytes())),
            None => (&NO_PATHS, None),
        };
        let scanned = self
            .canonicalizer
            .scan(json, paths, refuse, &mut self.text, &mut self.slots);
        match scanned {
            Ok(()) => Outcome::Fast {
                text: text_start..self.text.len(),
                slots: slots_start..self.slots.len(),
            },
            Err(stop) => {
                self.text.truncate(text_start);
                self.slots.truncate(slots_start);
                match stop {
                    // The scan saw the same as `uses_private_keys` up to here.
                    Stop::PrivateKey => Outcome::Reserved,
                    Stop::Syntax | Stop::Range | Stop::RefusedKey => reference_outcome(json),
                }
            }
        }
    }

    /// The subject at the plan's subject pointer, as `Policy::subject_from`
    /// reads it from the parsed payload: a non-empty string or an integer.
    pub fn subject(&self, scanned: &Scanned<'_>) -> Option<String> {
        let plan = scanned.plan?;
        let slots = match &scanned.outcome {
            Outcome::Fast { slots, .. } => slots.clone(),
            Outcome::Reference(Ok(payload)) => return subject_at(plan.subject.as_ref()?, payload),
            Outcome::Reference(Err(_)) | Outcome::Reserved => return None,
        };
        let node = plan.subject_node?;
        let slot = self.slots[slots]
            .iter()
            .find(|slot| slot.alive && slot.node == node)?;
        let subject = match self.text.get(slot.out.start)? {
            b'"' => decode_canonical_str(&self.text[slot.out.clone()], Vec::new())?,
            b'-' | b'0'..=b'9' => {
                // serde_json keeps an integer's literal; is_i64/is_u64 parse it.
                let literal = &scanned.json[slot.src.clone()];
                let integer = literal.parse::<i64>().is_ok() || literal.parse::<u64>().is_ok();
                if !integer {
                    return None;
                }
                literal.to_owned()
            }
            _ => return None,
        };
        is_valid_subject(&subject).then_some(subject)
    }

    /// Phase 2: the stored form of a payload of this batch, its fields
    /// treated as `treatment` says (nonces from `rng`). The same bytes,
    /// tokens and errors as [`reference_form`], nonces aside.
    pub fn seal<R: RngCore + CryptoRng>(
        &mut self,
        scanned: Scanned<'_>,
        treatment: Treatment<'_>,
        event_id: Uuid,
        rng: &mut R,
    ) -> Result<Sealed, PayloadError> {
        match scanned.outcome {
            Outcome::Fast {
                ref text,
                ref slots,
            } => {
                let (text, slots) = (text.clone(), slots.clone());
                self.seal_fast(&scanned, text, slots, treatment, event_id, rng)
            }
            Outcome::Reserved => Err(PayloadError::Reserved),
            Outcome::Reference(Err(message)) => Err(PayloadError::NotJson(message)),
            Outcome::Reference(Ok(payload)) => {
                reference_from_value(payload, scanned.plan, treatment, event_id, rng)
            }
        }
    }

    fn seal_fast<R: RngCore + CryptoRng>(
        &mut self,
        scanned: &Scanned<'_>,
        text: Range<usize>,
        slots: Range<usize>,
        treatment: Treatment<'_>,
        event_id: Uuid,
        rng: &mut R,
    ) -> Result<Sealed, PayloadError> {
        self.live.clear();
        if let Some(plan) = scanned.plan {
            for (index, slot) in self.slots[slots.clone()].iter().enumerate() {
                let Some(field) = plan.field_at(slot.node).filter(|_| slot.alive) else {
                    continue;
                };
                self.live.push(LiveField {
                    slot: slots.start + index,
                    field,
                    envelope: 0..0,
                });
            }
        }
        // One live value per path: fields are distinct.
        self.live.sort_unstable_by_key(|live| live.field);
        self.envelopes.clear();
        let mut sealed = Sealed::default();
        match (treatment, scanned.plan) {
            (Treatment::Plain, _) | (_, None) => self.live.clear(),
            (Treatment::Erase, Some(_)) => {
                for live in &mut self.live {
                    let start = self.envelopes.len();
                    self.envelopes.extend_from_slice(ERASED_JSON);
                    live.envelope = start..self.envelopes.len();
                }
            }
            (Treatment::Encrypt { key, blind }, Some(plan)) => {
                if key.id().bytes().any(|b| b < 0x20) {
                    // Escaped differently in plaintexts: not worth a path.
                    return reference_form(scanned.json, Some(plan), treatment, event_id, rng);
                }
                self.aad.reset(event_id);
                for n in 0..self.live.len() {
                    self.encrypt_field(scanned.json, plan, n, key, blind, rng, &mut sealed)?;
                }
            }
        }
        self.assemble(text, &mut sealed)?;
        Ok(sealed)
    }

    /// Encrypts `live[n]`, whose nested fields (earlier in field order)
    /// already have their envelopes, as `protect_payload` does in turn.
    #[allow(clippy::too_many_arguments)]
    fn encrypt_field<R: RngCore + CryptoRng>(
        &mut self,
        json: &str,
        plan: &FieldPlan,
        n: usize,
        key: &DataKey,
        blind: Option<&BlindIndexKey>,
        rng: &mut R,
        sealed: &mut Sealed,
    ) -> Result<(), PayloadError> {
        let (slot_index, field) = (self.live[n].slot, self.live[n].field);
        let out = self.slots[slot_index].out.clone();
        let src = self.slots[slot_index].src.clone();
        let pointer = &plan.fields[field];
        self.find_nested(out.clone(), n);

        let rules = &plan.field_rules[field];
        if let (Some(blind), false) = (blind, rules.is_empty()) {
            let value = &self.text[out.clone()];
            if value.first() == Some(&b'"') {
                let buffer = std::mem::take(&mut self.canonical);
                let decoded = decode_canonical_str(value, buffer).unwrap_or_default();
                for &rule in rules {
                    sealed
                        .blind_tokens
                        .push(token_of_str(blind, &plan.rules[rule], &decoded));
                }
                self.canonical = decoded.into_bytes();
            } else {
                self.splice_nested(out.clone());
                for &rule in rules {
                    sealed.blind_tokens.push(token_of_json(
                        blind,
                        &plan.rules[rule],
                        &self.canonical,
                    ));
                }
            }
        }

        self.substitutes.clear();
        for &m in &self.nested {
            let live = &self.live[m];
            self.substitutes.push(Substitute {
                src: self.slots[live.slot].src.clone(),
                bytes: live.envelope.clone(),
            });
        }
        self.plaintext.clear();
        self.canonicalizer
            .compact(
                json,
                src,
                &self.substitutes,
                &self.envelopes,
                &mut self.plaintext,
            )
            .map_err(|_| ProtectError::Canonical {
                pointer: pointer.to_string(),
                message: "cannot write the value as json (internal error)".to_owned(),
            })?;
        let start = self.envelopes.len();
        let aad = self.aad.for_field(pointer.as_str());
        write_envelope(key, aad, &mut self.plaintext, rng, &mut self.envelopes).map_err(
            |reason| ProtectError::Encrypt {
                pointer: pointer.to_string(),
                reason,
            },
        )?;
        self.live[n].envelope = start..self.envelopes.len();
        sealed.encrypted += 1;
        Ok(())
    }

    /// Sets `nested` to the outermost of `live[..upto]` inside `range` of
    /// the text, in text order.
    fn find_nested(&mut self, range: Range<usize>, upto: usize) {
        let slots = &self.slots;
        let out = |m: usize| &slots[self.live[m].slot].out;
        let inside = |inner: &Range<usize>, outer: &Range<usize>| {
            outer.start <= inner.start && inner.end <= outer.end && inner != outer
        };
        self.nested.clear();
        for m in 0..upto {
            if !inside(out(m), &range) {
                continue;
            }
            let covered =
                (0..upto).any(|k| k != m && inside(out(m), out(k)) && inside(out(k), &range));
            if !covered {
                self.nested.push(m);
            }
        }
        let live = &self.live;
        self.nested
            .sort_unstable_by_key(|&m| slots[live[m].slot].out.start);
    }

    /// Sets `canonical` to `text[range]` with `nested` replaced by their
    /// envelopes.
    fn splice_nested(&mut self, range: Range<usize>) {
        self.canonical.clear();
        let mut cursor = range.start;
        for &m in &self.nested {
            let live = &self.live[m];
            let out = &self.slots[live.slot].out;
            self.canonical
                .extend_from_slice(&self.text[cursor..out.start]);
            self.canonical
                .extend_from_slice(&self.envelopes[live.envelope.clone()]);
            cursor = out.end;
        }
        self.canonical
            .extend_from_slice(&self.text[cursor..range.end]);
    }

    /// Writes `text` with the outermost live fields replaced into `sealed`.
    fn assemble(&mut self, text: Range<usize>, sealed: &mut Sealed) -> Result<(), PayloadError> {
        self.find_nested(text.clone(), self.live.len());
        let mut len = text.len();
        for &m in &self.nested {
            let live = &self.live[m];
            len = len - self.slots[live.slot].out.len() + live.envelope.len();
        }
        let mut out = Vec::with_capacity(len);
        let mut cursor = text.start;
        for &m in &self.nested {
            let live = &self.live[m];
            let slot = &self.slots[live.slot];
            out.extend_from_slice(&self.text[cursor..slot.out.start]);
            out.extend_from_slice(&self.envelopes[live.envelope.clone()]);
            cursor = slot.out.end;
        }
        out.extend_from_slice(&self.text[cursor..text.end]);
        sealed.text = String::from_utf8(out).map_err(|e| {
            CanonicalError::Json(serde::de::Error::custom(format!("stored form: {e}")))
        })?;
        Ok(())
    }
}

/// Decodes a canonical JSON string (only `\"`, `\\` and `\u00XX` escapes),
/// reusing `buffer`.
fn decode_canonical_str(quoted: &[u8], mut buffer: Vec<u8>) -> Option<String> {
    buffer.clear();
    let inner = quoted.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut i = 0;
    while let Some(&b) = inner.get(i) {
        if b != b'\\' {
            buffer.push(b);
            i += 1;
            continue;
        }
        match inner.get(i + 1)? {
            b'u' => {
                let hex = std::str::from_utf8(inner.get(i + 2..i + 6)?).ok()?;
                buffer.push(u8::from_str_radix(hex, 16).ok()?);
                i += 6;
            }
            &escaped => {
                buffer.push(escaped);
                i += 2;
            }
        }
    }
    String::from_utf8(buffer).ok()
}

fn reference_outcome(json: &str) -> Outcome {
    if reserved(json) {
        return Outcome::Reserved;
    }
    Outcome::Reference(serde_json::from_str(json).map_err(|e| e.to_string()))
}

/// Whether serde_json would misread `json` (see `uses_private_keys`); the
/// text search spares most payloads the check.
fn reserved(json: &str) -> bool {
    (json.contains("private") || json.contains("\\u")) && uses_private_keys(json)
}

/// The stored form by the reference path: the payload parsed into a
/// `Value`, its fields encrypted by `protect_payload` (or erased), then
/// written by `write_value`. What [`PayloadBatch`] must match.
pub fn reference_form<R: RngCore + CryptoRng>(
    json: &str,
    plan: Option<&FieldPlan>,
    treatment: Treatment<'_>,
    event_id: Uuid,
    rng: &mut R,
) -> Result<Sealed, PayloadError> {
    if reserved(json) {
        return Err(PayloadError::Reserved);
    }
    let payload = serde_json::from_str(json).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    reference_from_value(payload, plan, treatment, event_id, rng)
}

fn reference_from_value<R: RngCore + CryptoRng>(
    mut payload: Value,
    plan: Option<&FieldPlan>,
    treatment: Treatment<'_>,
    event_id: Uuid,
    rng: &mut R,
) -> Result<Sealed, PayloadError> {
    let mut sealed = Sealed::default();
    match (treatment, plan) {
        (Treatment::Plain, _) | (_, None) => {}
        (Treatment::Encrypt { key, blind }, Some(plan)) => {
            let blind = blind.map(|key| (key, plan.rules.as_slice()));
            let protected =
                protect_payload_with(&mut payload, event_id, plan.fields.iter(), key, blind, rng)?;
            sealed.encrypted = protected.fields.len();
            sealed.blind_tokens = protected.blind_tokens;
        }
        (Treatment::Erase, Some(plan)) => {
            if let Some(pointer) = find_envelope(&payload) {
                return Err(ProtectError::AlreadyProtected { pointer }.into());
            }
            erase_fields(&mut payload, plan.fields.iter());
        }
    }
    let mut out = Vec::new();
    write_value(&payload, &mut out)?;
    sealed.text = String::from_utf8(out)
        .map_err(|e| CanonicalError::Json(serde::de::Error::custom(format!("stored form: {e}"))))?;
    Ok(sealed)
}

#[cfg(test)]
#[path = "text_tests.rs"]
mod tests;
