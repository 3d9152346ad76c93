//! Field protection: personal data in event payloads is stored encrypted,
//! field by field, so it can be erased (by erasing its data key) while the
//! append-only log stays intact, and searched through blind indexes.
//!
//! - [`policy`]: which fields of which event types are protected;
//! - [`cipher`]: AES-256-GCM field envelopes, reveal and redaction;
//! - [`keys`]: data keys, KEK providers (key file, environment; the trait
//!   fits a KMS or Vault), wrapping and rotation;
//! - [`blind`]: blind-index tokens for equality search;
//! - [`text`]: the stored form of a payload straight from its JSON text
//!   (ingest), equal to `protect_payload` on the parsed payload.
//!
//! Pure code: no database, no network; callers store wrapped keys and tokens.

pub mod blind;
pub mod cipher;
mod error;
pub mod keys;
pub mod policy;
pub mod text;

pub use blind::{query_token, query_tokens, token, BlindIndexKey};
pub use cipher::{
    erase_fields, find_envelope, is_envelope, key_ids, protect_payload, redact_payload,
    reveal_payload, KeyLookup, Protected, Revealed,
};
pub use error::{KeyError, PolicyError, ProtectError};
pub use keys::{rewrap, DataKey, EnvKeyProvider, KeyProvider, LocalKeyFile, WrappedKey};
pub use policy::{BlindIndexRule, Normalize, Pointer, Policy, DEFAULT_POLICY_TOML};
pub use text::{reference_form, FieldPlan, PayloadBatch, PayloadError, Scanned, Sealed, Treatment};
