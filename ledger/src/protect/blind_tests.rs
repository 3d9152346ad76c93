use serde_json::json;

use super::*;
use crate::protect::policy::Pointer;

fn key() -> BlindIndexKey {
    let bytes: Vec<u8> = (0u8..32).collect();
    BlindIndexKey::from_bytes(&bytes).expect("32-byte key")
}

fn rule(name: &str, normalize: Normalize) -> BlindIndexRule {
    BlindIndexRule {
        name: name.to_owned(),
        field: Pointer::parse("/customer/email").expect("valid pointer"),
        normalize,
    }
}

/// Golden values computed independently (Python's hmac module):
/// `hmac.new(bytes(range(32)), b"oat-blind-v1\0" + name + b"\0" + value, sha256).hexdigest()[:32]`.
#[test]
fn tokens_match_golden_values() {
    let email = rule("email", Normalize::Lowercase);
    let token = token(&key(), &email, &json!(" Alice@Example.COM ")).expect("token");
    assert_eq!(token, "email:199e52a1658a694316269a53a0dbaf69");

    let amount = rule("amount", Normalize::None);
    let token = super::token(&key(), &amount, &json!(12345)).expect("token");
    assert_eq!(token, "amount:91bff59be4918f88b15bfc2ba8cf2a7d");

    let code = rule("code", Normalize::None);
    assert_eq!(
        query_token(&key(), &code, "Mixed Case "),
        "code:51b1385ccfcf88d3b0812c33f1a7de62"
    );
}

#[test]
fn lowercase_normaliser_trims_and_folds_case() {
    let email = rule("email", Normalize::Lowercase);
    let expected = query_token(&key(), &email, "alice@example.com");
    for spelling in [
        "Alice@Example.com",
        "  ALICE@EXAMPLE.COM\t",
        "alice@example.com",
    ] {
        assert_eq!(
            query_token(&key(), &email, spelling),
            expected,
            "{spelling:?}"
        );
        let from_value = token(&key(), &email, &json!(spelling)).expect("token");
        assert_eq!(from_value, expected, "{spelling:?}");
    }
    // Unicode case folding beyond ASCII, including titlecase letters.
    assert_eq!(
        query_token(&key(), &email, "ÉLODIE@EXAMPLE.FR"),
        query_token(&key(), &email, "élodie@example.fr")
    );
    assert_eq!(
        query_token(&key(), &email, "ǅ"),
        query_token(&key(), &email, "ǆ")
    );
    assert_ne!(query_token(&key(), &email, "bob@example.com"), expected);
}

#[test]
fn none_normaliser_keeps_the_value_exact() {
    let exact = rule("ref", Normalize::None);
    assert_ne!(
        query_token(&key(), &exact, "ABC"),
        query_token(&key(), &exact, "abc")
    );
    assert_ne!(
        query_token(&key(), &exact, "abc "),
        query_token(&key(), &exact, "abc")
    );
}

#[test]
fn non_strings_hash_as_canonical_json_and_match_queries() {
    let id = rule("customer", Normalize::None);
    assert_eq!(
        token(&key(), &id, &json!(12345)).expect("token"),
        query_token(&key(), &id, "12345")
    );
    assert_eq!(
        token(&key(), &id, &json!(true)).expect("token"),
        query_token(&key(), &id, "true")
    );
}

#[test]
fn tokens_depend_on_index_name_and_key() {
    let value = json!("alice@example.com");
    let email = token(&key(), &rule("email", Normalize::None), &value).expect("token");
    let other = token(&key(), &rule("contact", Normalize::None), &value).expect("token");
    assert_ne!(email[email.len() - 32..], other[other.len() - 32..]);
    let other_key = BlindIndexKey::from_bytes(&[9u8; 32]).expect("key");
    let rekeyed = token(&other_key, &rule("email", Normalize::None), &value).expect("token");
    assert_ne!(email, rekeyed);
}

#[test]
fn key_debug_hides_the_key_and_bad_lengths_are_refused() {
    assert_eq!(format!("{:?}", key()), "BlindIndexKey(<redacted>)");
    let error = BlindIndexKey::from_bytes(&[1u8; 16]).expect_err("short key");
    assert!(error.to_string().contains("16 bytes long, expected 32"));
}

#[test]
fn query_tokens_cover_numbers_in_canonical_spelling() {
    let amount = rule("amount", Normalize::None);
    let stored = token(&key(), &amount, &json!(1200)).expect("token");
    let candidates = query_tokens(&key(), &amount, "1200");
    assert_eq!(candidates.len(), 2, "text and canonical number differ");
    assert!(candidates.contains(&stored));
    assert!(candidates.contains(&token(&key(), &amount, &json!("1200")).expect("token")));

    assert_eq!(
        query_tokens(&key(), &amount, "12345"),
        [query_token(&key(), &amount, "12345")]
    );
    let email = rule("email", Normalize::Lowercase);
    assert_eq!(
        query_tokens(&key(), &email, "Ann@Example.com"),
        [query_token(&key(), &email, "ann@example.com")]
    );
    assert_eq!(query_tokens(&key(), &email, "[1]").len(), 1);
}
