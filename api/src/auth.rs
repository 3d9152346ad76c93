//! Bearer tokens and roles: `reader` < `auditor` < `admin`.
//!
//! The node knows tokens only by their SHA-256 (`--api-tokens FILE`):
//!
//! ```json
//! {"tokens": [{"name": "ci", "role": "reader", "sha256": "<hex of SHA-256 of the token>"}]}
//! ```
//!
//! A presented token is hashed and compared with every configured hash in
//! constant time. Tokens never reach a log or an error message; names do.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::{Enum, SecurityScheme};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

use crate::problem::ApiError;
use crate::state::ApiState;

/// What a token may do. Each role includes the rights of the ones below it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Enum,
)]
#[serde(rename_all = "lowercase")]
#[oai(rename_all = "lowercase")]
pub enum Role {
    /// Events (protected fields redacted), streams, state, dead letters without raw values.
    Reader,
    /// Also decrypted reads (`decrypt=true` with a `purpose`), raw dead letters, the access log.
    Auditor,
    /// Also erasure of data subjects.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Auditor => "auditor",
            Self::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reader" => Ok(Self::Reader),
            "auditor" => Ok(Self::Auditor),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?}; use reader, auditor or admin"
            )),
        }
    }
}

/// Who is calling: the name and role of the token presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// 403 unless the caller's role is at least `needed`.
    pub fn require(&self, needed: Role, what: &str) -> Result<(), ApiError> {
        if self.role >= needed {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "{what} needs the {needed} role (or higher); token {:?} has the {} role",
            self.name, self.role
        )))
    }
}

// Extracting it authenticates the caller against the node's token table
// (401 otherwise); routes then check the role with `Caller::require` (403).
/// `Authorization: Bearer <token>`. Roles: reader < auditor < admin; an
/// operator creates tokens with `audit-node tokens create`.
#[derive(SecurityScheme)]
#[oai(
    rename = "bearer",
    ty = "bearer",
    bearer_format = "opaque",
    checker = "authenticate"
)]
pub struct BearerAuth(pub Caller);

async fn authenticate(req: &Request, bearer: Bearer) -> poem::Result<Caller> {
    let Some(state) = req.data::<Arc<ApiState>>() else {
        return Err(ApiError::internal("authenticating", &"the API state is not attached").into());
    };
    state.tokens().authenticate(&bearer.token).ok_or_else(|| {
        ApiError::unauthorized(
            "the bearer token is not one this node accepts; check it, or ask an operator for one \
             (`audit-node tokens create`, configured with --api-tokens)",
        )
        .into()
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "cannot read the API token file {path}: {source}; check --api-tokens (AUDIT_API_TOKENS)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid API token file {origin}: {reason}")]
    Invalid { origin: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenFileEntry>,
}

/// One entry of the token file, as `audit-node tokens create` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFileEntry {
    pub name: String,
    pub role: Role,
    /// Hex of the SHA-256 of the token.
    pub sha256: String,
}

#[derive(Clone)]
struct TokenHash {
    name: String,
    role: Role,
    sha256: [u8; 32],
}

/// The configured tokens, by hash.
#[derive(Default, Clone)]
pub struct TokenTable {
    entries: Vec<TokenHash>,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        f.debug_struct("TokenTable").field("names", &names).finish()
    }
}

impl TokenTable {
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    pub fn from_json(text: &str, origin: &str) -> Result<Self, TokenError> {
        let invalid = |reason: String| TokenError::Invalid {
            origin: origin.to_owned(),
            reason,
        };
        let file: TokenFile = serde_json::from_str(text).map_err(|e| {
            invalid(format!(
                "{e}; expected {{\"tokens\":[{{\"name\":\"ci\",\"role\":\"reader\",\"sha256\":\"<64 hex digits>\"}}]}}"
            ))
        })?;
        Self::from_entries(file.tokens).map_err(invalid)
    }

    pub fn from_entries(entries: Vec<TokenFileEntry>) -> Result<Self, String> {
        let mut table = Self::default();
        for entry in entries {
            if entry.name.trim().is_empty() || entry.name.chars().any(char::is_control) {
                return Err(format!(
                    "token name {:?} must be non-empty printable text",
                    entry.name
                ));
            }
            if table.entries.iter().any(|e| e.name == entry.name) {
                return Err(format!("token name {:?} appears twice", entry.name));
            }
            let mut sha256 = [0u8; 32];
            if hex::decode_to_slice(entry.sha256.trim(), &mut sha256).is_err() {
                return Err(format!(
                    "token {:?}: sha256 must be 64 hex digits (the SHA-256 of the token, as `audit-node tokens create` prints it)",
                    entry.name
                ));
            }
            table.entries.push(TokenHash {
                name: entry.name,
                role: entry.role,
                sha256,
            });
        }
        Ok(table)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The caller a token belongs to. Every entry is compared, in constant
    /// time, whatever matches, so timing tells nothing about the hashes.
    pub fn authenticate(&self, token: &str) -> Option<Caller> {
        let presented = hash_token(token);
        let mut found: Option<&TokenHash> = None;
        for entry in &self.entries {
            if bool::from(entry.sha256.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found.map(|e| Caller {
            name: e.name.clone(),
            role: e.role,
        })
    }
}

/// SHA-256 of a token's text.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token: 32 bytes from the OS CSPRNG, base64url.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The token file entry for a token.
pub fn entry_for(name: &str, role: Role, token: &str) -> TokenFileEntry {
    TokenFileEntry {
        name: name.to_owned(),
        role,
        sha256: hex::encode(hash_token(token)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_by_hash_only() {
        let reader = generate_token();
        let admin = generate_token();
        assert_ne!(reader, admin);
        assert_eq!(URL_SAFE_NO_PAD.decode(&reader).unwrap().len(), 32);
        let table = TokenTable::from_entries(vec![
            entry_for("ci", Role::Reader, &reader),
            entry_for("root", Role::Admin, &admin),
        ])
        .unwrap();
        assert_eq!(
            table.authenticate(&reader),
            Some(Caller {
                name: "ci".into(),
                role: Role::Reader
            })
        );
        assert_eq!(
            table.authenticate(&admin).map(|c| c.role),
            Some(Role::Admin)
        );
        assert_eq!(table.authenticate("guess"), None);
        assert_eq!(table.authenticate(""), None);
        assert!(!format!("{table:?}").contains(&reader));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Reader < Role::Auditor && Role::Auditor < Role::Admin);
        let auditor = Caller {
            name: "a".into(),
            role: Role::Auditor,
        };
        assert!(auditor.require(Role::Reader, "x").is_ok());
        assert!(auditor.require(Role::Auditor, "x").is_ok());
        let denied = auditor
            .require(Role::Admin, "erasing a subject")
            .unwrap_err();
        assert_eq!(denied.problem().status, 403);
        assert!(
            denied.problem().detail.contains("admin"),
            "{:?}",
            denied.problem()
        );
    }

    #[test]
    fn bad_token_files_say_what_to_fix() {
        for (text, needle) in [
            (
                r#"{"tokens":[{"name":"a","role":"root","sha256":"00"}]}"#,
                "role",
            ),
            (
                r#"{"tokens":[{"name":"a","role":"reader","sha256":"00"}]}"#,
                "64 hex",
            ),
            (
                r#"{"tokens":[{"name":"","role":"reader","sha256":"00"}]}"#,
                "non-empty",
            ),
            (r#"{"token":[]}"#, "expected"),
        ] {
            let error = TokenTable::from_json(text, "t.json")
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
        let h = hex::encode([7u8; 32]);
        let dup = format!(
            r#"{{"tokens":[{{"name":"a","role":"reader","sha256":"{h}"}},{{"name":"a","role":"admin","sha256":"{h}"}}]}}"#
        );
        assert!(TokenTable::from_json(&dup, "t")
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }
}
