use std::os::unix::fs::PermissionsExt;

use super::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("protect-keys-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn b64_key(byte: u8) -> String {
    BASE64.encode([byte; KEY_LEN])
}

fn file_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read key file")).expect("json key file")
}

/// Every key text in a key file, to check that messages never contain them.
fn secrets_of(path: &Path) -> Vec<String> {
    let doc = file_json(path);
    let mut secrets = vec![doc["blind_index_key"]
        .as_str()
        .expect("blind key")
        .to_owned()];
    for kek in doc["keks"].as_object().expect("keks").values() {
        secrets.push(kek["key"].as_str().expect("kek").to_owned());
    }
    secrets
}

#[test]
fn data_key_debug_hides_the_key() {
    let key = DataKey::from_bytes("dk-1", &[0xab; KEY_LEN]).expect("key");
    let debug = format!("{key:?}");
    assert_eq!(debug, "DataKey { id: \"dk-1\", key: \"<redacted>\" }");
    for leak in ["171", "ab", "AB", "q6ur"] {
        assert!(!debug.contains(leak), "{debug} contains {leak}");
    }
    let generated = DataKey::generate();
    assert!(Uuid::parse_str(generated.id()).is_ok());
    let debug = format!("{generated:?}");
    assert!(!debug.contains(&hex::encode(generated.expose_secret())));
    assert!(!debug.contains(&format!("{:?}", generated.expose_secret())));
}

#[test]
fn data_keys_are_random_and_checked() {
    assert_ne!(
        DataKey::generate().expose_secret(),
        DataKey::generate().expose_secret()
    );
    let error = DataKey::from_bytes("dk", &[1u8; 31]).expect_err("short key");
    assert!(
        error.to_string().contains("31 bytes long, expected 32"),
        "{error}"
    );
}

#[tokio::test]
async fn key_file_create_load_wrap_unwrap() {
    let dir = TempDir::new();
    let path = dir.file("keys.json");
    let created = LocalKeyFile::create(&path).expect("create");
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let doc = file_json(&path);
    assert_eq!(doc["kind"], "audit-kek-file");
    assert_eq!(doc["current"], "v1");
    assert_eq!(doc["keks"]["v1"]["retired"], false);
    let kek = BASE64
        .decode(doc["keks"]["v1"]["key"].as_str().expect("key"))
        .expect("b64");
    assert_eq!(kek.len(), KEY_LEN);

    let loaded = LocalKeyFile::load(&path).expect("load");
    assert_eq!(loaded.current_version(), "v1");
    let dk = DataKey::generate();
    let wrapped = created.wrap(&dk).await.expect("wrap");
    assert_eq!(wrapped.key_id, dk.id());
    assert_eq!(wrapped.kek_version, "v1");
    assert_eq!(wrapped.ciphertext.len(), NONCE_LEN + KEY_LEN + 16);
    let unwrapped = loaded.unwrap(&wrapped).await.expect("unwrap");
    assert_eq!(unwrapped.id(), dk.id());
    assert_eq!(unwrapped.expose_secret(), dk.expose_secret());

    // Both providers share the blind-index key of the file.
    let token = |p: &LocalKeyFile| {
        let rule = super::super::policy::BlindIndexRule {
            name: "email".into(),
            field: super::super::policy::Pointer::parse("/e").expect("pointer"),
            normalize: super::super::policy::Normalize::None,
        };
        super::super::blind::query_token(&p.blind_index_key().expect("blind key"), &rule, "x")
    };
    assert_eq!(token(&created), token(&loaded));

    let description = loaded.describe();
    assert!(description.contains("keys.json") && description.contains("current kek v1"));
    for secret in secrets_of(&path) {
        assert!(!description.contains(&secret));
        assert!(!format!("{loaded:?}").contains(&secret));
    }
}

#[test]
fn key_file_create_refuses_to_overwrite() {
    let dir = TempDir::new();
    let path = dir.file("keys.json");
    LocalKeyFile::create(&path).expect("create");
    let before = std::fs::read(&path).expect("read");
    let error = LocalKeyFile::create(&path).expect_err("second create");
    assert!(
        error
            .to_string()
            .contains("already exists; refusing to overwrite"),
        "{error}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[tokio::test]
async fn rotation_keeps_old_data_keys_readable_and_rewrap_moves_them() {
    let dir = TempDir::new();
    let path = dir.file("keys.json");
    let v1 = LocalKeyFile::create(&path).expect("create");
    let dk = DataKey::generate();
    let under_v1 = v1.wrap(&dk).await.expect("wrap");

    assert_eq!(LocalKeyFile::rotate(&path).expect("rotate"), "v2");
    let v2 = LocalKeyFile::load(&path).expect("load");
    assert_eq!(v2.current_version(), "v2");
    let old = v2.unwrap(&under_v1).await.expect("v1 key still unwraps");
    assert_eq!(old.expose_secret(), dk.expose_secret());

    let moved = rewrap(&v2, &under_v1).await.expect("rewrap");
    assert_eq!(moved.kek_version, "v2");
    assert_eq!(moved.key_id, dk.id());
    assert_ne!(moved.ciphertext, under_v1.ciphertext);
    let again = v2.unwrap(&moved).await.expect("unwrap v2");
    assert_eq!(again.expose_secret(), dk.expose_secret());
    assert_eq!(rewrap(&v2, &moved).await.expect("no-op"), moved);

    // Through the trait object, as the node holds it.
    let provider: &dyn KeyProvider = &v2;
    assert_eq!(
        rewrap(provider, &under_v1)
            .await
            .expect("rewrap")
            .kek_version,
        "v2"
    );

    let error = LocalKeyFile::retire(&path, "v2").expect_err("current");
    assert!(error.to_string().contains("is the current one"), "{error}");
    let error = LocalKeyFile::retire(&path, "v9").expect_err("unknown");
    assert!(
        error
            .to_string()
            .contains("has no kek version \"v9\" (it has v1, v2)"),
        "{error}"
    );

    LocalKeyFile::retire(&path, "v1").expect("retire");
    let retired = LocalKeyFile::load(&path).expect("load");
    assert!(matches!(
        retired.unwrap(&under_v1).await,
        Err(KeyError::Retired { .. })
    ));
    retired
        .unwrap(&moved)
        .await
        .expect("re-wrapped key survives retirement");
    assert!(retired.describe().contains("v1 (retired), v2"));

    assert_eq!(LocalKeyFile::rotate(&path).expect("rotate"), "v3");
    let doc = file_json(&path);
    assert_eq!(doc["keks"]["v1"]["retired"], true);
    assert_eq!(doc["current"], "v3");
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "rotation keeps the file private");
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn concurrent_rotations_lose_no_version() {
    let dir = TempDir::new();
    let path = dir.file("keys.json");
    LocalKeyFile::create(&path).expect("create");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| LocalKeyFile::rotate(&path).expect("rotate"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut versions: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 20);
    let keks = file_json(&path)["keks"].as_object().expect("keks").len();
    assert_eq!(keks, 21);
}

#[tokio::test]
async fn tampered_or_misfiled_wrapped_keys_are_refused() {
    let dir = TempDir::new();
    let provider = LocalKeyFile::create(&dir.file("keys.json")).expect("create");
    let wrapped = provider.wrap(&DataKey::generate()).await.expect("wrap");

    let mut flipped = wrapped.clone();
    flipped.ciphertext[NONCE_LEN + 3] ^= 1;
    let mut renamed = wrapped.clone();
    renamed.key_id = "another-key".into();
    let mut truncated = wrapped.clone();
    truncated.ciphertext.truncate(5);
    for bad in [flipped, renamed, truncated] {
        let error = provider.unwrap(&bad).await.expect_err("refused");
        assert!(matches!(error, KeyError::Integrity { .. }), "{error}");
    }

    let mut unknown = wrapped.clone();
    unknown.kek_version = "v7".into();
    let error = provider
        .unwrap(&unknown)
        .await
        .expect_err("unknown version");
    assert!(matches!(error, KeyError::UnknownVersion { .. }), "{error}");
    assert!(error.to_string().contains("\"v7\""), "{error}");

    // Same version name, different key (another installation's file).
    let other = LocalKeyFile::create(&dir.file("other.json")).expect("create");
    let error = other.unwrap(&wrapped).await.expect_err("foreign kek");
    assert!(matches!(error, KeyError::Integrity { .. }), "{error}");
}

#[test]
fn broken_key_files_are_refused_without_showing_keys() {
    let dir = TempDir::new();
    let path = dir.file("keys.json");
    let good_key = b64_key(7);
    let short_key = BASE64.encode([7u8; 16]);
    let file = |current: &str, kek: &str, retired: &str, blind: &str| {
        format!(
            r#"{{"kind":"audit-kek-file","current":"{current}","keks":{{"v1":{{"key":"{kek}","retired":{retired}}}}},"blind_index_key":"{blind}"}}"#
        )
    };
    let cases = [
        (
            file("v1", "not base64!!", "false", &good_key),
            "kek \"v1\" is not valid standard base64",
        ),
        (
            file("v1", &short_key, "false", &good_key),
            "decodes to 16 bytes, expected 32",
        ),
        (
            file("v1", &good_key, "false", &short_key),
            "blind_index_key decodes to 16 bytes",
        ),
        (
            file("v2", &good_key, "false", &good_key),
            "current kek version \"v2\" is not among",
        ),
        (
            file("v1", &good_key, "true", &good_key),
            "current kek version \"v1\" is retired",
        ),
        // A key pasted where a bool belongs: serde would quote it.
        (
            file("v1", &good_key, &format!("\"{good_key}\""), &good_key),
            "not a valid audit key file",
        ),
        (
            "{\"kind\":\"other\"}".to_owned(),
            "not a valid audit key file",
        ),
        (
            file("v1", &good_key, "false", &good_key).replace("audit-kek-file", "x"),
            "is not an audit key file",
        ),
    ];
    for (contents, expected) in cases {
        std::fs::write(&path, &contents).expect("write");
        let error = LocalKeyFile::load(&path).expect_err("refused").to_string();
        assert!(
            error.contains(expected),
            "expected {expected:?} in: {error}"
        );
        assert!(error.contains("keys.json"), "{error}");
        for secret in [&good_key, &short_key, "not base64!!"] {
            assert!(!error.contains(secret), "{error} shows a key");
        }
    }
    let error = LocalKeyFile::load(&dir.file("absent.json")).expect_err("missing");
    assert!(
        error.to_string().starts_with("cannot read key file"),
        "{error}"
    );
}

#[tokio::test]
async fn env_provider_reads_versions_and_current() {
    let kek = format!("v1:{}, v2:{}", b64_key(1), b64_key(2));
    let blind = b64_key(3);
    let provider = EnvKeyProvider::from_values(&kek, None, &blind).expect("valid");
    assert_eq!(provider.current_version(), "v2");
    let dk = DataKey::generate();
    let wrapped = provider.wrap(&dk).await.expect("wrap");
    assert_eq!(wrapped.kek_version, "v2");

    let pinned = EnvKeyProvider::from_values(&kek, Some("v1"), &blind).expect("valid");
    assert_eq!(pinned.current_version(), "v1");
    let unwrapped = pinned.unwrap(&wrapped).await.expect("v2 still unwraps");
    assert_eq!(unwrapped.expose_secret(), dk.expose_secret());
    assert_eq!(
        rewrap(&pinned, &wrapped).await.expect("rewrap").kek_version,
        "v1"
    );

    // The same KEK bytes under the same version unwrap across providers.
    let only_v2 =
        EnvKeyProvider::from_values(&format!("v2:{}", b64_key(2)), None, &blind).expect("valid");
    only_v2.unwrap(&wrapped).await.expect("unwrap");
    let description = provider.describe();
    assert!(
        description.contains("AUDIT_KEK (current kek v2; versions v1, v2)"),
        "{description}"
    );
    assert!(!description.contains(&b64_key(1)) && !format!("{provider:?}").contains(&b64_key(1)));
}

#[test]
fn env_provider_refuses_bad_values_without_showing_keys() {
    let key = b64_key(1);
    let blind = b64_key(3);
    let short = BASE64.encode([1u8; 8]);
    let cases = [
        (
            key.clone(),
            None,
            blind.clone(),
            "AUDIT_KEK entry #1 has no version",
        ),
        (
            format!("v1:{key},{key}"),
            None,
            blind.clone(),
            "entry #2 has no version",
        ),
        (
            format!("v1:{key},v1:{key}"),
            None,
            blind.clone(),
            "lists version \"v1\" twice",
        ),
        (
            format!("v 1:{key}"),
            None,
            blind.clone(),
            "invalid version name",
        ),
        (
            format!(":{key}"),
            None,
            blind.clone(),
            "invalid version name",
        ),
        (
            "v1:@@@".to_owned(),
            None,
            blind.clone(),
            "AUDIT_KEK version \"v1\" is not valid",
        ),
        (
            format!("v1:{short}"),
            None,
            blind.clone(),
            "decodes to 8 bytes",
        ),
        (
            format!("v1:{key}"),
            Some("v3"),
            blind.clone(),
            "AUDIT_KEK_CURRENT names version \"v3\"",
        ),
        (
            format!("v1:{key}"),
            None,
            short.clone(),
            "AUDIT_BLIND_INDEX_KEY decodes to 8 bytes",
        ),
        (
            String::new(),
            None,
            blind.clone(),
            "entry #1 has no version",
        ),
    ];
    for (kek, current, blind_value, expected) in cases {
        let error = EnvKeyProvider::from_values(&kek, current, &blind_value)
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains(expected),
            "expected {expected:?} in: {error}"
        );
        for secret in [&key, &blind, &short] {
            assert!(!error.contains(secret.as_str()), "{error} shows a key");
        }
    }
}

#[test]
fn wrapped_key_debug_shows_no_bytes() {
    let wrapped = WrappedKey {
        key_id: "dk".into(),
        kek_version: "v1".into(),
        ciphertext: vec![0xee; 60],
    };
    assert_eq!(
        format!("{wrapped:?}"),
        "WrappedKey { key_id: \"dk\", kek_version: \"v1\", ciphertext_len: 60 }"
    );
}

/// A wrapped key decrypts by hand with the KEK from the file and the
/// documented AAD, `oat-dek-v1\0` + key id, as nonce || ciphertext.
#[tokio::test]
async fn wrapped_key_layout_is_the_documented_one() {
    use aes_gcm::aead::Aead;

    let dir = TempDir::new();
    let path = dir.file("keys.json");
    let provider = LocalKeyFile::create(&path).expect("create");
    let dk = DataKey::generate_with_id("subject-42");
    let wrapped = provider.wrap(&dk).await.expect("wrap");

    let kek = BASE64
        .decode(file_json(&path)["keks"]["v1"]["key"].as_str().expect("kek"))
        .expect("b64");
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&kek));
    let (nonce, sealed) = wrapped.ciphertext.split_at(NONCE_LEN);
    let secret = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: b"oat-dek-v1\x00subject-42",
            },
        )
        .expect("documented aad");
    assert_eq!(secret.as_slice(), dk.expose_secret());
}
