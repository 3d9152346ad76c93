//! Data keys, key-encryption keys (KEKs) and the providers that hold them.
//!
//! Fields are encrypted with a [`DataKey`]; data keys are stored only wrapped
//! (encrypted) under a KEK that a [`KeyProvider`] holds. Rotating the KEK
//! re-wraps data keys ([`rewrap`]) and never touches stored events; erasing a
//! data key makes its fields unreadable (crypto-shredding).
//!
//! # Writing a KMS or Vault provider
//!
//! The trait is shaped after envelope encryption in cloud KMSs, so a remote
//! provider is a thin adapter:
//!
//! - **AWS KMS**: `wrap` = `Encrypt(KeyId = <kek arn>, Plaintext = dk bytes,
//!   EncryptionContext = {"key_id": dk.id()})`; `kek_version` = the key ARN
//!   (KMS rotates key material behind one ARN and `Decrypt` finds the right
//!   material itself, so the version only changes when you switch keys);
//!   `unwrap` = `Decrypt` with the same encryption context, which plays the
//!   role of our AAD: a wrapped key stored under another id fails to decrypt.
//! - **GCP KMS**: `Encrypt`/`Decrypt` on the crypto key with
//!   `additional_authenticated_data = key_id`; the primary version is used to
//!   encrypt and the version is embedded in the ciphertext.
//! - **HashiCorp Vault Transit**: `transit/encrypt/<name>` with
//!   `context = base64(key_id)` on a `derived = true` key; the returned
//!   `vault:vN:` prefix is the `kek_version`. `transit/rewrap/<name>` does
//!   [`rewrap`] server-side without exposing the data key; `min_decryption_version`
//!   is "retire".
//!
//! `blind_index_key` is synchronous because it is fetched once at start-up:
//! a remote provider keeps the blind-index key wrapped next to its
//! configuration and unwraps it in its constructor.
//!
//! Latency: a KMS round trip costs milliseconds, so never unwrap per event.
//! Unwrapped data keys belong in a bounded in-memory cache (keyed by key id,
//! with a TTL so an erasure takes effect), new data keys are wrapped once
//! when created, and `unwrap` calls run outside the ingest hot path with a
//! timeout. Map throttling and network errors to [`KeyError::Unavailable`]
//! (retryable) and authentication failures to [`KeyError::Integrity`].
//!
//! Key material lives in [`Zeroizing`] buffers and is never printed: `Debug`
//! of every key type shows only ids, and errors name files and variables,
//! never their content. Two caveats, both outside this module: AES round
//! keys are wiped on drop only if the `aes` crate's `zeroize` feature is on,
//! and `hmac`/`sha2` states (the blind-index key) are never wiped.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::blind::BlindIndexKey;
use super::error::KeyError;

/// Length of every key here: AES-256 and the HMAC-SHA256 blind-index key.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const WRAP_AAD_PREFIX: &[u8] = b"oat-dek-v1\0";
const KEY_FILE_KIND: &str = "audit-kek-file";

/// A data-encryption key and its AES-GCM instance (built once: key expansion
/// is the costliest part of encrypting a short field).
#[derive(Clone)]
pub struct DataKey {
    id: String,
    secret: Box<Zeroizing<[u8; KEY_LEN]>>,
    cipher: Aes256Gcm,
}

impl DataKey {
    /// A fresh random key with a random UUID as its id.
    pub fn generate() -> Self {
        Self::generate_with_id(Uuid::new_v4().to_string())
    }

    pub fn generate_with_id(id: impl Into<String>) -> Self {
        let mut secret = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        OsRng.fill_bytes(&mut secret[..]);
        Self::from_secret(id.into(), secret)
    }

    /// A key from its bytes, e.g. just unwrapped by a KMS.
    pub fn from_bytes(id: impl Into<String>, bytes: &[u8]) -> Result<Self, KeyError> {
        let id = id.into();
        if bytes.len() != KEY_LEN {
            return Err(KeyError::Config(format!(
                "data key {id} is {} bytes long, expected {KEY_LEN}",
                bytes.len()
            )));
        }
        let mut secret = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        secret[..].copy_from_slice(bytes);
        Ok(Self::from_secret(id, secret))
    }

    fn from_secret(id: String, secret: Box<Zeroizing<[u8; KEY_LEN]>>) -> Self {
        let cipher = new_cipher(&secret);
        Self { id, secret, cipher }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The raw key, for a provider to wrap it. Do not copy it anywhere else.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    pub(crate) fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn new_cipher(secret: &[u8; KEY_LEN]) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(secret))
}

/// A data key encrypted under a KEK version: what the key store keeps.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub key_id: String,
    pub kek_version: String,
    /// Provider-specific; for local KEKs: nonce || AES-GCM ciphertext+tag.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("key_id", &self.key_id)
            .field("kek_version", &self.kek_version)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// Holds the key-encryption keys. See the module documentation for how a
/// KMS or Vault implements it.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// Wraps `dk` under the current KEK version, bound to `dk.id()`.
    async fn wrap(&self, dk: &DataKey) -> Result<WrappedKey, KeyError>;
    /// Unwraps under the version the key names, if it is not retired.
    async fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, KeyError>;
    /// The KEK version `wrap` uses now.
    fn current_version(&self) -> String;
    /// What this provider is, for logs and errors; never a secret.
    fn describe(&self) -> String;
    /// The HMAC key for blind indexes (separate from every KEK).
    fn blind_index_key(&self) -> Result<BlindIndexKey, KeyError>;
}

/// Re-wraps a data key under the provider's current KEK version (KEK
/// rotation: data keys change wrapping, events stay untouched). A key
/// already wrapped under the current version is returned as is.
pub async fn rewrap<P>(provider: &P, wrapped: &WrappedKey) -> Result<WrappedKey, KeyError>
where
    P: KeyProvider + ?Sized,
{
    if wrapped.kek_version == provider.current_version() {
        return Ok(wrapped.clone());
    }
    let key = provider.unwrap(wrapped).await?;
    provider.wrap(&key).await
}

/// KEKs held in memory: the shared core of the local providers.
struct KekRing {
    /// For errors: which file or variable the keys came from.
    provider: String,
    current: String,
    keks: BTreeMap<String, Kek>,
    blind: BlindIndexKey,
}

struct Kek {
    cipher: Aes256Gcm,
    retired: bool,
}

impl KekRing {
    fn wrap(&self, dk: &DataKey) -> Result<WrappedKey, KeyError> {
        let Some(kek) = self.keks.get(&self.current) else {
            // Invariant: construction checks that `current` is in `keks`.
            unreachable!("current kek version is in the ring");
        };
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = wrap_aad(dk.id());
        let sealed = kek
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: dk.expose_secret(),
                    aad: &aad,
                },
            )
            .map_err(|_| KeyError::Config(format!("cannot wrap data key {}", dk.id())))?;
        let mut ciphertext = Vec::with_capacity(NONCE_LEN + sealed.len());
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&sealed);
        Ok(WrappedKey {
            key_id: dk.id().to_owned(),
            kek_version: self.current.clone(),
            ciphertext,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, KeyError> {
        let key_id = || wrapped.key_id.clone();
        let kek_version = || wrapped.kek_version.clone();
        let provider = || self.provider.clone();
        let Some(kek) = self.keks.get(&wrapped.kek_version) else {
            return Err(KeyError::UnknownVersion {
                key_id: key_id(),
                kek_version: kek_version(),
                provider: provider(),
            });
        };
        if kek.retired {
            return Err(KeyError::Retired {
                key_id: key_id(),
                kek_version: kek_version(),
                provider: provider(),
            });
        }
        let integrity = || KeyError::Integrity {
            key_id: key_id(),
            kek_version: kek_version(),
            provider: provider(),
        };
        if wrapped.ciphertext.len() < NONCE_LEN {
            return Err(integrity());
        }
        let (nonce, sealed) = wrapped.ciphertext.split_at(NONCE_LEN);
        let aad = wrap_aad(&wrapped.key_id);
        let secret = kek
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| integrity())?;
        DataKey::from_bytes(key_id(), &secret).map_err(|_| integrity())
    }

    fn describe(&self) -> String {
        let versions: Vec<String> = self
            .keks
            .iter()
            .map(|(version, kek)| match kek.retired {
                true => format!("{version} (retired)"),
                false => version.clone(),
            })
            .collect();
        format!(
            "{} (current kek {}; versions {})",
            self.provider,
            self.current,
            versions.join(", ")
        )
    }
}

fn wrap_aad(key_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_PREFIX.len() + key_id.len());
    aad.extend_from_slice(WRAP_AAD_PREFIX);
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

/// KEKs from a JSON key file (mode 0600):
/// `{"kind":"audit-kek-file","current":"v2","keks":{"v1":{"key":"<b64>","retired":false},…},"blind_index_key":"<b64>"}`.
///
/// A loaded provider is a snapshot: after `rotate` or `retire`, processes
/// pick up the change when they load the file again.
pub struct LocalKeyFile {
    path: PathBuf,
    ring: KekRing,
}

impl fmt::Debug for LocalKeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKeyFile")
            .field("path", &self.path)
            .field("current", &self.ring.current)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyProvider for LocalKeyFile {
    async fn wrap(&self, dk: &DataKey) -> Result<WrappedKey, KeyError> {
        self.ring.wrap(dk)
    }

    async fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, KeyError> {
        self.ring.unwrap(wrapped)
    }

    fn current_version(&self) -> String {
        self.ring.current.clone()
    }

    fn describe(&self) -> String {
        self.ring.describe()
    }

    fn blind_index_key(&self) -> Result<BlindIndexKey, KeyError> {
        Ok(self.ring.blind.clone())
    }
}

/// The key file as stored. Keys stay base64 text in zeroized buffers.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileDoc {
    kind: String,
    current: String,
    keks: BTreeMap<String, KekEntry>,
    blind_index_key: SecretText,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KekEntry {
    key: SecretText,
    #[serde(default)]
    retired: bool,
}

/// Base64 key text that is wiped when dropped.
struct SecretText(Zeroizing<String>);

impl SecretText {
    fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(bytes.as_mut_slice());
        Self(Zeroizing::new(BASE64.encode(bytes.as_slice())))
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|s| Self(Zeroizing::new(s)))
    }
}

/// Decodes a base64 key; `what` names it in the error, which never shows
/// any part of the text.
fn decode_key(text: &str, what: &dyn Fn() -> String) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN + 3));
    if BASE64.decode_vec(text.trim(), &mut bytes).is_err() {
        return Err(KeyError::Config(format!(
            "{} is not valid standard base64",
            what()
        )));
    }
    if bytes.len() != KEY_LEN {
        return Err(KeyError::Config(format!(
            "{} decodes to {} bytes, expected {KEY_LEN} (generate one with `openssl rand -base64 32`)",
            what(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

impl LocalKeyFile {
    /// Writes a new key file with a fresh KEK `v1` and blind-index key.
    /// Refuses to overwrite: an existing file may hold the only copy of the
    /// keys that protect stored events.
    pub fn create(path: &Path) -> Result<Self, KeyError> {
        let mut keks = BTreeMap::new();
        keks.insert(
            "v1".to_owned(),
            KekEntry {
                key: SecretText::generate(),
                retired: false,
            },
        );
        let doc = KeyFileDoc {
            kind: KEY_FILE_KIND.to_owned(),
            current: "v1".to_owned(),
            keks,
            blind_index_key: SecretText::generate(),
        };
        let ring = ring_from_doc(&doc, path)?;
        let contents = serialize_doc(&doc, path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => KeyError::Config(format!(
                    "key file {} already exists; refusing to overwrite it \
                     (it may hold the only copy of keys protecting stored events)",
                    path.display()
                )),
                _ => io_error("create", path, source),
            })?;
        if let Err(e) = write_and_sync(file, &contents, path).and_then(|()| sync_parent(path)) {
            // Do not leave a half-written file that `create` would then refuse to replace.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Self {
            path: path.to_owned(),
            ring,
        })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let doc = read_doc(path)?;
        let ring = ring_from_doc(&doc, path)?;
        Ok(Self {
            path: path.to_owned(),
            ring,
        })
    }

    /// Adds KEK version `v{N+1}` and makes it current; returns its name.
    /// Data keys stay wrapped under older versions until re-wrapped.
    pub fn rotate(path: &Path) -> Result<String, KeyError> {
        let _lock = FileLock::acquire(path)?;
        let mut doc = read_doc(path)?;
        ring_from_doc(&doc, path)?;
        let next = doc
            .keks
            .keys()
            .filter_map(|v| v.strip_prefix('v')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let version = format!("v{next}");
        doc.keks.insert(
            version.clone(),
            KekEntry {
                key: SecretText::generate(),
                retired: false,
            },
        );
        doc.current = version.clone();
        replace_doc(&doc, path)?;
        Ok(version)
    }

    /// Marks a KEK version retired: data keys wrapped under it no longer
    /// unwrap. Re-wrap them first ([`rewrap`]). The current version cannot
    /// be retired.
    pub fn retire(path: &Path, version: &str) -> Result<(), KeyError> {
        let _lock = FileLock::acquire(path)?;
        let mut doc = read_doc(path)?;
        ring_from_doc(&doc, path)?;
        if doc.current == version {
            return Err(KeyError::Config(format!(
                "kek version {version:?} is the current one in key file {}; \
                 rotate first, re-wrap data keys, then retire it",
                path.display()
            )));
        }
        let known: Vec<&str> = doc.keks.keys().map(String::as_str).collect();
        let known = known.join(", ");
        let Some(entry) = doc.keks.get_mut(version) else {
            return Err(KeyError::Config(format!(
                "key file {} has no kek version {version:?} (it has {known})",
                path.display()
            )));
        };
        entry.retired = true;
        replace_doc(&doc, path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> KeyError {
    KeyError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn read_doc(path: &Path) -> Result<KeyFileDoc, KeyError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| io_error("read", path, e))?);
    // Only the position of a parse error: serde messages may quote values.
    serde_json::from_slice(&bytes).map_err(|e| {
        KeyError::Config(format!(
            "key file {} is not a valid audit key file ({:?} error at line {} column {}); \
             expected {{\"kind\":\"{KEY_FILE_KIND}\",\"current\":\"v1\",\
             \"keks\":{{\"v1\":{{\"key\":\"<base64>\",\"retired\":false}}}},\
             \"blind_index_key\":\"<base64>\"}}",
            path.display(),
            e.classify(),
            e.line(),
            e.column()
        ))
    })
}

fn ring_from_doc(doc: &KeyFileDoc, path: &Path) -> Result<KekRing, KeyError> {
    let file = path.display();
    if doc.kind != KEY_FILE_KIND {
        return Err(KeyError::Config(format!(
            "{file} is not an audit key file (kind must be \"{KEY_FILE_KIND}\")"
        )));
    }
    let Some(current) = doc.keks.get(&doc.current) else {
        return Err(KeyError::Config(format!(
            "key file {file}: current kek version {:?} is not among its keks",
            doc.current
        )));
    };
    if current.retired {
        return Err(KeyError::Config(format!(
            "key file {file}: current kek version {:?} is retired; make another version current",
            doc.current
        )));
    }
    let mut keks = BTreeMap::new();
    for (version, entry) in &doc.keks {
        let secret = decode_key(&entry.key.0, &|| {
            format!("key file {file}: kek {version:?}")
        })?;
        let kek = Kek {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&secret)),
            retired: entry.retired,
        };
        keks.insert(version.clone(), kek);
    }
    let blind = decode_key(&doc.blind_index_key.0, &|| {
        format!("key file {file}: blind_index_key")
    })?;
    Ok(KekRing {
        provider: format!("key file {file}"),
        current: doc.current.clone(),
        keks,
        blind: BlindIndexKey::from_bytes(&blind)?,
    })
}

fn serialize_doc(doc: &KeyFileDoc, path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    // Sized up front so growing the buffer leaves no unwiped copies behind.
    let mut contents = Zeroizing::new(Vec::with_capacity(1024 + 128 * doc.keks.len()));
    serde_json::to_writer_pretty(&mut *contents, doc)
        .map_err(|_| KeyError::Config(format!("cannot serialise key file {}", path.display())))?;
    contents.push(b'\n');
    Ok(contents)
}

/// Replaces the key file atomically: a crash leaves the old or the new one.
fn replace_doc(doc: &KeyFileDoc, path: &Path) -> Result<(), KeyError> {
    let contents = serialize_doc(doc, path)?;
    let temp = sibling(path, &format!(".tmp-{}", Uuid::new_v4().simple()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| io_error("create", &temp, e))?;
    let written = write_and_sync(file, &contents, &temp)
        .and_then(|()| std::fs::rename(&temp, path).map_err(|e| io_error("replace", path, e)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    sync_parent(path)
}

fn write_and_sync(mut file: File, contents: &[u8], path: &Path) -> Result<(), KeyError> {
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", path, e))
}

fn sync_parent(path: &Path) -> Result<(), KeyError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| io_error("sync the directory of", path, e))
}

/// `keys.json` -> `.keys.json{suffix}` in the same directory.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{suffix}"))
}

/// An exclusive `flock` on `.{file}.lock`, so two concurrent rotations cannot
/// each add a `vN+1` and lose one of them (and every data key wrapped under
/// it). The lock file stays; the kernel releases the lock with the process.
struct FileLock {
    _file: File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<Self, KeyError> {
        let lock_path = sibling(path, ".lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_error("open the lock file of", path, e))?;
        // SAFETY: flock on a descriptor we own; it stays open while locked.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if locked != 0 {
            return Err(io_error(
                "lock",
                &lock_path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self { _file: file })
    }
}

/// KEKs from environment variables: `AUDIT_KEK="v1:<b64>,v2:<b64>"` (the
/// last is current unless `AUDIT_KEK_CURRENT` names one) and
/// `AUDIT_BLIND_INDEX_KEY="<b64>"`. No version is ever retired here: retire
/// one by removing it from the variable.
pub struct EnvKeyProvider {
    ring: KekRing,
}

impl fmt::Debug for EnvKeyProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvKeyProvider")
            .field("current", &self.ring.current)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyProvider for EnvKeyProvider {
    async fn wrap(&self, dk: &DataKey) -> Result<WrappedKey, KeyError> {
        self.ring.wrap(dk)
    }

    async fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, KeyError> {
        self.ring.unwrap(wrapped)
    }

    fn current_version(&self) -> String {
        self.ring.current.clone()
    }

    fn describe(&self) -> String {
        self.ring.describe()
    }

    fn blind_index_key(&self) -> Result<BlindIndexKey, KeyError> {
        Ok(self.ring.blind.clone())
    }
}

impl EnvKeyProvider {
    pub fn from_env() -> Result<Self, KeyError> {
        let kek = env_secret("AUDIT_KEK")?.ok_or_else(|| {
            KeyError::Config(
                "AUDIT_KEK is not set; set it to \"v1:<base64 32-byte key>\" or use a key file"
                    .to_owned(),
            )
        })?;
        let blind = env_secret("AUDIT_BLIND_INDEX_KEY")?.ok_or_else(|| {
            KeyError::Config(
                "AUDIT_BLIND_INDEX_KEY is not set; set it to a base64 32-byte key".to_owned(),
            )
        })?;
        let current = env_secret("AUDIT_KEK_CURRENT")?.filter(|c| !c.trim().is_empty());
        Self::from_values(&kek, current.as_deref().map(String::as_str), &blind)
    }

    /// The variables' values, parsed: `kek` as `AUDIT_KEK`, `current` as
    /// `AUDIT_KEK_CURRENT`, `blind` as `AUDIT_BLIND_INDEX_KEY`.
    pub fn from_values(kek: &str, current: Option<&str>, blind: &str) -> Result<Self, KeyError> {
        let mut keks = BTreeMap::new();
        let mut last = None;
        for (number, entry) in kek.split(',').enumerate().map(|(i, e)| (i + 1, e)) {
            let Some((version, key)) = entry.trim().split_once(':') else {
                return Err(KeyError::Config(format!(
                    "AUDIT_KEK entry #{number} has no version; expected \"v1:<base64 key>,v2:<base64 key>\""
                )));
            };
            let version = version.trim();
            if !valid_version(version) {
                return Err(KeyError::Config(format!(
                    "AUDIT_KEK entry #{number} has an invalid version name; \
                     use 1-64 letters, digits, '.', '-' or '_' (e.g. \"v1\")"
                )));
            }
            let secret = decode_key(key, &|| format!("AUDIT_KEK version {version:?}"))?;
            let kek = Kek {
                cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&secret)),
                retired: false,
            };
            if keks.insert(version.to_owned(), kek).is_some() {
                return Err(KeyError::Config(format!(
                    "AUDIT_KEK lists version {version:?} twice; give each key its own version"
                )));
            }
            last = Some(version.to_owned());
        }
        let current = match current.map(str::trim) {
            Some(current) if !keks.contains_key(current) => {
                let known: Vec<&str> = keks.keys().map(String::as_str).collect();
                return Err(KeyError::Config(format!(
                    "AUDIT_KEK_CURRENT names version {current:?}, which AUDIT_KEK does not have \
                     (it has {})",
                    known.join(", ")
                )));
            }
            Some(current) => current.to_owned(),
            // Invariant: `split` yields at least one entry, so `last` is set.
            None => last.expect("AUDIT_KEK has at least one entry"),
        };
        let blind = decode_key(blind, &|| "AUDIT_BLIND_INDEX_KEY".to_owned())?;
        Ok(Self {
            ring: KekRing {
                provider: "AUDIT_KEK".to_owned(),
                current,
                keks,
                blind: BlindIndexKey::from_bytes(&blind)?,
            },
        })
    }
}

fn valid_version(version: &str) -> bool {
    (1..=64).contains(&version.len())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn env_secret(name: &str) -> Result<Option<Zeroizing<String>>, KeyError> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(Zeroizing::new(value))),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(KeyError::Config(format!(
            "{name} is not valid UTF-8; it must be base64 text"
        ))),
    }
}

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
