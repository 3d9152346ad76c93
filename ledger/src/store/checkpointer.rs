//! Signed Merkle checkpoints of the chains a node writes.
//!
//! After each committed batch the store tells the checkpointer its chain's
//! new head. A checkpoint is due every `every_events` events or every
//! `every` of time per chain (whichever comes first, checked after commits
//! and by [`Checkpointer::flush_due`] on a timer); [`Checkpointer::flush_all`]
//! writes a final one of every chain at shutdown. Each checkpoint is stored
//! in `checkpoints` and published outside the database (a directory).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;

use super::chain::ChainHead;
use crate::checkpoint::{Checkpoint, CheckpointDir, SigningKeyPair};
use crate::error::StoreError;

/// When checkpoints are due.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub every_events: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_events: 10_000,
            every: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
struct ChainState {
    /// The newest head this node committed.
    size: u64,
    root: [u8; 32],
    /// What the last checkpoint covered, and when it was made.
    checkpointed: u64,
    at: Instant,
}

pub struct Checkpointer {
    key: SigningKeyPair,
    dir: Option<CheckpointDir>,
    policy: CheckpointPolicy,
    writer: String,
    chains: Mutex<HashMap<String, ChainState>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("key_id", &self.key.key_id())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    pub fn new(
        key: SigningKeyPair,
        dir: Option<CheckpointDir>,
        policy: CheckpointPolicy,
        writer: impl Into<String>,
    ) -> Self {
        Self {
            key,
            dir,
            policy,
            writer: writer.into(),
            chains: Mutex::new(HashMap::new()),
        }
    }

    /// When checkpoints are due (the API tells clients how long to wait).
    pub fn policy(&self) -> CheckpointPolicy {
        self.policy
    }

    pub fn key_id(&self) -> String {
        self.key.key_id().to_owned()
    }

    /// Records a committed head; checkpoints it if one is due. Failures are
    /// logged, not returned: the batch is already durable, and the next
    /// checkpoint covers it.
    pub async fn observe(&self, pool: &PgPool, head: &ChainHead) {
        let due = {
            let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
            let state = chains
                .entry(head.chain_id.clone())
                .or_insert_with(|| ChainState {
                    size: 0,
                    root: [0; 32],
                    checkpointed: 0,
                    at: Instant::now(),
                });
            if head.length >= state.size {
                state.size = head.length;
                state.root = head.root();
            }
            state.size > state.checkpointed
                && (state.size - state.checkpointed >= self.policy.every_events
                    || state.at.elapsed() >= self.policy.every)
        };
        if due {
            self.checkpoint(pool, &head.chain_id).await;
        }
    }

    /// Checkpoints every chain whose interval has passed since its last one.
    pub async fn flush_due(&self, pool: &PgPool) {
        for chain in self.pending(|s| s.at.elapsed() >= self.policy.every) {
            self.checkpoint(pool, &chain).await;
        }
    }

    /// Checkpoints every chain written since its last checkpoint (shutdown).
    pub async fn flush_all(&self, pool: &PgPool) -> usize {
        let chains = self.pending(|_| true);
        let n = chains.len();
        for chain in chains {
            self.checkpoint(pool, &chain).await;
        }
        n
    }

    fn pending(&self, due: impl Fn(&ChainState) -> bool) -> Vec<String> {
        let chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
        chains
            .iter()
            .filter(|(_, s)| s.size > s.checkpointed && due(s))
            .map(|(c, _)| c.clone())
            .collect()
    }

    async fn checkpoint(&self, pool: &PgPool, chain_id: &str) {
        let Some((size, root)) = ({
            let chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
            chains.get(chain_id).map(|s| (s.size, s.root))
        }) else {
            return;
        };
        let checkpoint = self.key.sign(chain_id, size, root, Utc::now());
        match self.persist(pool, &checkpoint).await {
            Ok(()) => {
                let mut chains = self.chains.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(state) = chains.get_mut(chain_id) {
                    state.checkpointed = state.checkpointed.max(size);
                    state.at = Instant::now();
                }
                metrics::counter!("audit_checkpoints_total").increment(1);
                tracing::debug!(chain = chain_id, tree_size = size, "checkpoint signed");
            }
            Err(error) => {
                metrics::counter!("audit_checkpoint_failures_total").increment(1);
                tracing::warn!(chain = chain_id, tree_size = size, %error, "checkpoint failed; retried later");
            }
        }
    }

    async fn persist(&self, pool: &PgPool, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        insert_checkpoint(pool, checkpoint, &self.writer).await?;
        if let Some(dir) = &self.dir {
            dir.publish(checkpoint)
                .map_err(|e| StoreError::Unavailable(format!("publishing checkpoint: {e}")))?;
        }
        Ok(())
    }
}

/// Stores a checkpoint; storing the same one twice is a no-op.
pub async fn insert_checkpoint(
    pool: &PgPool,
    checkpoint: &Checkpoint,
    writer: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO checkpoints (chain_id, tree_size, root_hash, signed_at, key_id, signature, written_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(&checkpoint.chain_id)
    .bind(checkpoint.tree_size as i64)
    .bind(&checkpoint.root_hash[..])
    .bind(checkpoint.timestamp)
    .bind(&checkpoint.key_id)
    .bind(&checkpoint.signature[..])
    .bind(writer)
    .execute(pool)
    .await?;
    Ok(())
}
