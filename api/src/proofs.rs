//! Proof routes: the newest signed checkpoints, an event's inclusion proof
//! and the consistency proof between two checkpoints of a chain. The data
//! layer (and what a client checks) is `audit_ledger::proofs`; see
//! docs/INTEGRITY.md § Proofs.

use std::sync::Arc;

use audit_ledger::checkpoint::Checkpoint;
use audit_ledger::proofs::{self, ProofError};
use poem::http::StatusCode;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::ParseFromJSON;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use uuid::Uuid;

use crate::auth::{BearerAuth, Role};
use crate::disclose::store_error;
use crate::problem::{ApiError, Problem};
use crate::state::ApiState;

/// How often the node looks for chains whose checkpoint interval passed
/// (node/src/node.rs, maintenance loop): the wait for the next checkpoint
/// is at most the interval plus this.
const CHECKPOINT_TICK_SECS: u64 = 5;

/// Groups of routes of this module in the OpenAPI document.
#[derive(Tags)]
pub enum ProofTags {
    /// Signed checkpoints and Merkle proofs (RFC 9162) of the hash chains.
    Proofs,
}

/// A signed checkpoint, exactly as published: check `signature` (Ed25519,
/// standard base64) over `order-audit-trail checkpoint v1\n` + chain_id,
/// tree_size, root_hash and timestamp, each followed by `\n`, with the
/// node's public key (docs/INTEGRITY.md).
#[derive(Debug, Clone, Object)]
pub struct SignedCheckpoint {
    /// Always 1.
    pub version: u32,
    /// `topic/partition` of a Kafka chain, or `system`.
    pub chain_id: String,
    /// Events covered: the chain's first `tree_size`.
    pub tree_size: u64,
    /// RFC 9162 Merkle root of those events, 64 lowercase hex digits.
    pub root_hash: String,
    /// When it was signed: RFC 3339 UTC with six fractional digits and `Z`, as signed.
    pub timestamp: String,
    /// First 8 bytes of SHA-256 of the public key, 16 hex digits.
    pub key_id: String,
    pub signature: String,
}

fn signed(checkpoint: &Checkpoint) -> Result<SignedCheckpoint, ApiError> {
    // The checkpoint's own JSON form carries the exact signed spellings.
    let context = "showing a checkpoint";
    let value = serde_json::to_value(checkpoint).map_err(|e| ApiError::internal(context, &e))?;
    SignedCheckpoint::parse_from_json(Some(value))
        .map_err(|e| ApiError::internal(context, &e.into_message()))
}

#[derive(Debug, Clone, Object)]
pub struct LatestCheckpoints {
    /// The newest checkpoint of each chain, by chain id.
    pub checkpoints: Vec<SignedCheckpoint>,
}

/// That the event is leaf `leaf_index` of the tree `checkpoint` signs.
#[derive(Debug, Clone, Object)]
pub struct InclusionProof {
    pub event_id: Uuid,
    pub chain_id: String,
    /// The event's position in its chain (0-based).
    pub leaf_index: u64,
    /// The checkpoint's size.
    pub tree_size: u64,
    /// The event's chain hash (hex); the leaf hashes it.
    pub event_hash: String,
    /// `SHA-256(0x00 || event_hash)` (hex), RFC 9162 §2.1.1.
    pub leaf_hash: String,
    /// Sibling hashes from the leaf up to the root (hex), RFC 9162 §2.1.3.
    pub audit_path: Vec<String>,
    pub checkpoint: SignedCheckpoint,
}

/// That checkpoint `to` of a chain only appends to checkpoint `from`.
#[derive(Debug, Clone, Object)]
pub struct ConsistencyProof {
    pub chain_id: String,
    pub from: SignedCheckpoint,
    pub to: SignedCheckpoint,
    /// RFC 9162 §2.1.4 proof hashes (hex); empty when the sizes are equal.
    pub proof: Vec<String>,
}

#[derive(ApiResponse)]
pub enum InclusionResponse {
    #[oai(status = 200)]
    Proof(Json<InclusionProof>),
    /// The event is stored but no signed checkpoint covers it yet; retry
    /// after the given seconds.
    #[oai(status = 409, content_type = "application/problem+json")]
    NotYetCheckpointed(
        Json<Problem>,
        /// Seconds until the next checkpoint at the latest.
        #[oai(header = "Retry-After")]
        u32,
    ),
}

pub struct ProofsApi;

#[OpenApi]
impl ProofsApi {
    /// The newest signed checkpoint of every chain, or of one chain.
    #[oai(
        path = "/v1/checkpoints/latest",
        method = "get",
        tag = "ProofTags::Proofs",
        operation_id = "latest_checkpoints"
    )]
    async fn latest(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        /// Only this chain (`orders/3`, `system`); empty list if it has no checkpoint.
        #[oai(validator(min_length = 1, max_length = 1000))]
        chain: Query<Option<String>>,
    ) -> Result<Json<LatestCheckpoints>, ApiError> {
        auth.0.require(Role::Reader, "reading checkpoints")?;
        let context = "reading checkpoints";
        if let Some(chain) = &chain.0 {
            check_chain(chain)?;
        }
        let mut conn = connection(&state, context).await?;
        let checkpoints = proofs::latest_checkpoints(&mut conn, chain.0.as_deref())
            .await
            .map_err(|e| proof_error(e, context))?;
        let checkpoints = checkpoints
            .iter()
            .map(signed)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Json(LatestCheckpoints { checkpoints }))
    }

    /// The inclusion proof of an event against the newest checkpoint of
    /// its chain (or the one of size `tree_size`). 409 while no checkpoint
    /// covers the event yet.
    #[oai(
        path = "/v1/proofs/inclusion/:event_id",
        method = "get",
        tag = "ProofTags::Proofs",
        operation_id = "inclusion_proof"
    )]
    async fn inclusion(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        event_id: Path<Uuid>,
        /// Prove against the checkpoint of this size (one the client holds) instead of the newest.
        #[oai(validator(minimum(value = "1")))]
        tree_size: Query<Option<u64>>,
    ) -> Result<InclusionResponse, ApiError> {
        auth.0.require(Role::Reader, "reading proofs")?;
        let context = "making an inclusion proof";
        let mut conn = connection(&state, context).await?;
        let proof = match proofs::inclusion_proof_at(&mut conn, event_id.0, tree_size.0).await {
            Ok(proof) => proof,
            Err(ProofError::NotYetCheckpointed {
                event_id,
                chain_id,
                position,
                checkpointed,
            }) => {
                let wait = checkpoint_wait_secs(&state);
                let covered = match checkpointed {
                    Some(size) => format!("its newest checkpoint covers only the first {size}"),
                    None => "it has no checkpoint yet".to_owned(),
                };
                let when = match wait {
                    Some(secs) => format!("at most {secs} seconds"),
                    None => "at most --checkpoint-interval-secs".to_owned(),
                };
                let detail = format!(
                    "event {event_id} (position {position} of chain {chain_id}) is not yet covered by a checkpoint: \
                     {covered}; retry after the next one ({when})"
                );
                let retry_after = wait.map_or(60, |s| u32::try_from(s).unwrap_or(u32::MAX));
                return Ok(InclusionResponse::NotYetCheckpointed(
                    Json(Problem::new(StatusCode::CONFLICT, detail)),
                    retry_after,
                ));
            }
            Err(error) => return Err(proof_error(error, context)),
        };
        let checkpoint = signed(&proof.checkpoint)?;
        Ok(InclusionResponse::Proof(Json(InclusionProof {
            event_id: proof.event_id,
            chain_id: proof.chain_id,
            leaf_index: proof.leaf_index,
            tree_size: proof.tree_size,
            event_hash: proof.event_hash,
            leaf_hash: proof.leaf_hash,
            audit_path: proof.audit_path,
            checkpoint,
        })))
    }

    /// The consistency proof from the checkpoint of size `from` to the
    /// checkpoint of size `to` (default: the newest) of `chain`: both must
    /// be sizes of signed checkpoints.
    #[oai(
        path = "/v1/proofs/consistency",
        method = "get",
        tag = "ProofTags::Proofs",
        operation_id = "consistency_proof"
    )]
    async fn consistency(
        &self,
        auth: BearerAuth,
        state: Data<&Arc<ApiState>>,
        /// The chain: `topic/partition` (`orders/3`) or `system`.
        #[oai(validator(min_length = 1, max_length = 1000))]
        chain: Query<String>,
        /// Size of the older checkpoint (one the client holds).
        #[oai(validator(minimum(value = "1")))]
        from: Query<u64>,
        /// Size of the newer checkpoint; default: the chain's newest.
        #[oai(validator(minimum(value = "1")))]
        to: Query<Option<u64>>,
    ) -> Result<Json<ConsistencyProof>, ApiError> {
        auth.0.require(Role::Reader, "reading proofs")?;
        let context = "making a consistency proof";
        check_chain(&chain.0)?;
        let mut conn = connection(&state, context).await?;
        let proof = proofs::consistency_proof(&mut conn, &chain.0, from.0, to.0)
            .await
            .map_err(|e| proof_error(e, context))?;
        Ok(Json(ConsistencyProof {
            from: signed(&proof.from)?,
            to: signed(&proof.to)?,
            chain_id: proof.chain_id,
            proof: proof.proof,
        }))
    }
}

/// Chain ids are printable text; a control character (NUL above all, which
/// PostgreSQL refuses) is a 400, not a database error.
fn check_chain(chain: &str) -> Result<(), ApiError> {
    if chain.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "parameter `chain` must be printable text: a chain id looks like orders/3 or system",
        ));
    }
    Ok(())
}

async fn connection(
    state: &Arc<ApiState>,
    context: &str,
) -> Result<PoolConnection<Postgres>, ApiError> {
    state
        .pool()
        .acquire()
        .await
        .map_err(|e| ApiError::from_sqlx(e, context))
}

/// The longest wait for the next checkpoint, if the node knows its policy.
fn checkpoint_wait_secs(state: &ApiState) -> Option<u64> {
    let policy = state.checkpointer()?.policy();
    Some(policy.every.as_secs().max(1) + CHECKPOINT_TICK_SECS)
}

fn proof_error(error: ProofError, context: &str) -> ApiError {
    match error {
        ProofError::NotFound(message) => ApiError::not_found(message),
        ProofError::BadRequest(message) => ApiError::bad_request(message),
        ProofError::NotYetCheckpointed { .. } => ApiError::not_found(error.to_string()),
        // The store disagrees with its own signed checkpoint: a real 500.
        ProofError::Integrity(message) => ApiError::internal(context, &message),
        ProofError::Store(e) => store_error(e, context),
    }
}
