//! Signed checkpoints: "chain `chain_id` had `tree_size` events whose RFC 9162
//! Merkle root is `root_hash`, at `timestamp`", signed with Ed25519.
//!
//! A checkpoint published outside the database is what makes the audit
//! trail tamper-evident: rewriting history afterwards changes the root, and
//! the old signed root contradicts it. Everything below is specified so that
//! an independent verifier can be written from this text alone.
//!
//! # Checkpoint JSON
//!
//! ```json
//! {"version":1,"chain_id":"orders/3","tree_size":1234,"root_hash":"<64 hex>","timestamp":"2026-11-27T13:50:30.123456Z","key_id":"<16 hex>","signature":"<base64>"}
//! ```
//!
//! - `version`: the integer 1.
//! - `chain_id`: a non-empty string without `\n` (U+000A).
//! - `tree_size`: the number of events covered, a JSON integer.
//! - `root_hash`: the RFC 9162 Merkle root of those events (see
//!   [`crate::merkle`]), 64 lowercase hexadecimal digits.
//! - `timestamp`: when it was signed, RFC 3339 in UTC with exactly six
//!   fractional digits and `Z`: `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
//! - `key_id`: the first 8 bytes of SHA-256 of the raw 32-byte Ed25519
//!   public key, 16 lowercase hexadecimal digits.
//! - `signature`: the 64-byte Ed25519 (RFC 8032, pure Ed25519) signature of
//!   the signed message below, standard base64 with padding (88 characters).
//!
//! Readers refuse unknown fields and any other spelling of these values, so
//! that a checkpoint has exactly one text.
//!
//! # Signed message
//!
//! The UTF-8 bytes of the concatenation of
//!
//! ```text
//! "order-audit-trail checkpoint v1\n"
//! chain_id "\n"
//! tree_size "\n"      (decimal, no sign, no leading zeros)
//! root_hash "\n"      (the 64 lowercase hex digits, as in the JSON)
//! timestamp "\n"      (the RFC 3339 string, as in the JSON)
//! ```
//!
//! For example `order-audit-trail checkpoint v1\norders/3\n1234\n<64 hex>\n2026-11-27T13:50:30.123456Z\n`.
//! The first line keeps a checkpoint signature from being valid for any other
//! message signed with the same key; forbidding `\n` in the chain id keeps the
//! fields from being re-split differently. Verify with strict Ed25519 rules
//! (canonical `S`, no small-order public key or `R`), as `verify_strict` does.
//!
//! # Key files
//!
//! One JSON object each, no PEM:
//!
//! - signing key: `{"kind":"ed25519-signing-key","key_id":"<16 hex>","secret":"<base64 of the 32-byte seed>"}`,
//!   created with mode 0600 on Unix;
//! - public key: `{"kind":"ed25519-public-key","key_id":"<16 hex>","public":"<base64 of the 32-byte public key>"}`.
//!
//! Loading checks that `key_id` matches the key, which catches a file edited
//! by hand or a key pasted into the wrong file.
//!
//! # Checkpoint directory
//!
//! [`CheckpointDir`] keeps `<dir>/<chain dir>/<tree_size>.json`, the size
//! written as 20 decimal digits so that names sort by size, each file one
//! checkpoint JSON and a newline. `<chain dir>` is the chain id with every
//! byte outside `[A-Za-z0-9._-]`, and a leading `.`, written as `%XX`
//! (uppercase hex): `orders/3` is `orders%2F3`, `..` is `%2E.`. Files and
//! directories whose names start with `.` are temporary and ignored.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Datelike, SubsecRound, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::merkle::Hash;

pub const CHECKPOINT_VERSION: u32 = 1;

const MESSAGE_PREFIX: &str = "order-audit-trail checkpoint v1\n";
const SIGNING_KEY_KIND: &str = "ed25519-signing-key";
const PUBLIC_KEY_KIND: &str = "ed25519-public-key";
const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Why a checkpoint could not be made, read, verified or stored. Messages
/// name the chain, size, key id and path involved, never key material.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("invalid chain id {chain_id:?}: {reason}")]
    InvalidChainId {
        chain_id: String,
        reason: &'static str,
    },

    #[error("timestamp {timestamp} is outside the years 0000 to 9999 that RFC 3339 can write")]
    TimestampOutOfRange { timestamp: DateTime<Utc> },

    #[error("malformed checkpoint: {reason}")]
    Malformed { reason: String },

    #[error(
        "checkpoint for {chain_id} at size {tree_size} is signed by key {checkpoint_key_id}, not by the given key {key_id}"
    )]
    WrongKey {
        chain_id: String,
        tree_size: u64,
        checkpoint_key_id: String,
        key_id: String,
    },

    #[error(
        "checkpoint signature for {chain_id} at size {tree_size} does not verify with key {key_id}"
    )]
    BadSignature {
        chain_id: String,
        tree_size: u64,
        key_id: String,
    },

    #[error("key file {} already exists; move it away or ask to overwrite it", .path.display())]
    KeyFileExists { path: PathBuf },

    #[error("invalid key file {}: {reason}", .path.display())]
    InvalidKeyFile { path: PathBuf, reason: String },

    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error("malformed checkpoint file {}: {reason}", .path.display())]
    MalformedFile { path: PathBuf, reason: String },

    #[error("unexpected entry {} in the checkpoint directory: {reason}", .path.display())]
    UnexpectedEntry { path: PathBuf, reason: String },

    #[error(
        "conflicting checkpoints for {chain_id} at size {tree_size}: {} holds root {existing_root}, refusing to replace it with root {new_root}",
        .path.display()
    )]
    Conflict {
        chain_id: String,
        tree_size: u64,
        path: PathBuf,
        existing_root: String,
        new_root: String,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io {
        action,
        path,
        source,
    }
}

/// A signed statement of a chain's Merkle root at a size; see the module
/// documentation for its JSON form and signed message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "CheckpointJson", try_from = "CheckpointJson")]
pub struct Checkpoint {
    pub chain_id: String,
    pub tree_size: u64,
    pub root_hash: Hash,
    pub timestamp: DateTime<Utc>,
    pub key_id: String,
    pub signature: [u8; 64],
}

impl Checkpoint {
    /// The bytes the signature covers, as specified in the module
    /// documentation.
    pub fn signed_message(&self) -> Vec<u8> {
        format!(
            "{MESSAGE_PREFIX}{}\n{}\n{}\n{}\n",
            self.chain_id,
            self.tree_size,
            hex::encode(self.root_hash),
            format_timestamp(&self.timestamp),
        )
        .into_bytes()
    }

    /// Checks that `key` made this checkpoint: its key id first, so that a
    /// checkpoint of another signer is reported as such, then the signature.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), CheckpointError> {
        let key_id = key_id(key);
        if self.key_id != key_id {
            return Err(CheckpointError::WrongKey {
                chain_id: self.chain_id.clone(),
                tree_size: self.tree_size,
                checkpoint_key_id: self.key_id.clone(),
                key_id,
            });
        }
        validate_chain_id(&self.chain_id)?;
        check_timestamp_range(&self.timestamp)?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&self.signed_message(), &signature)
            .map_err(|_| CheckpointError::BadSignature {
                chain_id: self.chain_id.clone(),
                tree_size: self.tree_size,
                key_id,
            })
    }
}

/// The wire form of [`Checkpoint`]; field order is the JSON order.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointJson {
    version: u32,
    chain_id: String,
    tree_size: u64,
    root_hash: String,
    timestamp: String,
    key_id: String,
    signature: String,
}

impl From<Checkpoint> for CheckpointJson {
    fn from(checkpoint: Checkpoint) -> Self {
        Self {
            version: CHECKPOINT_VERSION,
            root_hash: hex::encode(checkpoint.root_hash),
            timestamp: format_timestamp(&checkpoint.timestamp),
            signature: BASE64.encode(checkpoint.signature),
            chain_id: checkpoint.chain_id,
            tree_size: checkpoint.tree_size,
            key_id: checkpoint.key_id,
        }
    }
}

impl TryFrom<CheckpointJson> for Checkpoint {
    type Error = CheckpointError;

    fn try_from(json: CheckpointJson) -> Result<Self, Self::Error> {
        let malformed = |reason: String| CheckpointError::Malformed { reason };
        if json.version != CHECKPOINT_VERSION {
            return Err(malformed(format!(
                "version is {}, this reader knows only {CHECKPOINT_VERSION}",
                json.version
            )));
        }
        validate_chain_id(&json.chain_id)?;
        let root_hash = decode_lower_hex::<32>(&json.root_hash).ok_or_else(|| {
            malformed(format!(
                "root_hash {:?} is not 64 lowercase hex digits",
                json.root_hash
            ))
        })?;
        if decode_lower_hex::<8>(&json.key_id).is_none() {
            return Err(malformed(format!(
                "key_id {:?} is not 16 lowercase hex digits",
                json.key_id
            )));
        }
        let timestamp = parse_timestamp(&json.timestamp).ok_or_else(|| {
            malformed(format!(
                "timestamp {:?} is not an RFC 3339 UTC time of the form YYYY-MM-DDTHH:MM:SS.ffffffZ",
                json.timestamp
            ))
        })?;
        let signature = BASE64
            .decode(&json.signature)
            .ok()
            .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
            .ok_or_else(|| {
                malformed("signature is not 64 bytes in padded standard base64".to_string())
            })?;
        Ok(Self {
            chain_id: json.chain_id,
            tree_size: json.tree_size,
            root_hash,
            timestamp,
            key_id: json.key_id,
            signature,
        })
    }
}

fn decode_lower_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let lowercase = text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lowercase || text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn validate_chain_id(chain_id: &str) -> Result<(), CheckpointError> {
    let reason = if chain_id.is_empty() {
        "it is empty"
    } else if chain_id.contains('\n') {
        "it contains a newline, which separates the fields of the signed message"
    } else {
        return Ok(());
    };
    Err(CheckpointError::InvalidChainId {
        chain_id: chain_id.to_string(),
        reason,
    })
}

fn format_timestamp(timestamp: &DateTime<Utc>) -> String {
    timestamp.format(TIMESTAMP_FORMAT).to_string()
}

/// Parses only the one spelling [`format_timestamp`] writes, so that the
/// string in the JSON is the string that was signed.
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let timestamp = DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc);
    (format_timestamp(&timestamp) == text).then_some(timestamp)
}

fn check_timestamp_range(timestamp: &DateTime<Utc>) -> Result<(), CheckpointError> {
    if (0..=9999).contains(&timestamp.year()) {
        return Ok(());
    }
    Err(CheckpointError::TimestampOutOfRange {
        timestamp: *timestamp,
    })
}

/// The id of a public key: the first 8 bytes of SHA-256 of its 32 raw bytes,
/// in lowercase hex. Short enough to read, long enough to tell our keys apart.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// What to do when a key file exists at the path already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteMode {
    /// Fail with [`CheckpointError::KeyFileExists`]: never lose a key by accident.
    CreateNew,
    /// Replace it atomically.
    Overwrite,
}

/// An Ed25519 signing key and its id. The secret is wiped from memory when
/// this is dropped (ed25519-dalek's `zeroize` feature), and neither `Debug`
/// nor any error prints it.
pub struct SigningKeyPair {
    key: SigningKey,
    key_id: String,
}

impl fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyPair")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The signing key file. Wiped on drop because `secret` holds the key.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct SigningKeyFile {
    kind: String,
    key_id: String,
    secret: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyFile {
    kind: String,
    key_id: String,
    public: String,
}

impl SigningKeyPair {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        Self::from_signing_key(SigningKey::generate(&mut OsRng))
    }

    /// The key whose 32-byte seed (RFC 8032 private key) is `secret`.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(secret))
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs "chain `chain_id` had `tree_size` events with root `root_hash`",
    /// stamped with `timestamp` truncated to microseconds, the precision of
    /// the JSON.
    ///
    /// Signing does not fail, so that the store's checkpointer has no error
    /// path here. A chain id that breaks the rules (empty, or with a `\n`;
    /// our chain ids come from Kafka topic names, which cannot contain one)
    /// or a year past 9999 gives a checkpoint that [`Checkpoint::verify`],
    /// [`CheckpointDir::publish`] and the JSON reader all refuse.
    pub fn sign(
        &self,
        chain_id: &str,
        tree_size: u64,
        root_hash: Hash,
        timestamp: DateTime<Utc>,
    ) -> Checkpoint {
        let mut checkpoint = Checkpoint {
            chain_id: chain_id.to_string(),
            tree_size,
            root_hash,
            timestamp: timestamp.trunc_subsecs(6),
            key_id: self.key_id.clone(),
            signature: [0; 64],
        };
        checkpoint.signature = self.key.sign(&checkpoint.signed_message()).to_bytes();
        checkpoint
    }
}

/// Writes `pair`'s signing key file, readable by its owner only on Unix.
/// Fails with [`CheckpointError::KeyFileExists`] if the file exists: a lost
/// signing key cannot sign again, and we never lose one by accident.
pub fn write_signing_key(pair: &SigningKeyPair, path: &Path) -> Result<(), CheckpointError> {
    write_signing_key_file(pair, path, WriteMode::CreateNew)
}

/// Like [`write_signing_key`], but atomically replaces an existing file
/// (key rotation, once the old public key is kept elsewhere).
pub fn replace_signing_key(pair: &SigningKeyPair, path: &Path) -> Result<(), CheckpointError> {
    write_signing_key_file(pair, path, WriteMode::Overwrite)
}

/// Writes the public key file that verifiers load with [`load_public_key`];
/// fails with [`CheckpointError::KeyFileExists`] if the file exists.
pub fn write_public_key(key: &VerifyingKey, path: &Path) -> Result<(), CheckpointError> {
    write_public_key_file(key, path, WriteMode::CreateNew)
}

/// Like [`write_public_key`], but atomically replaces an existing file.
pub fn replace_public_key(key: &VerifyingKey, path: &Path) -> Result<(), CheckpointError> {
    write_public_key_file(key, path, WriteMode::Overwrite)
}

fn write_signing_key_file(
    pair: &SigningKeyPair,
    path: &Path,
    mode: WriteMode,
) -> Result<(), CheckpointError> {
    let secret = Zeroizing::new(pair.key.to_bytes());
    let file = SigningKeyFile {
        kind: SIGNING_KEY_KIND.to_string(),
        key_id: pair.key_id.clone(),
        secret: BASE64.encode(secret.as_slice()),
    };
    // Room for the whole file up front, so no reallocation leaves a copy
    // of the secret behind in freed memory.
    let mut contents = Zeroizing::new(Vec::with_capacity(256));
    serde_json::to_writer(&mut *contents, &file).map_err(|e| CheckpointError::InvalidKeyFile {
        path: path.to_path_buf(),
        reason: format!("cannot encode the key file: {}", json_category(&e)),
    })?;
    contents.push(b'\n');
    write_key_file(path, &contents, mode, 0o600)
}

pub fn load_signing_key(path: &Path) -> Result<SigningKeyPair, CheckpointError> {
    let invalid = |reason: String| CheckpointError::InvalidKeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io_error("read key file", path))?);
    // serde_json errors can quote the offending value: report only where.
    let file: SigningKeyFile = serde_json::from_str(&text).map_err(|e| {
        invalid(format!(
            "not a signing key file ({} error at line {} column {})",
            json_category(&e),
            e.line(),
            e.column()
        ))
    })?;
    if file.kind != SIGNING_KEY_KIND {
        return Err(invalid(format!(
            "kind is {:?}, expected {SIGNING_KEY_KIND:?}",
            file.kind
        )));
    }
    let secret = Zeroizing::new(
        BASE64
            .decode(&file.secret)
            .map_err(|_| invalid("secret is not padded standard base64".to_string()))?,
    );
    let Ok(secret) = <&[u8; 32]>::try_from(secret.as_slice()) else {
        return Err(invalid(format!(
            "secret is {} bytes, expected 32",
            secret.len()
        )));
    };
    let pair = SigningKeyPair::from_secret_bytes(secret);
    if pair.key_id != file.key_id {
        return Err(invalid(format!(
            "key_id is {:?} but the secret is key {}",
            file.key_id, pair.key_id
        )));
    }
    Ok(pair)
}

fn write_public_key_file(
    key: &VerifyingKey,
    path: &Path,
    mode: WriteMode,
) -> Result<(), CheckpointError> {
    let file = PublicKeyFile {
        kind: PUBLIC_KEY_KIND.to_string(),
        key_id: key_id(key),
        public: BASE64.encode(key.as_bytes()),
    };
    let mut contents = serde_json::to_vec(&file).map_err(|e| CheckpointError::InvalidKeyFile {
        path: path.to_path_buf(),
        reason: format!("cannot encode the key file: {e}"),
    })?;
    contents.push(b'\n');
    write_key_file(path, &contents, mode, 0o644)
}

pub fn load_public_key(path: &Path) -> Result<VerifyingKey, CheckpointError> {
    let invalid = |reason: String| CheckpointError::InvalidKeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = fs::read_to_string(path).map_err(io_error("read key file", path))?;
    let file: PublicKeyFile =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not a public key file: {e}")))?;
    if file.kind != PUBLIC_KEY_KIND {
        return Err(invalid(format!(
            "kind is {:?}, expected {PUBLIC_KEY_KIND:?}",
            file.kind
        )));
    }
    let bytes = BASE64
        .decode(&file.public)
        .map_err(|_| invalid("public is not padded standard base64".to_string()))?;
    let Ok(bytes) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        return Err(invalid(format!(
            "public is {} bytes, expected 32",
            bytes.len()
        )));
    };
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| invalid("public is not an Ed25519 public key".to_string()))?;
    // A small-order key would accept forged signatures under lax rules.
    if key.is_weak() {
        return Err(invalid(
            "public is a weak (small-order) Ed25519 key".to_string(),
        ));
    }
    if key_id(&key) != file.key_id {
        return Err(invalid(format!(
            "key_id is {:?} but the public key is key {}",
            file.key_id,
            key_id(&key)
        )));
    }
    Ok(key)
}

fn write_key_file(
    path: &Path,
    contents: &[u8],
    mode: WriteMode,
    permissions: u32,
) -> Result<(), CheckpointError> {
    match mode {
        WriteMode::Overwrite => {
            write_atomically(path, contents, permissions).map_err(io_error("write key file", path))
        }
        WriteMode::CreateNew => {
            let written = create_new_file(path, permissions).and_then(|mut file| {
                let result = file.write_all(contents).and_then(|()| file.sync_all());
                if result.is_err() {
                    // Leave no half-written key for the next CreateNew to trip on.
                    let _ = fs::remove_file(path);
                }
                result
            });
            match written {
                Ok(()) => {
                    sync_dir(parent_dir(path)).map_err(io_error("sync the directory of", path))
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(CheckpointError::KeyFileExists {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) => Err(io_error("create key file", path)(e)),
            }
        }
    }
}

fn create_new_file(path: &Path, permissions: u32) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(permissions);
    }
    #[cfg(not(unix))]
    let _ = permissions;
    options.open(path)
}

/// Readers see the old file or the new one, never a torn one, and after a
/// crash the new one is there only if this returned `Ok`.
fn write_atomically(path: &Path, contents: &[u8], permissions: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut file = create_new_file(&temp, permissions)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn json_category(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "read",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "unexpected end",
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Makes a rename or a new entry in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// What [`CheckpointDir::publish`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    Written,
    /// A checkpoint of the same chain, size and root was there already and
    /// is kept as it is, even if signed at another time or with another key:
    /// published evidence is never rewritten.
    AlreadyPublished,
}

/// A directory of published checkpoints, one file per chain and size; see
/// the module documentation for the layout. Witnesses and auditors can copy
/// or serve it as plain files.
#[derive(Clone, Debug)]
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the checkpoint of `chain_id` at `tree_size` is kept.
    pub fn path_of(&self, chain_id: &str, tree_size: u64) -> PathBuf {
        self.chain_path(chain_id).join(file_name(tree_size))
    }

    fn chain_path(&self, chain_id: &str) -> PathBuf {
        self.root.join(encode_chain_dir(chain_id))
    }

    /// Stores `checkpoint` atomically and durably. Publishing it again is a
    /// no-op; publishing a different root for the same chain and size is a
    /// [`CheckpointError::Conflict`], since two roots for one size mean the
    /// chain was rewritten.
    pub fn publish(&self, checkpoint: &Checkpoint) -> Result<PublishOutcome, CheckpointError> {
        validate_chain_id(&checkpoint.chain_id)?;
        let chain_path = self.chain_path(&checkpoint.chain_id);
        let path = chain_path.join(file_name(checkpoint.tree_size));
        if let Some(existing) = read_if_exists(&path, &checkpoint.chain_id, checkpoint.tree_size)? {
            if existing.root_hash != checkpoint.root_hash {
                return Err(CheckpointError::Conflict {
                    chain_id: checkpoint.chain_id.clone(),
                    tree_size: checkpoint.tree_size,
                    path,
                    existing_root: hex::encode(existing.root_hash),
                    new_root: hex::encode(checkpoint.root_hash),
                });
            }
            return Ok(PublishOutcome::AlreadyPublished);
        }

        if !chain_path.is_dir() {
            fs::create_dir_all(&chain_path)
                .map_err(io_error("create checkpoint directory", &chain_path))?;
            sync_dir(&self.root).map_err(io_error("sync checkpoint directory", &self.root))?;
        }
        let mut contents =
            serde_json::to_vec(checkpoint).map_err(|e| CheckpointError::Malformed {
                reason: format!("cannot encode checkpoint: {e}"),
            })?;
        contents.push(b'\n');
        write_atomically(&path, &contents, 0o644).map_err(io_error("write checkpoint", &path))?;
        Ok(PublishOutcome::Written)
    }

    /// Every checkpoint of every chain, sorted by chain id, then size.
    /// Signatures are not checked here: that needs the signer's key, see
    /// [`Checkpoint::verify`].
    pub fn load_all(&self) -> Result<Vec<Checkpoint>, CheckpointError> {
        let mut checkpoints = Vec::new();
        for (chain_id, chain_path) in self.chains()? {
            for (tree_size, path) in chain_files(&chain_path)? {
                checkpoints.push(read_checkpoint(&path, &chain_id, tree_size)?);
            }
        }
        checkpoints.sort_by(|a, b| (&a.chain_id, a.tree_size).cmp(&(&b.chain_id, b.tree_size)));
        Ok(checkpoints)
    }

    /// The checkpoint of `chain_id` with the largest size, if any.
    pub fn latest(&self, chain_id: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        validate_chain_id(chain_id)?;
        if !self.root.is_dir() {
            // A mistyped directory must not look like "no checkpoints yet".
            return Err(self.missing_root());
        }
        let chain_path = self.chain_path(chain_id);
        if !chain_path.exists() {
            return Ok(None);
        }
        let Some((tree_size, path)) = chain_files(&chain_path)?.pop() else {
            return Ok(None);
        };
        read_checkpoint(&path, chain_id, tree_size).map(Some)
    }

    fn missing_root(&self) -> CheckpointError {
        CheckpointError::Io {
            action: "read checkpoint directory",
            path: self.root.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "not a directory"),
        }
    }

    /// The chain directories: (chain id, path).
    fn chains(&self) -> Result<Vec<(String, PathBuf)>, CheckpointError> {
        if !self.root.is_dir() {
            return Err(self.missing_root());
        }
        let mut chains = Vec::new();
        for (name, path) in visible_entries(&self.root)? {
            if !path.is_dir() {
                continue;
            }
            let chain_id = name.as_deref().and_then(decode_chain_dir).ok_or_else(|| {
                CheckpointError::UnexpectedEntry {
                    path: path.clone(),
                    reason: "the name is not an encoded chain id".to_string(),
                }
            })?;
            chains.push((chain_id, path));
        }
        Ok(chains)
    }
}

/// Entries of `dir` not starting with `.`, with their name if it is UTF-8.
fn visible_entries(dir: &Path) -> Result<Vec<(Option<String>, PathBuf)>, CheckpointError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        let name = entry.file_name().into_string().ok();
        if name.as_deref().is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        entries.push((name, entry.path()));
    }
    Ok(entries)
}

/// The checkpoint files of one chain directory, sorted by size.
fn chain_files(chain_path: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut files = Vec::new();
    for (name, path) in visible_entries(chain_path)? {
        let Some(stem) = name.as_deref().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        let tree_size = (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
            .then(|| stem.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| CheckpointError::UnexpectedEntry {
                path: path.clone(),
                reason: "a checkpoint file is named by its tree size in 20 digits".to_string(),
            })?;
        files.push((tree_size, path));
    }
    files.sort();
    Ok(files)
}

fn file_name(tree_size: u64) -> String {
    format!("{tree_size:020}.json")
}

fn read_if_exists(
    path: &Path,
    chain_id: &str,
    tree_size: u64,
) -> Result<Option<Checkpoint>, CheckpointError> {
    match fs::metadata(path) {
        Ok(_) => read_checkpoint(path, chain_id, tree_size).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read checkpoint", path)(e)),
    }
}

/// Reads a checkpoint file and checks that it is where it belongs, so that a
/// file copied into the wrong place cannot pass for another chain's.
fn read_checkpoint(
    path: &Path,
    chain_id: &str,
    tree_size: u64,
) -> Result<Checkpoint, CheckpointError> {
    let malformed = |reason: String| CheckpointError::MalformedFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(io_error("read checkpoint", path))?;
    let checkpoint: Checkpoint =
        serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    if checkpoint.chain_id != chain_id || checkpoint.tree_size != tree_size {
        return Err(malformed(format!(
            "it holds chain {:?} at size {}, but its path is for chain {chain_id:?} at size {tree_size}",
            checkpoint.chain_id, checkpoint.tree_size
        )));
    }
    Ok(checkpoint)
}

/// A directory name for `chain_id` that any filesystem accepts and that
/// decodes back to it: bytes outside `[A-Za-z0-9._-]` and a leading `.`
/// (so no chain is `.`, `..` or hidden) become `%XX`.
fn encode_chain_dir(chain_id: &str) -> String {
    let mut name = String::with_capacity(chain_id.len());
    for (i, byte) in chain_id.bytes().enumerate() {
        let safe =
            byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' || (byte == b'.' && i > 0);
        if safe {
            name.push(char::from(byte));
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    name
}

/// The chain id of a directory name, if the name is exactly what
/// [`encode_chain_dir`] writes for it.
fn decode_chain_dir(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let digits = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            decoded.push(u8::from_str_radix(digits, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let chain_id = String::from_utf8(decoded).ok()?;
    (!chain_id.is_empty() && encode_chain_dir(&chain_id) == name).then_some(chain_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// A scratch directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "audit-checkpoint-test-{:016x}",
                rand::random::<u64>()
            ));
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const SECRET: [u8; 32] = [7; 32];

    fn fixed_key() -> SigningKeyPair {
        SigningKeyPair::from_secret_bytes(&SECRET)
    }

    fn fixed_time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 13, 50, 30).unwrap()
            + chrono::Duration::nanoseconds(123_456_789)
    }

    fn root_of(text: &str) -> Hash {
        crate::merkle::leaf_hash(text.as_bytes())
    }

    fn sample() -> Checkpoint {
        fixed_key().sign("orders/3", 1234, root_of("r"), fixed_time())
    }

    #[test]
    fn sign_and_verify_roundtrip() {
        let key = SigningKeyPair::generate();
        let checkpoint = key.sign("orders/3", 1234, root_of("r"), Utc::now());
        assert_eq!(checkpoint.key_id, key.key_id());
        checkpoint.verify(&key.public_key()).unwrap();
    }

    #[test]
    fn every_changed_field_fails_verification() {
        let key = fixed_key();
        let public = key.public_key();
        let good = sample();
        good.verify(&public).unwrap();

        let mut changes: Vec<(&str, Checkpoint)> = Vec::new();
        let mut c = good.clone();
        c.chain_id = "orders/4".to_string();
        changes.push(("chain_id", c));
        let mut c = good.clone();
        c.tree_size += 1;
        changes.push(("tree_size", c));
        let mut c = good.clone();
        c.root_hash[31] ^= 1;
        changes.push(("root_hash", c));
        let mut c = good.clone();
        c.timestamp += chrono::Duration::microseconds(1);
        changes.push(("timestamp", c));
        let mut c = good.clone();
        c.signature[0] ^= 1;
        changes.push(("signature", c));
        for (field, checkpoint) in changes {
            let err = checkpoint.verify(&public).unwrap_err();
            assert!(
                matches!(err, CheckpointError::BadSignature { .. }),
                "{field}: {err}"
            );
        }

        let mut c = good.clone();
        c.key_id = "0000000000000000".to_string();
        assert!(matches!(
            c.verify(&public),
            Err(CheckpointError::WrongKey { .. })
        ));
    }

    #[test]
    fn another_key_fails_verification() {
        let checkpoint = sample();
        let other = SigningKeyPair::generate();
        let err = checkpoint.verify(&other.public_key()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "checkpoint for orders/3 at size 1234 is signed by key {}, not by the given key {}",
                fixed_key().key_id(),
                other.key_id()
            )
        );

        // Claiming the other key's id does not help.
        let mut forged = checkpoint.clone();
        forged.key_id = other.key_id().to_string();
        assert!(matches!(
            forged.verify(&other.public_key()),
            Err(CheckpointError::BadSignature { .. })
        ));
    }

    #[test]
    fn signed_message_is_the_documented_text() {
        let checkpoint = sample();
        let expected = format!(
            "order-audit-trail checkpoint v1\norders/3\n1234\n{}\n2026-11-27T13:50:30.123456Z\n",
            hex::encode(root_of("r"))
        );
        assert_eq!(checkpoint.signed_message(), expected.as_bytes());
        // Verified straight with ed25519-dalek, as an outside verifier would.
        let signature = Signature::from_bytes(&checkpoint.signature);
        fixed_key()
            .public_key()
            .verify_strict(expected.as_bytes(), &signature)
            .unwrap();
    }

    #[test]
    fn key_id_is_a_sha256_prefix_of_the_public_key() {
        let key = fixed_key();
        let digest = Sha256::digest(key.public_key().as_bytes());
        assert_eq!(key.key_id(), hex::encode(&digest[..8]));
        assert_eq!(key.key_id().len(), 16);
    }

    // Cross-checked with Python's `cryptography`, written from the module
    // documentation only: Ed25519PrivateKey.from_private_bytes(bytes([7] * 32))
    // signing the documented message gives the same key id and signature.
    const SAMPLE_JSON: &str = concat!(
        r#"{"version":1,"chain_id":"orders/3","tree_size":1234,"#,
        r#""root_hash":"6a9997023a65253995105d37bf8f950a39d5e75667f1b8e0a65bf12f2ddf06c2","#,
        r#""timestamp":"2026-11-27T13:50:30.123456Z","#,
        r#""key_id":"fe812c12f3ab4ce6","#,
        r#""signature":"fwTpnC5hAON+vMgAiGFGDXc68TP5aMIElKGm4EHR9OTkJBivMOCenln2F3d+8kHflTuuZvUjakKGKRJeRebGAg=="}"#
    );

    #[test]
    fn json_has_the_exact_documented_form() {
        let checkpoint = sample();
        let json = serde_json::to_string(&checkpoint).unwrap();
        assert_eq!(json, SAMPLE_JSON);
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, checkpoint);
        back.verify(&fixed_key().public_key()).unwrap();
    }

    #[test]
    fn sign_truncates_to_microseconds_and_bad_input_is_refused_downstream() {
        let checkpoint = sample();
        assert_eq!(checkpoint.timestamp.timestamp_subsec_nanos(), 123_456_000);

        let key = fixed_key();
        let root = root_of("r");
        // Signing cannot fail; what breaks the rules is refused downstream.
        let dir = TempDir::new();
        let store = CheckpointDir::new(&dir.0);
        for bad in ["", "orders\n3", "\n"] {
            let checkpoint = key.sign(bad, 1, root, fixed_time());
            let err = checkpoint.verify(&key.public_key()).unwrap_err();
            assert!(
                matches!(err, CheckpointError::InvalidChainId { .. }),
                "{bad:?}: {err}"
            );
            let err = store.publish(&checkpoint).unwrap_err();
            assert!(
                matches!(err, CheckpointError::InvalidChainId { .. }),
                "{bad:?}: {err}"
            );
            let json = serde_json::to_string(&checkpoint).unwrap();
            assert!(
                serde_json::from_str::<Checkpoint>(&json).is_err(),
                "{bad:?}"
            );
        }
        let far = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap();
        let checkpoint = key.sign("c", 1, root, far);
        assert!(matches!(
            checkpoint.verify(&key.public_key()),
            Err(CheckpointError::TimestampOutOfRange { .. })
        ));
        let json = serde_json::to_string(&checkpoint).unwrap();
        assert!(serde_json::from_str::<Checkpoint>(&json).is_err());
        assert_eq!(
            fs::read_dir(&dir.0).unwrap().count(),
            0,
            "nothing published"
        );
        // Odd but legal chain ids sign and verify.
        for chain_id in ["..", "a b%c/ü", "\r\t", "-"] {
            let checkpoint = key.sign(chain_id, 0, root, fixed_time());
            checkpoint.verify(&key.public_key()).unwrap();
        }
    }

    #[test]
    fn json_refuses_every_other_spelling() {
        let good = serde_json::to_string(&sample()).unwrap();
        let checkpoint = sample();
        let root_hex = hex::encode(checkpoint.root_hash);
        let sig = BASE64.encode(checkpoint.signature);
        let cases = [
            (
                "version 2",
                good.replace(r#""version":1"#, r#""version":2"#),
            ),
            (
                "uppercase root",
                good.replace(&root_hex, &root_hex.to_uppercase()),
            ),
            ("short root", good.replace(&root_hex, &root_hex[2..])),
            (
                "uppercase key id",
                good.replace(&checkpoint.key_id, &checkpoint.key_id.to_uppercase()),
            ),
            (
                "long key id",
                good.replace(&checkpoint.key_id, &format!("{}00", checkpoint.key_id)),
            ),
            ("millis", good.replace(".123456Z", ".123Z")),
            ("nanos", good.replace(".123456Z", ".123456000Z")),
            ("no fraction", good.replace(".123456Z", "Z")),
            ("offset", good.replace(".123456Z", ".123456+00:00")),
            ("lowercase z", good.replace(".123456Z", ".123456z")),
            (
                "unpadded signature",
                good.replace(&sig, sig.trim_end_matches('=')),
            ),
            (
                "url-safe signature",
                good.replace(&sig, &sig.replace('+', "-").replace('/', "_")),
            ),
            (
                "short signature",
                good.replace(&sig, &BASE64.encode([0u8; 63])),
            ),
            ("newline chain", good.replace("orders/3", r"orders\n3")),
            ("empty chain", good.replace("orders/3", "")),
            (
                "unknown field",
                good.replace(r#"{"version":1"#, r#"{"version":1,"extra":0"#),
            ),
            ("missing field", good.replace(r#""tree_size":1234,"#, "")),
            ("negative size", good.replace("1234", "-1")),
        ];
        for (what, json) in cases {
            assert_ne!(json, good, "{what}: the test did not change anything");
            assert!(
                serde_json::from_str::<Checkpoint>(&json).is_err(),
                "{what} was accepted"
            );
        }
    }

    #[test]
    fn key_files_roundtrip() {
        let dir = TempDir::new();
        let key = SigningKeyPair::generate();
        let secret_path = dir.join("signing.json");
        let public_path = dir.join("public.json");
        write_signing_key(&key, &secret_path).unwrap();
        write_public_key(&key.public_key(), &public_path).unwrap();

        let loaded = load_signing_key(&secret_path).unwrap();
        assert_eq!(loaded.key_id(), key.key_id());
        assert_eq!(loaded.public_key(), key.public_key());
        assert_eq!(load_public_key(&public_path).unwrap(), key.public_key());

        let checkpoint = loaded.sign("c", 1, root_of("x"), Utc::now());
        checkpoint
            .verify(&load_public_key(&public_path).unwrap())
            .unwrap();

        let text = fs::read_to_string(&secret_path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["kind"], "ed25519-signing-key");
        assert_eq!(value["key_id"], key.key_id());
        assert_eq!(
            BASE64.decode(value["secret"].as_str().unwrap()).unwrap(),
            key.key.to_bytes()
        );
        let text = fs::read_to_string(&public_path).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["kind"], "ed25519-public-key");
        assert_eq!(value["public"], BASE64.encode(key.public_key().as_bytes()));
    }

    #[cfg(unix)]
    #[test]
    fn signing_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let path = dir.join("signing.json");
        let key = SigningKeyPair::generate();
        write_signing_key(&key, &path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        replace_signing_key(&key, &path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn create_new_refuses_to_replace_a_key() {
        let dir = TempDir::new();
        let path = dir.join("signing.json");
        let first = SigningKeyPair::generate();
        write_signing_key(&first, &path).unwrap();

        let second = SigningKeyPair::generate();
        let err = write_signing_key(&second, &path).unwrap_err();
        assert!(
            matches!(err, CheckpointError::KeyFileExists { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(load_signing_key(&path).unwrap().key_id(), first.key_id());

        replace_signing_key(&second, &path).unwrap();
        assert_eq!(load_signing_key(&path).unwrap().key_id(), second.key_id());

        let public = dir.join("public.json");
        write_public_key(&first.public_key(), &public).unwrap();
        let err = write_public_key(&second.public_key(), &public).unwrap_err();
        assert!(
            matches!(err, CheckpointError::KeyFileExists { .. }),
            "{err}"
        );
        assert_eq!(load_public_key(&public).unwrap(), first.public_key());
        replace_public_key(&second.public_key(), &public).unwrap();
        assert_eq!(load_public_key(&public).unwrap(), second.public_key());

        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 2);
    }

    #[test]
    fn bad_key_files_are_refused_without_printing_the_key() {
        let dir = TempDir::new();
        let key = fixed_key();
        let secret_b64 = BASE64.encode(SECRET);
        let public_b64 = BASE64.encode(key.public_key().as_bytes());
        let id = key.key_id().to_string();
        let signing = |kind: &str, key_id: &str, secret: &str| {
            format!(r#"{{"kind":"{kind}","key_id":"{key_id}","secret":"{secret}"}}"#)
        };
        let cases = [
            (
                "wrong kind",
                signing("ed25519-public-key", &id, &secret_b64),
                "kind is",
            ),
            (
                "wrong id",
                signing(SIGNING_KEY_KIND, "0000000000000000", &secret_b64),
                "key_id is",
            ),
            (
                "bad base64",
                signing(SIGNING_KEY_KIND, &id, "not base64!"),
                "base64",
            ),
            (
                "short",
                signing(SIGNING_KEY_KIND, &id, &BASE64.encode([7u8; 31])),
                "31 bytes",
            ),
            (
                "not json",
                format!("secret={secret_b64}"),
                "not a signing key file",
            ),
            (
                "number",
                r#"{"kind":"ed25519-signing-key","key_id":"x","secret":123456789}"#.to_string(),
                "not a signing key file",
            ),
            (
                "extra field",
                format!(
                    r#"{{"kind":"k","key_id":"{id}","secret":"{secret_b64}","x":"{secret_b64}"}}"#
                ),
                "not a signing key file",
            ),
        ];
        for (what, contents, expected) in cases {
            let path = dir.join(&format!("{}.json", what.replace(' ', "-")));
            fs::write(&path, &contents).unwrap();
            let err = load_signing_key(&path).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, CheckpointError::InvalidKeyFile { .. }),
                "{what}: {message}"
            );
            assert!(message.contains(expected), "{what}: {message}");
            assert!(
                message.contains(&path.display().to_string()),
                "{what}: {message}"
            );
            assert!(
                !message.contains(&secret_b64),
                "{what} leaks the secret: {message}"
            );
            assert!(
                !message.contains("123456789"),
                "{what} leaks a value: {message}"
            );
        }

        let missing = dir.join("missing.json");
        let err = load_signing_key(&missing).unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }));
        assert!(err.to_string().contains("missing.json"), "{err}");

        let public = |kind: &str, key_id: &str, public: &str| {
            format!(r#"{{"kind":"{kind}","key_id":"{key_id}","public":"{public}"}}"#)
        };
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let small_order = BASE64.encode(identity);
        let cases = [
            (
                "wrong kind",
                public(SIGNING_KEY_KIND, &id, &public_b64),
                "kind is",
            ),
            (
                "wrong id",
                public(PUBLIC_KEY_KIND, "0000000000000000", &public_b64),
                "key_id is",
            ),
            (
                "short",
                public(PUBLIC_KEY_KIND, &id, &BASE64.encode([1u8; 16])),
                "16 bytes",
            ),
            (
                "identity point",
                public(PUBLIC_KEY_KIND, &id, &small_order),
                "weak",
            ),
        ];
        for (what, contents, expected) in cases {
            let path = dir.join(&format!("public-{}.json", what.replace(' ', "-")));
            fs::write(&path, &contents).unwrap();
            let err = load_public_key(&path).unwrap_err();
            assert!(err.to_string().contains(expected), "{what}: {err}");
        }
    }

    #[test]
    fn debug_shows_the_key_id_only() {
        let key = fixed_key();
        let debug = format!("{key:?}");
        assert_eq!(
            debug,
            format!("SigningKeyPair {{ key_id: {:?}, .. }}", key.key_id())
        );
        assert!(!debug.contains(&BASE64.encode(SECRET)));
        assert!(!debug.contains(&hex::encode(SECRET)));
    }

    const ODD_CHAIN_IDS: [&str; 8] = [
        "orders/3",
        ".",
        "..",
        ".hidden",
        "a b%c",
        "ünï/cödé",
        "-x_y.z",
        "%2F",
    ];

    #[test]
    fn chain_dir_names_are_safe_and_reversible() {
        assert_eq!(encode_chain_dir("orders/3"), "orders%2F3");
        assert_eq!(encode_chain_dir("."), "%2E");
        assert_eq!(encode_chain_dir(".."), "%2E.");
        assert_eq!(encode_chain_dir("a.b-c_D9"), "a.b-c_D9");
        assert_eq!(encode_chain_dir("%2F"), "%252F");
        assert_eq!(encode_chain_dir("é"), "%C3%A9");
        for chain_id in ODD_CHAIN_IDS {
            let name = encode_chain_dir(chain_id);
            assert!(!name.starts_with('.') && !name.contains('/'), "{name}");
            assert_eq!(decode_chain_dir(&name).as_deref(), Some(chain_id));
        }
        for not_canonical in ["%2f", "%41", "a%2", "%zz", "", ".x", "a/b", "%+1", "%C3"] {
            assert_eq!(decode_chain_dir(not_canonical), None, "{not_canonical}");
        }
    }

    #[test]
    fn publish_and_load_roundtrip() {
        let dir = TempDir::new();
        let store = CheckpointDir::new(dir.join("checkpoints"));
        let key = fixed_key();
        let mut published = Vec::new();
        for chain_id in ODD_CHAIN_IDS {
            for tree_size in [10, 2, 0, u64::MAX] {
                let checkpoint = key.sign(
                    chain_id,
                    tree_size,
                    root_of(&format!("{chain_id}{tree_size}")),
                    fixed_time(),
                );
                assert_eq!(store.publish(&checkpoint).unwrap(), PublishOutcome::Written);
                published.push(checkpoint);
            }
        }
        published.sort_by(|a, b| (&a.chain_id, a.tree_size).cmp(&(&b.chain_id, b.tree_size)));
        assert_eq!(store.load_all().unwrap(), published);

        let path = store.path_of("orders/3", 10);
        assert!(
            path.ends_with("orders%2F3/00000000000000000010.json"),
            "{}",
            path.display()
        );
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!(
                "{}\n",
                serde_json::to_string(&published_for(&published, "orders/3", 10)).unwrap()
            )
        );

        for chain_id in ODD_CHAIN_IDS {
            let latest = store.latest(chain_id).unwrap().unwrap();
            assert_eq!(
                (latest.chain_id.as_str(), latest.tree_size),
                (chain_id, u64::MAX)
            );
            latest.verify(&key.public_key()).unwrap();
        }
        assert_eq!(store.latest("never published").unwrap(), None);
        // Nothing is written outside the directory, whatever the chain id.
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    fn published_for(all: &[Checkpoint], chain_id: &str, tree_size: u64) -> Checkpoint {
        all.iter()
            .find(|c| c.chain_id == chain_id && c.tree_size == tree_size)
            .unwrap()
            .clone()
    }

    #[test]
    fn publishing_twice_is_idempotent_and_a_different_root_conflicts() {
        let dir = TempDir::new();
        let store = CheckpointDir::new(&dir.0);
        let key = fixed_key();
        let checkpoint = key.sign("orders/3", 5, root_of("a"), fixed_time());
        assert_eq!(store.publish(&checkpoint).unwrap(), PublishOutcome::Written);
        assert_eq!(
            store.publish(&checkpoint).unwrap(),
            PublishOutcome::AlreadyPublished
        );

        // Re-signed later, same root: the first stays.
        let later = key.sign(
            "orders/3",
            5,
            root_of("a"),
            fixed_time() + chrono::Duration::seconds(1),
        );
        assert_eq!(
            store.publish(&later).unwrap(),
            PublishOutcome::AlreadyPublished
        );
        assert_eq!(store.latest("orders/3").unwrap(), Some(checkpoint.clone()));

        let forked = key.sign("orders/3", 5, root_of("b"), fixed_time());
        let err = store.publish(&forked).unwrap_err();
        assert!(
            matches!(err, CheckpointError::Conflict { tree_size: 5, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&hex::encode(root_of("a"))),
            "{err}"
        );
        assert_eq!(store.load_all().unwrap(), vec![checkpoint]);
        // Only the one file, no temporary leftovers.
        assert_eq!(fs::read_dir(dir.join("orders%2F3")).unwrap().count(), 1);
    }

    #[test]
    fn load_names_the_bad_file() {
        let dir = TempDir::new();
        let store = CheckpointDir::new(&dir.0);
        let key = fixed_key();
        store
            .publish(&key.sign("orders/3", 5, root_of("a"), fixed_time()))
            .unwrap();
        store
            .publish(&key.sign("orders/4", 6, root_of("a"), fixed_time()))
            .unwrap();

        // Temporary files, dot directories and other files are ignored.
        fs::write(
            dir.join("orders%2F3/.00000000000000000007.json.1234.tmp"),
            "partial",
        )
        .unwrap();
        fs::create_dir(dir.join(".staging")).unwrap();
        fs::write(dir.join("README"), "checkpoints").unwrap();
        fs::write(dir.join("orders%2F3/notes.txt"), "hello").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 2);

        let garbage = dir.join("orders%2F3/00000000000000000009.json");
        fs::write(&garbage, "{not json").unwrap();
        let err = store.load_all().unwrap_err();
        assert!(
            matches!(err, CheckpointError::MalformedFile { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("00000000000000000009.json"),
            "{err}"
        );
        assert!(store.latest("orders/3").is_err());
        fs::remove_file(&garbage).unwrap();

        // A valid checkpoint in the wrong place.
        let misplaced = dir.join("orders%2F3/00000000000000000006.json");
        fs::copy(store.path_of("orders/4", 6), &misplaced).unwrap();
        let err = store.load_all().unwrap_err();
        assert!(err.to_string().contains("orders/4"), "{err}");
        assert!(
            err.to_string().contains("00000000000000000006.json"),
            "{err}"
        );
        fs::remove_file(&misplaced).unwrap();

        let badly_named = dir.join("orders%2F3/6.json");
        fs::write(&badly_named, "{}").unwrap();
        let err = store.load_all().unwrap_err();
        assert!(
            matches!(err, CheckpointError::UnexpectedEntry { .. }),
            "{err}"
        );
        fs::remove_file(&badly_named).unwrap();

        fs::create_dir(dir.join("orders%2f3")).unwrap();
        let err = store.load_all().unwrap_err();
        assert!(err.to_string().contains("orders%2f3"), "{err}");
    }

    #[test]
    fn a_missing_directory_is_an_error_not_an_empty_log() {
        let dir = TempDir::new();
        let store = CheckpointDir::new(dir.join("typo"));
        let err = store.load_all().unwrap_err();
        assert!(err.to_string().contains("typo"), "{err}");
        assert!(store.latest("orders/3").is_err());
        // Publishing creates it.
        store.publish(&sample()).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![sample()]);
    }
}
