//! API bearer tokens: `audit-node tokens create`, and the tokens of `dev`.
//!
//! The node keeps only SHA-256 hashes (`--api-tokens FILE`). `dev` is the
//! exception that makes a first try easy: it keeps one token per role in
//! clear in DIR/tokens.json (mode 0600) and configures their hashes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use audit_api::auth::{entry_for, generate_token, Role, TokenTable};

/// The file in the dev state directory.
pub const DEV_TOKENS_FILE: &str = "tokens.json";

#[derive(clap::Subcommand, Debug)]
pub enum TokensCommand {
    /// Print a new random token and the entry to add to the --api-tokens file.
    Create {
        /// reader, auditor or admin.
        #[arg(long, value_parser = ["reader", "auditor", "admin"])]
        role: String,
        /// Name of the token (who uses it); recorded in the access log.
        #[arg(long)]
        name: String,
    },
}

pub fn command(command: TokensCommand) -> anyhow::Result<()> {
    let TokensCommand::Create { role, name } = command;
    let role: Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        anyhow::bail!("--name must be non-empty printable text");
    }
    let token = generate_token();
    let entry = entry_for(&name, role, &token);
    println!("token (shown once; give it to {name} and keep it secret):");
    println!("{token}");
    println!("entry to add to the \"tokens\" array of the --api-tokens file (AUDIT_API_TOKENS):");
    println!("{}", serde_json::to_string(&entry)?);
    Ok(())
}

/// The dev tokens: read from `path` if it exists, else created (0600).
pub fn dev_tokens(path: &Path) -> anyhow::Result<TokenTable> {
    let tokens: BTreeMap<String, String> = if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the dev API tokens {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "invalid dev API tokens {}; delete it to get new ones",
                path.display()
            )
        })?
    } else {
        let tokens: BTreeMap<String, String> = [Role::Reader, Role::Auditor, Role::Admin]
            .into_iter()
            .map(|role| (role.as_str().to_owned(), generate_token()))
            .collect();
        write_private(path, &serde_json::to_string_pretty(&tokens)?)?;
        tracing::info!(path = %path.display(), "dev API tokens created");
        tokens
    };
    let mut entries = Vec::new();
    for role in [Role::Reader, Role::Auditor, Role::Admin] {
        let token = tokens.get(role.as_str()).with_context(|| {
            format!(
                "{} has no {} token; delete it to get new ones",
                path.display(),
                role.as_str()
            )
        })?;
        entries.push(entry_for(&format!("dev-{role}"), role, token));
    }
    TokenTable::from_entries(entries).map_err(|e| anyhow::anyhow!(e))
}

/// Writes a new file readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_tokens_are_private_and_reused() {
        let dir = std::env::temp_dir().join(format!("audit-dev-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DEV_TOKENS_FILE);
        let _ = std::fs::remove_file(&path);
        let table = dev_tokens(&path).unwrap();
        assert_eq!(table.len(), 3);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let tokens: BTreeMap<String, String> = serde_json::from_str(&text).unwrap();
        for (role, name) in [
            (Role::Reader, "dev-reader"),
            (Role::Auditor, "dev-auditor"),
            (Role::Admin, "dev-admin"),
        ] {
            let caller = table.authenticate(&tokens[role.as_str()]).unwrap();
            assert_eq!((caller.name.as_str(), caller.role), (name, role));
        }
        // A second start keeps the same tokens.
        let again = dev_tokens(&path).unwrap();
        assert!(again.authenticate(&tokens["admin"]).is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
