use std::collections::BTreeMap;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::Nonce;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::protect::policy::{Normalize, Policy};

fn pointer(raw: &str) -> Pointer {
    Pointer::parse(raw).expect("valid pointer")
}

fn rule(name: &str, field: &str, normalize: Normalize) -> BlindIndexRule {
    BlindIndexRule {
        name: name.to_owned(),
        field: pointer(field),
        normalize,
    }
}

fn blind_key() -> BlindIndexKey {
    BlindIndexKey::from_bytes(&[7; 32]).expect("blind key")
}

/// Both paths on one payload, with nonces from the same seed: the results
/// must be identical, byte for byte, error for error.
struct Both {
    new: Result<Sealed, PayloadError>,
    reference: Result<Sealed, PayloadError>,
    fast: bool,
}

fn seal_one(
    batch: &mut PayloadBatch,
    json: &str,
    plan: Option<&FieldPlan>,
    treatment: Treatment<'_>,
    event_id: Uuid,
    seed: u64,
) -> Both {
    batch.clear();
    let scanned = batch.scan(json, plan);
    let fast = matches!(scanned.outcome, Outcome::Fast { .. });
    let new = batch.seal(
        scanned,
        treatment,
        event_id,
        &mut StdRng::seed_from_u64(seed),
    );
    let reference = reference_form(
        json,
        plan,
        treatment,
        event_id,
        &mut StdRng::seed_from_u64(seed),
    );
    Both {
        new,
        reference,
        fast,
    }
}

fn assert_same(both: &Both, what: &str) {
    match (&both.new, &both.reference) {
        (Ok(new), Ok(reference)) => assert_eq!(new, reference, "{what}"),
        (Err(new), Err(reference)) => {
            assert_eq!(new.to_string(), reference.to_string(), "{what}");
            assert_eq!(
                std::mem::discriminant(new),
                std::mem::discriminant(reference),
                "{what}"
            );
        }
        (new, reference) => panic!("{what}:\n new {new:?}\n reference {reference:?}"),
    }
}

/// `Policy::subject_from` on the parsed payload (`None` if it does not
/// parse or serde_json would misread it).
fn reference_subject(json: &str, plan: &FieldPlan) -> Option<String> {
    if reserved(json) {
        return None;
    }
    let payload: Value = serde_json::from_str(json).ok()?;
    subject_at(plan.subject.as_ref()?, &payload)
}

#[test]
fn default_policy_on_an_order() {
    let policy = Policy::default_policy();
    let plan = policy.plan_for("order.created");
    let key = DataKey::generate();
    let blind = blind_key();
    let json = r#"{"customer": {"id": "customer-7", "name": "Zoë \"Z\" Doe",
        "email": " Zoe@Example.com ", "phone": "+44 20 7946 0000",
        "address": {"line1": "1 Main St", "city": "Leeds", "postal_code": "LS1", "country": "GB"}},
        "items": [{"sku": "A-1", "quantity": 2, "unit_price_cents": 1250}],
        "total_cents": 2500, "currency": "EUR"}"#;
    let event_id = Uuid::new_v4();
    let mut batch = PayloadBatch::new();
    let scanned = batch.scan(json, Some(plan));
    assert_eq!(batch.subject(&scanned).as_deref(), Some("customer-7"));
    let treatment = Treatment::Encrypt {
        key: &key,
        blind: Some(&blind),
    };
    let both = seal_one(&mut batch, json, Some(plan), treatment, event_id, 1);
    assert!(both.fast);
    assert_same(&both, "order");
    let sealed = both.new.expect("sealed");
    assert_eq!(sealed.encrypted, 4);
    assert_eq!(sealed.blind_tokens.len(), 1);
    assert!(sealed.blind_tokens[0].starts_with("email:"));
    assert!(!sealed.text.contains("Main St") && !sealed.text.contains("Zoë"));
    assert!(sealed.text.contains(r#""total_cents":25e2"#));

    let erased = seal_one(&mut batch, json, Some(plan), Treatment::Erase, event_id, 1);
    assert_same(&erased, "erased order");
    let text = erased.new.expect("erased").text;
    assert!(text.contains(r#""email":{"$erased":true}"#), "{text}");
}

#[test]
fn plaintexts_are_serde_json_output() {
    // Numbers as serde_json keeps them (`E` and a missing exponent sign
    // normalised), its escapes, keys sorted, the last duplicate kept.
    let key = DataKey::generate();
    let fields = [pointer("/v")];
    let plan = FieldPlan::new(&fields, &[], None);
    let cases = [
        (r#"{"v": 1E2}"#, "1e+2"),
        (r#"{"v": -0.50e-0}"#, "-0.50e-0"),
        (r#"{"v": -0}"#, "-0"),
        (r#"{"v": 100}"#, "100"),
        (
            r#"{"v": "\/\b\f\n\r\t\u0001\u007f\u00e9\ud83d\ude00\"\\"}"#,
            "\"/\\b\\f\\n\\r\\t\\u0001\u{7f}é😀\\\"\\\\\"",
        ),
        (
            r#"{"v": {"b": 1, "a": [true, null], "b": {"\u0063": 2.0}}}"#,
            r#"{"a":[true,null],"b":{"c":2.0}}"#,
        ),
    ];
    let event_id = Uuid::new_v4();
    let mut batch = PayloadBatch::new();
    for (json, plaintext) in cases {
        batch.clear();
        let scanned = batch.scan(json, Some(&plan));
        let sealed = batch
            .seal(
                scanned,
                Treatment::Encrypt {
                    key: &key,
                    blind: None,
                },
                event_id,
                &mut rand::thread_rng(),
            )
            .expect("sealed");
        let stored: Value = serde_json::from_str(&sealed.text).expect("json");
        assert_eq!(
            open(&key, event_id, "/v", &stored["v"]),
            plaintext.as_bytes(),
            "{json}"
        );
    }
}

/// Decrypts an envelope to its plaintext bytes.
fn open(key: &DataKey, event_id: Uuid, pointer: &str, envelope: &Value) -> Vec<u8> {
    let fields = &envelope[ENVELOPE_KEY];
    assert_eq!(fields["kid"].as_str(), Some(key.id()));
    let nonce = BASE64
        .decode(fields["n"].as_str().expect("n"))
        .expect("nonce");
    let mut buffer = BASE64.decode(fields["c"].as_str().expect("c")).expect("c");
    let mut aad = FieldAad::new(event_id);
    key.cipher()
        .decrypt_in_place(
            Nonce::from_slice(&nonce),
            aad.for_field(pointer),
            &mut buffer,
        )
        .expect("authentic");
    buffer
}

/// The property: on random payloads, plans and treatments, the single pass
/// gives exactly what the reference path gives (nonces from the same seed),
/// and reads the same subject.
#[test]
fn single_pass_equals_reference_on_random_payloads() {
    const DOCS: usize = 6_000;
    let mut rng = StdRng::seed_from_u64(0x0a7_2026);
    let mut generator = Generator::new(0x5eed);
    let key = DataKey::generate_with_id("0192b9c4-7d3e-7a51-9f00-5a1b2c3d4e5f");
    let blind = blind_key();
    let mut batch = PayloadBatch::new();
    let mut stats = Stats::default();
    for n in 0..DOCS {
        let plan = random_plan(&mut rng);
        let json = generator.document_for(Some(&plan));
        let event_id = Uuid::from_u128(rng.gen());
        let seed = rng.gen();
        let treatments = [
            Treatment::Encrypt {
                key: &key,
                blind: Some(&blind),
            },
            Treatment::Encrypt {
                key: &key,
                blind: None,
            },
            Treatment::Erase,
            Treatment::Plain,
        ];
        for (t, treatment) in treatments.into_iter().enumerate() {
            let what = format!(
                "document {n}, treatment {t}, plan {:?}:\n{json}",
                plan.fields
            );
            let both = seal_one(&mut batch, &json, Some(&plan), treatment, event_id, seed);
            assert_same(&both, &what);
            stats.count(&both, t == 0);
        }
        let without = seal_one(&mut batch, &json, None, Treatment::Plain, event_id, seed);
        assert_same(&without, &format!("document {n} without a plan:\n{json}"));

        batch.clear();
        let scanned = batch.scan(&json, Some(&plan));
        stats.slots(&batch, &plan, &scanned);
        assert_eq!(
            batch.subject(&scanned),
            reference_subject(&json, &plan),
            "subject of document {n}, plan {:?}:\n{json}",
            plan.subject
        );
        stats.subjects += usize::from(batch.subject(&scanned).is_some());
    }
    println!("{stats:#?}");
    assert!(stats.fast * 2 > DOCS, "most payloads take the single pass");
    assert!(stats.fast_encrypted * 3 > DOCS, "the single pass encrypts");
    assert!(
        stats.dead_fields > 200,
        "dropped duplicates: {}",
        stats.dead_fields
    );
    assert!(
        stats.in_arrays > 200,
        "fields in arrays: {}",
        stats.in_arrays
    );
    assert_eq!(
        stats.field_types.len(),
        7,
        "every JSON type protected: {:?}",
        stats.field_types
    );
    assert!(
        stats.field_types.values().all(|&n| n > 100),
        "{:?}",
        stats.field_types
    );
    assert!(stats.encrypted_fields > DOCS, "fields get encrypted");
    assert!(stats.nested > 50, "fields inside fields: {}", stats.nested);
    assert!(stats.tokens > 500, "blind tokens: {}", stats.tokens);
    assert!(stats.subjects > 200, "subjects: {}", stats.subjects);
    for (error, count) in &stats.errors {
        assert!(*count > 10, "{error}: {count}");
    }
    assert_eq!(
        stats.errors.len(),
        4,
        "every kind of error: {:?}",
        stats.errors
    );
}

/// Many payloads scanned into one batch before any is sealed, as the
/// store does, with the nonces of production.
#[test]
fn a_batch_seals_each_payload_as_the_reference_does() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut generator = Generator::new(12);
    let key = DataKey::generate();
    let blind = blind_key();
    let plans: Vec<FieldPlan> = (0..8).map(|_| random_plan(&mut rng)).collect();
    let mut batch = PayloadBatch::new();
    let mut compared = 0;
    for _ in 0..100 {
        let docs: Vec<(String, usize, Uuid)> = (0..30)
            .map(|_| {
                let plan = rng.gen_range(0..plans.len());
                let json = if rng.gen_bool(0.8) {
                    generator.document_for(Some(&plans[plan]))
                } else {
                    generator.document()
                };
                (json, plan, Uuid::new_v4())
            })
            .collect();
        batch.clear();
        let scans: Vec<Scanned<'_>> = docs
            .iter()
            .map(|(json, plan, _)| batch.scan(json, Some(&plans[*plan])))
            .collect();
        for (scanned, (json, plan, event_id)) in scans.into_iter().zip(&docs) {
            let treatment = Treatment::Encrypt {
                key: &key,
                blind: Some(&blind),
            };
            let plan = &plans[*plan];
            let new = batch.seal(scanned, treatment, *event_id, &mut rand::thread_rng());
            let reference = reference_form(
                json,
                Some(plan),
                treatment,
                *event_id,
                &mut rand::thread_rng(),
            );
            match (new, reference) {
                (Ok(new), Ok(reference)) => {
                    assert_eq!(new.encrypted, reference.encrypted);
                    assert_eq!(new.blind_tokens, reference.blind_tokens);
                    assert_eq!(
                        without_nonces(&key, *event_id, &new.text),
                        without_nonces(&key, *event_id, &reference.text),
                        "{json}"
                    );
                    compared += 1;
                }
                (Err(new), Err(reference)) => assert_eq!(new.to_string(), reference.to_string()),
                (new, reference) => panic!("{json}:\n new {new:?}\n reference {reference:?}"),
            }
        }
    }
    assert!(compared > 1_000, "{compared}");
}

/// `text` with every envelope decrypted, recursively, and its nonce and
/// ciphertext replaced by the plaintext: equal for two runs that differ
/// only in their nonces.
fn without_nonces(key: &DataKey, event_id: Uuid, text: &str) -> String {
    let mut value: Value = serde_json::from_str(text).expect("stored form is json");
    let mut path = String::new();
    open_all(key, event_id, &mut value, &mut path);
    let mut out = Vec::new();
    write_value(&value, &mut out).expect("canonical");
    // Outside the envelopes, the text itself must be the same too.
    let mut masked = text.to_owned();
    for marker in [r#""c":""#, r#""n":""#] {
        let mut from = 0;
        while let Some(at) = masked[from..].find(marker) {
            let start = from + at + marker.len();
            let end = start + masked[start..].find('"').expect("closing quote");
            masked.replace_range(start..end, &"x".repeat(end - start));
            from = end;
        }
    }
    format!("{masked}\n{}", String::from_utf8(out).expect("utf-8"))
}

fn open_all(key: &DataKey, event_id: Uuid, value: &mut Value, path: &mut String) {
    if is_envelope(value) {
        let plaintext = open(key, event_id, path, value);
        let text = String::from_utf8(plaintext).expect("utf-8");
        let mut inner: Value = serde_json::from_str(&text).expect("plaintext is json");
        open_all(key, event_id, &mut inner, path);
        // The plaintext's own bytes, with nested envelopes opened.
        let mut opened = serde_json::Map::new();
        opened.insert("$opened".to_owned(), inner);
        opened.insert("$bytes".to_owned(), Value::String(mask_envelopes(&text)));
        *value = Value::Object(opened);
        return;
    }
    let depth = path.len();
    match value {
        Value::Object(map) => {
            for (key_name, child) in map.iter_mut() {
                crate::protect::policy::push_token(path, key_name);
                open_all(key, event_id, child, path);
                path.truncate(depth);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter_mut().enumerate() {
                path.push_str(&format!("/{index}"));
                open_all(key, event_id, child, path);
                path.truncate(depth);
            }
        }
        _ => {}
    }
}

fn is_envelope(value: &Value) -> bool {
    crate::protect::is_envelope(value)
}

fn mask_envelopes(text: &str) -> String {
    let mut masked = text.to_owned();
    for marker in [r#""c":""#, r#""n":""#] {
        let mut from = 0;
        while let Some(at) = masked[from..].find(marker) {
            let start = from + at + marker.len();
            let end = start + masked[start..].find('"').expect("closing quote");
            masked.replace_range(start..end, &"x".repeat(end - start));
            from = end;
        }
    }
    masked
}

#[derive(Debug, Default)]
struct Stats {
    fast: usize,
    reference: usize,
    /// Payloads sealed by the single pass with at least one field encrypted.
    fast_encrypted: usize,
    /// Protected values the single pass found, by JSON type (first byte).
    field_types: BTreeMap<char, usize>,
    /// Protected values in a member dropped for a later duplicate key.
    dead_fields: usize,
    /// Protected values in arrays (a pointer with an index).
    in_arrays: usize,
    encrypted_fields: usize,
    nested: usize,
    tokens: usize,
    subjects: usize,
    errors: BTreeMap<&'static str, usize>,
}

impl Stats {
    fn slots(&mut self, batch: &PayloadBatch, plan: &FieldPlan, scanned: &Scanned<'_>) {
        let Outcome::Fast { slots, .. } = &scanned.outcome else {
            return;
        };
        for slot in &batch.slots[slots.clone()] {
            let Some(field) = plan.field_at(slot.node) else {
                continue;
            };
            if !slot.alive {
                self.dead_fields += 1;
                continue;
            }
            let first = char::from(batch.text[slot.out.start]);
            let kind = if first == '-' || first.is_ascii_digit() {
                '0'
            } else {
                first
            };
            *self.field_types.entry(kind).or_default() += 1;
            if plan.fields[field].steps().any(|(_, index)| index.is_some()) {
                self.in_arrays += 1;
            }
        }
    }

    fn count(&mut self, both: &Both, first: bool) {
        if first {
            if both.fast {
                self.fast += 1;
                if both.new.as_ref().is_ok_and(|sealed| sealed.encrypted > 0) {
                    self.fast_encrypted += 1;
                }
            } else {
                self.reference += 1;
            }
        }
        match &both.reference {
            Ok(sealed) => {
                self.encrypted_fields += sealed.encrypted;
                self.tokens += sealed.blind_tokens.len();
                // An envelope inside a plaintext shows as a longer ciphertext:
                // count payloads whose plan nests fields instead.
                if sealed.encrypted > 1 && sealed.text.matches("$enc").count() < sealed.encrypted {
                    self.nested += 1;
                }
            }
            Err(error) => {
                let kind = match error {
                    PayloadError::Reserved => "reserved",
                    PayloadError::NotJson(_) => "not json",
                    PayloadError::Protect(_) => "protect",
                    PayloadError::Canonical(_) => "canonical",
                };
                *self.errors.entry(kind).or_default() += 1;
            }
        }
    }
}

/// Pointers the generator's keys can reach: nested ones, array indexes,
/// escapes, the empty key.
const POINTERS: &[&str] = &[
    "/customer/email",
    "/customer/name",
    "/customer",
    "/customer/address",
    "/customer/address/city",
    "/items/0",
    "/items/1",
    "/items/1/email",
    "/items/0/name",
    "/a",
    "/a/b",
    "/a/b/c",
    "/a~1b",
    "/m~0n",
    "/",
    "/0",
    "/0/a",
    "/é",
    "/a/0",
    "/items/01",
    "/items/-",
];

const SUBJECTS: &[&str] = &[
    "/customer/id",
    "/id",
    "/customer/email",
    "/a/b",
    "/items/0/id",
    "/customer",
];

fn random_plan(rng: &mut StdRng) -> FieldPlan {
    let count = rng.gen_range(0..6);
    let mut fields: Vec<Pointer> = Vec::new();
    for _ in 0..count {
        let raw = POINTERS[rng.gen_range(0..POINTERS.len())];
        let candidate = pointer(raw);
        // Now and then a pointer twice, or into an earlier field's envelope.
        if !fields.contains(&candidate) || rng.gen_bool(0.02) {
            fields.push(candidate);
        }
    }
    if rng.gen_bool(0.01) {
        fields.push(pointer("/customer"));
        fields.push(pointer("/customer/$enc"));
    }
    let mut rules = Vec::new();
    for (i, field) in fields.iter().enumerate() {
        if rng.gen_bool(0.4) {
            let normalize = if rng.gen_bool(0.5) {
                Normalize::Lowercase
            } else {
                Normalize::None
            };
            rules.push(rule(&format!("r{i}"), field.as_str(), normalize));
            if rng.gen_bool(0.2) {
                rules.push(rule(&format!("s{i}"), field.as_str(), Normalize::None));
            }
        }
    }
    let subject = rng
        .gen_bool(0.8)
        .then(|| pointer(SUBJECTS[rng.gen_range(0..SUBJECTS.len())]));
    FieldPlan::new(&fields, &rules, subject.as_ref())
}

/// Random payload texts aimed at the pointers above: every JSON type at
/// every path, duplicate keys, escapes, numbers in all forms, whitespace,
/// and now and then a `$enc` key, a serde_json private key, a number
/// without canonical form or a broken text.
struct Generator {
    rng: StdRng,
}

const KEYS: &[&str] = &[
    "customer", "email", "name", "address", "city", "items", "id", "a", "b", "c", "a/b", "m~n", "",
    "0", "1", "01", "é", "x", "zz", "$enc", "$erased", "A",
];

impl Generator {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn document(&mut self) -> String {
        self.document_for(None)
    }

    /// A payload that mostly holds values at the plan's pointers.
    fn document_for(&mut self, plan: Option<&FieldPlan>) -> String {
        let mut out = String::new();
        self.ws(&mut out);
        let paths: Vec<&[String]> = match plan {
            Some(plan) if self.rng.gen_bool(0.85) => plan
                .fields
                .iter()
                .chain(plan.subject.as_ref())
                .map(|p| p.tokens())
                .collect(),
            _ => Vec::new(),
        };
        if !paths.is_empty() {
            self.value_at(0, &paths, &mut out);
        } else if self.rng.gen_bool(0.95) {
            self.object(0, &mut out);
        } else {
            self.value(2, &mut out);
        }
        self.ws(&mut out);
        if self.rng.gen_bool(0.03) {
            self.corrupt(&mut out);
        }
        out
    }

    fn corrupt(&mut self, text: &mut String) {
        let boundaries: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let at = boundaries[self.rng.gen_range(0..boundaries.len())];
        match self.rng.gen_range(0..3) {
            0 => text.truncate(at),
            1 => text.insert(at, ','),
            _ => text.insert_str(at, "\\ud800"),
        }
    }

    /// A value holding `paths` (token lists, relative to it), now and then
    /// missing some; an empty path is a value of any type.
    fn value_at(&mut self, depth: usize, paths: &[&[String]], out: &mut String) {
        let deeper: Vec<&[String]> = paths.iter().filter(|p| !p.is_empty()).copied().collect();
        let here = deeper.len() < paths.len();
        if deeper.is_empty() || depth >= 6 || (here && self.rng.gen_bool(0.3)) {
            return self.value(depth.max(2), out);
        }
        let index = |token: &str| -> Option<usize> {
            let canonical = token == "0" || (!token.starts_with('0') && !token.is_empty());
            canonical.then(|| token.parse().ok()).flatten()
        };
        let as_array = deeper.iter().all(|p| index(&p[0]).is_some()) && self.rng.gen_bool(0.9);
        if as_array {
            let longest = deeper
                .iter()
                .filter_map(|p| index(&p[0]))
                .max()
                .unwrap_or(0);
            // Now and then too short to hold the last index.
            let len =
                (longest + 1 + self.rng.gen_range(0..2)).saturating_sub(self.rng.gen_range(0..2));
            out.push('[');
            for i in 0..len {
                if i > 0 {
                    out.push(',');
                    self.ws(out);
                }
                let inner: Vec<&[String]> = deeper
                    .iter()
                    .filter(|p| index(&p[0]) == Some(i))
                    .map(|p| &p[1..])
                    .collect();
                self.value_at(depth + 1, &inner, out);
            }
            out.push(']');
            return;
        }
        let mut keys: Vec<String> = deeper.iter().map(|p| p[0].clone()).collect();
        keys.dedup();
        for _ in 0..self.rng.gen_range(0..3) {
            keys.push(KEYS[self.rng.gen_range(0..KEYS.len())].to_owned());
        }
        if self.rng.gen_bool(0.2) {
            let again = keys[self.rng.gen_range(0..keys.len())].clone();
            keys.push(again);
        }
        keys.retain(|k| !k.starts_with('$') || self.rng.gen_bool(0.02));
        use rand::seq::SliceRandom;
        keys.shuffle(&mut self.rng);
        out.push('{');
        for (i, key) in keys.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            self.ws(out);
            self.spell(key, out);
            out.push(':');
            self.ws(out);
            let inner: Vec<&[String]> = deeper
                .iter()
                .filter(|p| p[0] == *key)
                .map(|p| &p[1..])
                .collect();
            if self.rng.gen_bool(0.05) {
                self.value(depth + 2, out);
            } else {
                self.value_at(depth + 1, &inner, out);
            }
        }
        out.push('}');
    }

    fn value(&mut self, depth: usize, out: &mut String) {
        let choice = if depth >= 4 {
            self.rng.gen_range(2..10)
        } else {
            self.rng.gen_range(0..10)
        };
        match choice {
            0 | 1 => self.object(depth + 1, out),
            2 => self.array(depth + 1, out),
            3 | 4 => self.string(out),
            5..=7 => self.number(out),
            _ => out.push_str(["true", "false", "null"][self.rng.gen_range(0..3)]),
        }
    }

    fn object(&mut self, depth: usize, out: &mut String) {
        out.push('{');
        self.ws(out);
        let members = self.rng.gen_range(0..7);
        let mut used: Vec<String> = Vec::new();
        for i in 0..members {
            if i > 0 {
                out.push(',');
                self.ws(out);
            }
            if i == 0 && self.rng.gen_bool(0.003) {
                let private = [
                    "$serde_json::private::Number",
                    "$serde_json::private::RawValue",
                ];
                let key = private[self.rng.gen_range(0..2)];
                self.spell(key, out);
                out.push_str(":\"1.5\"");
                break;
            }
            let key = if !used.is_empty() && self.rng.gen_bool(0.2) {
                used[self.rng.gen_range(0..used.len())].clone()
            } else {
                let mut key = KEYS[self.rng.gen_range(0..KEYS.len())].to_owned();
                if key.starts_with('$') && self.rng.gen_bool(0.9) {
                    key = "zz".to_owned();
                }
                used.push(key.clone());
                key
            };
            self.spell(&key, out);
            self.ws(out);
            out.push(':');
            self.ws(out);
            // Containers where the pointers expect them, mostly.
            let container = matches!(
                key.as_str(),
                "customer" | "address" | "a" | "b" | "items" | "0"
            );
            if container && depth < 4 && self.rng.gen_bool(0.7) {
                if key == "items" || (key == "0" && self.rng.gen_bool(0.5)) {
                    self.array(depth + 1, out);
                } else {
                    self.object(depth + 1, out);
                }
            } else {
                self.value(depth, out);
            }
            self.ws(out);
        }
        out.push('}');
    }

    fn array(&mut self, depth: usize, out: &mut String) {
        out.push('[');
        self.ws(out);
        let items = self.rng.gen_range(0..4);
        for i in 0..items {
            if i > 0 {
                out.push(',');
                self.ws(out);
            }
            if depth < 4 && self.rng.gen_bool(0.5) {
                self.object(depth + 1, out);
            } else {
                self.value(depth, out);
            }
            self.ws(out);
        }
        out.push(']');
    }

    fn string(&mut self, out: &mut String) {
        const OTHER: &[char] = &[
            'é', 'ß', 'Ω', '中', '\u{7f}', '\u{a0}', '\u{2028}', '😀', '"', '\\', '/', 'Z', ' ',
        ];
        let len = self.rng.gen_range(0..12);
        let text: String = (0..len)
            .map(|_| match self.rng.gen_range(0..10) {
                0..=5 => char::from(self.rng.gen_range(0x20u8..0x7f)),
                6 | 7 => OTHER[self.rng.gen_range(0..OTHER.len())],
                _ => char::from(self.rng.gen_range(0u8..0x20)),
            })
            .collect();
        self.spell(&text, out);
    }

    /// `text` as a JSON string, each character raw or escaped at random.
    fn spell(&mut self, text: &str, out: &mut String) {
        out.push('"');
        for c in text.chars() {
            let short = match c {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '/' => Some("\\/"),
                '\u{8}' => Some("\\b"),
                '\u{c}' => Some("\\f"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                _ => None,
            };
            let must_escape = c < '\u{20}' || c == '"' || c == '\\';
            if !must_escape && self.rng.gen_bool(0.8) {
                out.push(c);
            } else if let Some(short) = short.filter(|_| self.rng.gen_bool(0.5)) {
                out.push_str(short);
            } else {
                let upper = self.rng.gen_bool(0.5);
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    if upper {
                        out.push_str(&format!("\\u{unit:04X}"));
                    } else {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        }
        out.push('"');
    }

    fn number(&mut self, out: &mut String) {
        if self.rng.gen_bool(0.2) {
            out.push('-');
        }
        if self.rng.gen_bool(0.25) {
            out.push('0');
        } else {
            let len = if self.rng.gen_bool(0.05) {
                self.rng.gen_range(19..30)
            } else {
                self.rng.gen_range(1..6)
            };
            out.push(char::from(self.rng.gen_range(b'1'..=b'9')));
            for _ in 1..len {
                out.push(char::from(self.rng.gen_range(b'0'..=b'9')));
            }
        }
        if self.rng.gen_bool(0.3) {
            out.push('.');
            for _ in 0..self.rng.gen_range(1..5) {
                out.push(char::from(self.rng.gen_range(b'0'..=b'9')));
            }
        }
        if self.rng.gen_bool(0.25) {
            out.push(if self.rng.gen_bool(0.5) { 'e' } else { 'E' });
            match self.rng.gen_range(0..3) {
                0 => out.push('-'),
                1 => out.push('+'),
                _ => {}
            }
            if self.rng.gen_bool(0.2) {
                out.push('0');
            }
            if self.rng.gen_bool(0.01) {
                out.push_str("99999999999999999999");
            } else {
                out.push_str(&self.rng.gen_range(0..30).to_string());
            }
        }
    }

    fn ws(&mut self, out: &mut String) {
        const WS: &[&str] = &[" ", "\n", "\t", "\r\n", "  "];
        if self.rng.gen_bool(0.2) {
            out.push_str(WS[self.rng.gen_range(0..WS.len())]);
        }
    }
}
