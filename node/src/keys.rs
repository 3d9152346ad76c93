//! Where a command finds its keys and checkpoints: explicit flags, or a
//! state directory laid out by `audit-node keys init` (and by `dev`):
//!
//! ```text
//! DIR/keys/kek.json              key-encryption keys and the blind-index key (0600)
//! DIR/keys/signing-key.json      Ed25519 checkpoint signing key (0600)
//! DIR/keys/signing-key.pub.json  its public half, for `verify`
//! DIR/checkpoints/               published checkpoints, one directory per chain
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use audit_ledger::checkpoint::{self, CheckpointDir, SigningKeyPair};
use audit_ledger::protect::{EnvKeyProvider, KeyProvider, LocalKeyFile, Policy};
use audit_ledger::store::checkpointer::{CheckpointPolicy, Checkpointer};
use audit_ledger::store::protection::Protection;
use ed25519_dalek::VerifyingKey;

/// Key and checkpoint locations, shared by every command that needs them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// State directory holding keys/ and checkpoints/ (as created by `keys init` or `dev`).
    #[arg(long, env = "AUDIT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where key-encryption keys come from: `file` (--key-file) or `env` (AUDIT_KEK, AUDIT_BLIND_INDEX_KEY).
    #[arg(long, env = "AUDIT_KEK_PROVIDER", default_value = "file", value_parser = ["file", "env"])]
    pub kek_provider: String,
    /// Local key-encryption key file; default: STATE_DIR/keys/kek.json.
    #[arg(long, env = "AUDIT_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Ed25519 checkpoint signing key file; default: STATE_DIR/keys/signing-key.json.
    #[arg(long, env = "AUDIT_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Public key that checkpoints are verified with; default: STATE_DIR/keys/signing-key.pub.json.
    #[arg(long, env = "AUDIT_PUBLIC_KEY")]
    pub public_key: Option<PathBuf>,
    /// Directory checkpoints are published to (outside the database); default: STATE_DIR/checkpoints.
    #[arg(long = "checkpoints", env = "AUDIT_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
}

pub struct StateLayout {
    pub key_file: PathBuf,
    pub signing_key: PathBuf,
    pub public_key: PathBuf,
    pub checkpoints: PathBuf,
}

pub fn layout(dir: &Path) -> StateLayout {
    StateLayout {
        key_file: dir.join("keys").join("kek.json"),
        signing_key: dir.join("keys").join("signing-key.json"),
        public_key: dir.join("keys").join("signing-key.pub.json"),
        checkpoints: dir.join("checkpoints"),
    }
}

impl KeyArgs {
    fn pick(
        &self,
        explicit: &Option<PathBuf>,
        from_dir: fn(StateLayout) -> PathBuf,
    ) -> Option<PathBuf> {
        explicit
            .clone()
            .or_else(|| self.state_dir.as_deref().map(|d| from_dir(layout(d))))
    }

    pub fn key_file_path(&self) -> Option<PathBuf> {
        self.pick(&self.key_file, |l| l.key_file)
    }

    /// The KEK provider, or a clear error saying how to configure one.
    pub fn provider(&self) -> anyhow::Result<Arc<dyn KeyProvider>> {
        if self.kek_provider == "env" {
            let provider = EnvKeyProvider::from_env()
                .context("reading key-encryption keys from AUDIT_KEK and AUDIT_BLIND_INDEX_KEY")?;
            return Ok(Arc::new(provider));
        }
        let path = self.key_file_path().ok_or_else(|| {
            anyhow::anyhow!(
                "no key-encryption key: pass --key-file FILE or --state-dir DIR (create one with `audit-node keys init --state-dir DIR`), or use --kek-provider env"
            )
        })?;
        let file = LocalKeyFile::load(&path)
            .with_context(|| format!("loading key-encryption keys from {}", path.display()))?;
        Ok(Arc::new(file))
    }

    pub fn signing_key_path(&self) -> Option<PathBuf> {
        self.pick(&self.signing_key, |l| l.signing_key)
    }

    pub fn signing(&self) -> anyhow::Result<SigningKeyPair> {
        let path = self.signing_key_path().ok_or_else(|| {
            anyhow::anyhow!(
                "no checkpoint signing key: pass --signing-key FILE or --state-dir DIR (create one with `audit-node keys init --state-dir DIR`)"
            )
        })?;
        checkpoint::load_signing_key(&path)
            .with_context(|| format!("loading the checkpoint signing key from {}", path.display()))
    }

    pub fn verifying(&self) -> anyhow::Result<VerifyingKey> {
        let path = self.pick(&self.public_key, |l| l.public_key).ok_or_else(|| {
            anyhow::anyhow!("no public key to verify checkpoints with: pass --public-key FILE or --state-dir DIR")
        })?;
        checkpoint::load_public_key(&path)
            .with_context(|| format!("loading the checkpoint public key from {}", path.display()))
    }

    pub fn checkpoint_dir_path(&self) -> Option<PathBuf> {
        self.pick(&self.checkpoint_dir, |l| l.checkpoints)
    }

    pub fn checkpoint_dir(&self) -> anyhow::Result<Option<CheckpointDir>> {
        match self.checkpoint_dir_path() {
            None => Ok(None),
            Some(path) => {
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("creating checkpoint directory {}", path.display()))?;
                Ok(Some(CheckpointDir::new(path)))
            }
        }
    }
}

/// Loads the field-protection policy, or the built-in default.
pub fn load_policy(path: Option<&Path>) -> anyhow::Result<Policy> {
    match path {
        None => Ok(Policy::default_policy()),
        Some(path) => Policy::load(path)
            .with_context(|| format!("invalid field-protection policy {}", path.display())),
    }
}

/// Creates the keys of a state directory that has none yet; returns what it
/// created. Existing keys are never replaced.
pub fn init_state_dir(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let layout = layout(dir);
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir)
        .with_context(|| format!("creating {}", keys_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&keys_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", keys_dir.display()))?;
    }
    std::fs::create_dir_all(&layout.checkpoints)
        .with_context(|| format!("creating {}", layout.checkpoints.display()))?;
    let mut created = Vec::new();
    if !layout.key_file.exists() {
        LocalKeyFile::create(&layout.key_file)
            .with_context(|| format!("creating {}", layout.key_file.display()))?;
        created.push(layout.key_file.clone());
    }
    if !layout.signing_key.exists() {
        let pair = SigningKeyPair::generate();
        checkpoint::write_signing_key(&pair, &layout.signing_key)
            .with_context(|| format!("creating {}", layout.signing_key.display()))?;
        checkpoint::write_public_key(&pair.public_key(), &layout.public_key)
            .with_context(|| format!("creating {}", layout.public_key.display()))?;
        created.push(layout.signing_key.clone());
        created.push(layout.public_key.clone());
    } else if !layout.public_key.exists() {
        let pair = checkpoint::load_signing_key(&layout.signing_key)?;
        checkpoint::write_public_key(&pair.public_key(), &layout.public_key)?;
        created.push(layout.public_key.clone());
    }
    Ok(created)
}

/// Protection and checkpoint settings of `run` and `dev`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProtectionArgs {
    /// Field-protection policy (TOML); default: the built-in policy (docs/INTEGRITY.md).
    #[arg(long, env = "AUDIT_POLICY")]
    pub policy: Option<PathBuf>,
    /// Sign a checkpoint of a chain after this many new events.
    #[arg(long, env = "AUDIT_CHECKPOINT_EVERY", default_value_t = 10_000)]
    pub checkpoint_every: u64,
    /// ... or after this many seconds, whichever comes first.
    #[arg(long, env = "AUDIT_CHECKPOINT_INTERVAL_SECS", default_value_t = 60)]
    pub checkpoint_interval_secs: u64,
}

/// What the store needs to protect and checkpoint: built at start-up, so a
/// bad policy or missing key stops the node with a clear error.
#[derive(Debug, Clone)]
pub struct NodeProtection {
    pub protection: Arc<Protection>,
    pub checkpointer: Arc<Checkpointer>,
}

pub fn build_protection(
    keys: &KeyArgs,
    args: &ProtectionArgs,
    node_id: &str,
) -> anyhow::Result<NodeProtection> {
    if args.checkpoint_every == 0 || args.checkpoint_interval_secs == 0 {
        anyhow::bail!("--checkpoint-every and --checkpoint-interval-secs must be at least 1");
    }
    let policy = load_policy(args.policy.as_deref())?;
    let provider = keys.provider()?;
    let protection = Protection::new(policy, provider).context("setting up field protection")?;
    let checkpointer = Checkpointer::new(
        keys.signing()?,
        keys.checkpoint_dir()?,
        CheckpointPolicy {
            every_events: args.checkpoint_every,
            every: std::time::Duration::from_secs(args.checkpoint_interval_secs),
        },
        node_id,
    );
    Ok(NodeProtection {
        protection: Arc::new(protection),
        checkpointer: Arc::new(checkpointer),
    })
}
