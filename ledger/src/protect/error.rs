//! Errors of field protection, one enum per concern. None of them ever holds
//! key material or a protected plaintext.

use std::path::PathBuf;

/// The policy file cannot be used: fix it and restart.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read field-protection policy {path}: {source}; check the policy file path")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("field-protection policy {origin} is not valid: {message}")]
    Syntax { origin: String, message: String },
    #[error("field-protection policy {origin} is not valid: {message}")]
    Invalid { origin: String, message: String },
    #[error("{pointer:?} is not a JSON pointer: {reason}")]
    Pointer {
        pointer: String,
        reason: &'static str,
    },
}

/// Key-encryption keys, data-key wrapping and key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key service is unreachable or throttling: retry later.
    #[error("key provider unavailable: {0}")]
    Unavailable(String),
    /// The wrapped key names a KEK version this provider does not have:
    /// the key file or variable is older than the data, or belongs elsewhere.
    #[error(
        "data key {key_id} is wrapped under kek version {kek_version:?}, \
         which {provider} does not have; use the key file or AUDIT_KEK that wrapped it"
    )]
    UnknownVersion {
        key_id: String,
        kek_version: String,
        provider: String,
    },
    /// The KEK version was retired: its data keys should have been re-wrapped.
    #[error(
        "data key {key_id} is wrapped under retired kek version {kek_version:?} of {provider}; \
         re-wrap data keys before retiring a version (or un-retire it in the key file)"
    )]
    Retired {
        key_id: String,
        kek_version: String,
        provider: String,
    },
    /// Unwrapping failed authentication: a different KEK with the same
    /// version name, or the wrapped key was altered or moved to another id.
    #[error(
        "data key {key_id} does not unwrap under kek version {kek_version:?} of {provider}: \
         wrong key for that version, or the wrapped key was altered or stored under another id"
    )]
    Integrity {
        key_id: String,
        kek_version: String,
        provider: String,
    },
    /// A key file or key variable is missing, malformed or refused.
    #[error("{0}")]
    Config(String),
    #[error("cannot {action} key file {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl KeyError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Protecting or revealing payload fields.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// The producer sent a payload that already holds an encrypted-field
    /// envelope: refused (dead letter) rather than protected twice, and so
    /// that every envelope in the store was written by us.
    #[error(
        "payload already holds an encrypted-field envelope (\"$enc\") at {pointer}; \
         refusing to protect it twice: producers must send plaintext"
    )]
    AlreadyProtected { pointer: String },
    #[error("cannot serialise field {pointer} as canonical json: {message}")]
    Canonical { pointer: String, message: String },
    /// A stored envelope is not one we write: the stored payload was altered.
    #[error("encrypted field {pointer} is malformed: {reason}")]
    Malformed {
        pointer: String,
        reason: &'static str,
    },
    /// Authentication failed: the ciphertext was altered, or moved from
    /// another event or field, or the key is not the one that encrypted it.
    #[error(
        "encrypted field {pointer} (data key {kid}) failed authentication: \
         the ciphertext was altered, moved from another event or field, or the key is wrong"
    )]
    Integrity { pointer: String, kid: String },
    /// The key lookup knows nothing of this key id (neither found nor erased).
    #[error("encrypted field {pointer} needs data key {kid}, which is unknown to the key store")]
    MissingKey { pointer: String, kid: String },
    #[error("cannot encrypt field {pointer}: {reason}")]
    Encrypt {
        pointer: String,
        reason: &'static str,
    },
}
