//! Merkle proofs served from the store: the newest signed checkpoints, the
//! inclusion proof of one event, and the consistency proof between two
//! checkpoints of a chain (RFC 9162, see docs/INTEGRITY.md § Proofs).
//!
//! These are the data layer of `GET /v1/checkpoints/latest`,
//! `GET /v1/proofs/inclusion/{event_id}` and
//! `GET /v1/proofs/consistency?chain=&from=&to=`.
//!
//! # What a proof is checked against
//!
//! Every proof is made against a **signed checkpoint** from the
//! `checkpoints` table and returns it, so a client checks three things with
//! no trust in us: the checkpoint's signature (our public key), then the
//! proof against the checkpoint's (`tree_size`, `root_hash`) with any RFC
//! 9162 verifier ([`InclusionProof::verify`] and
//! [`ConsistencyProof::verify`] do it with [`crate::merkle`]). A proof is
//! never made against an unsigned size: it would prove nothing.
//!
//! # Cost
//!
//! The store keeps no interior nodes of the Merkle trees, only each event's
//! chain hash (its leaf is `leaf_hash(events.hash)`). A proof therefore
//! reads the chain's first `tree_size` hashes in position order, one
//! streaming pass: O(tree_size) rows read (32-byte hash and position only,
//! never payloads) and O(tree_size) SHA-256 compressions, O(log² n) memory
//! (one compact range per proof hash). About 1 s per million events.
//!
//! There is no `(chain_id, chain_position)` index (it would cost ingest
//! throughput), so the rows are read in an order an index gives:
//! - a Kafka chain `topic/partition` through the Kafka position index
//!   `(kafka_topic, kafka_partition, kafka_offset, occurred_at)`: a chain is
//!   appended in offset order, so offset order is position order, with
//!   `LIMIT tree_size`;
//! - the `system` chain (no Kafka position) through the same index's NULL
//!   entries, sorted by position (it holds erasures and audited reads only).
//!
//! Every row's position is checked against the expected one, so the order
//! is never trusted. If offset order is not position order (a topic deleted
//! and recreated under the same name restarts its offsets in the same
//! chain), the chain is read again sorted by position, which scans `events`.
//! While streaming, the root of all `tree_size` leaves is recomputed and
//! compared with the checkpoint's: a store that disagrees with its own
//! signed checkpoint gives [`ProofError::Integrity`], never a proof that
//! fails on the client.

use std::ops::Range;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::checkpoint::Checkpoint;
use crate::error::StoreError;
use crate::merkle::{self, leaf_hash, CompactRange, Hash, MerkleError};
use crate::store::chain::kafka_chain_id;

/// Why a proof could not be served, split by the answer the API gives.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// No such event, chain or checkpoint (404).
    #[error("{0}")]
    NotFound(String),
    /// The event is stored, but no signed checkpoint covers it yet (404 or
    /// 409): the client should retry after the next checkpoint.
    #[error(
        "event {event_id} is at position {position} of chain {chain_id}, but {}; try again after the next checkpoint (at most --checkpoint-interval-secs later)",
        describe_checkpointed(.checkpointed)
    )]
    NotYetCheckpointed {
        event_id: Uuid,
        chain_id: String,
        position: u64,
        /// The newest checkpoint's size, if the chain has one.
        checkpointed: Option<u64>,
    },
    /// The request is inconsistent (400), for example `from` > `to`.
    #[error("{0}")]
    BadRequest(String),
    /// The stored events disagree with a signed checkpoint or have a gap: the
    /// store was tampered with or damaged (500; run `audit-node verify`).
    #[error("{0}; run audit-node verify")]
    Integrity(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe_checkpointed(checkpointed: &Option<u64>) -> String {
    match checkpointed {
        Some(size) => {
            format!("the newest checkpoint of that chain covers only its first {size} events")
        }
        None => "that chain has no checkpoint yet".to_string(),
    }
}

impl From<sqlx::Error> for ProofError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

/// That event `event_id` is leaf `leaf_index` of the tree that `checkpoint`
/// signs. Hashes are 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InclusionProof {
    pub event_id: Uuid,
    pub chain_id: String,
    /// The event's chain position.
    pub leaf_index: u64,
    /// The checkpoint's size (repeated for convenience).
    pub tree_size: u64,
    /// The event's chain hash (`events.hash`), which the leaf hashes.
    pub event_hash: String,
    /// `SHA-256(0x00 || event_hash)`, RFC 9162 §2.1.1.
    pub leaf_hash: String,
    /// Sibling hashes from the leaf up to the root, RFC 9162 §2.1.3.1.
    pub audit_path: Vec<String>,
    pub checkpoint: Checkpoint,
}

impl InclusionProof {
    /// Checks the proof against its checkpoint's root, as a client would
    /// (the checkpoint's signature is checked separately, with the public
    /// key: [`Checkpoint::verify`]).
    pub fn verify(&self) -> Result<(), MerkleError> {
        let path: Vec<Hash> = self.audit_path.iter().map(|h| decode_hash(h)).collect();
        let leaf = decode_hash(&self.leaf_hash);
        if leaf != leaf_hash(&decode_hash(&self.event_hash)) {
            // Reported as a root mismatch: the leaf does not lead anywhere.
            return Err(MerkleError::InclusionRootMismatch {
                index: self.leaf_index,
                size: self.checkpoint.tree_size,
                computed: leaf,
                expected: self.checkpoint.root_hash,
            });
        }
        merkle::verify_inclusion(
            self.leaf_index,
            self.checkpoint.tree_size,
            &leaf,
            &path,
            &self.checkpoint.root_hash,
        )
    }
}

/// That checkpoint `to` of a chain extends checkpoint `from` (only appends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistencyProof {
    pub chain_id: String,
    pub from: Checkpoint,
    pub to: Checkpoint,
    /// RFC 9162 §2.1.4.1 proof hashes, 64 lowercase hex digits each.
    pub proof: Vec<String>,
}

impl ConsistencyProof {
    /// Checks the proof between the two checkpoints' roots.
    pub fn verify(&self) -> Result<(), MerkleError> {
        let proof: Vec<Hash> = self.proof.iter().map(|h| decode_hash(h)).collect();
        merkle::verify_consistency(
            self.from.tree_size,
            self.to.tree_size,
            &self.from.root_hash,
            &self.to.root_hash,
            &proof,
        )
    }
}

/// The newest checkpoint of every chain, ordered by chain id; or of one
/// chain (empty if it has none). One index scan of the `checkpoints`
/// primary key.
pub async fn latest_checkpoints(
    conn: &mut PgConnection,
    chain_id: Option<&str>,
) -> Result<Vec<Checkpoint>, ProofError> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (chain_id) chain_id, tree_size, root_hash, signed_at, key_id, signature
         FROM checkpoints WHERE $1::text IS NULL OR chain_id = $1
         ORDER BY chain_id, tree_size DESC",
    )
    .bind(chain_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(checkpoint_from_row).collect()
}

/// The inclusion proof of an event against the newest checkpoint of its
/// chain. [`ProofError::NotYetCheckpointed`] when the newest checkpoint was
/// signed before the event was stored.
pub async fn inclusion_proof(
    conn: &mut PgConnection,
    event_id: Uuid,
) -> Result<InclusionProof, ProofError> {
    inclusion_proof_at(conn, event_id, None).await
}

/// The inclusion proof of an event against the checkpoint of size
/// `tree_size` of its chain (a client that holds an older checkpoint asks
/// for a proof against that one), or the newest if `None`.
pub async fn inclusion_proof_at(
    conn: &mut PgConnection,
    event_id: Uuid,
    tree_size: Option<u64>,
) -> Result<InclusionProof, ProofError> {
    let event = find_event(conn, event_id).await?;
    let checkpoint = match tree_size {
        None => newest_checkpoint(conn, &event.chain_id).await?,
        Some(size) => Some(checkpoint_at(conn, &event.chain_id, size).await?),
    };
    let checkpoint = match checkpoint {
        Some(c) if c.tree_size > event.position => c,
        Some(c) if tree_size.is_some() => {
            return Err(ProofError::BadRequest(format!(
                "event {event_id} is at position {} of chain {}, after the {} events that the checkpoint of size {} covers; ask for a larger tree_size or leave it out",
                event.position, event.chain_id, c.tree_size, c.tree_size
            )))
        }
        other => {
            return Err(ProofError::NotYetCheckpointed {
                event_id,
                chain_id: event.chain_id,
                position: event.position,
                checkpointed: other.map(|c| c.tree_size),
            })
        }
    };
    let ranges = inclusion_ranges(event.position, checkpoint.tree_size);
    let path = stream_proof(
        conn,
        &checkpoint,
        ranges,
        Some((event.position, event.hash)),
    )
    .await?;
    Ok(InclusionProof {
        event_id,
        chain_id: event.chain_id,
        leaf_index: event.position,
        tree_size: checkpoint.tree_size,
        event_hash: hex::encode(event.hash),
        leaf_hash: hex::encode(leaf_hash(&event.hash)),
        audit_path: path.iter().map(hex::encode).collect(),
        checkpoint,
    })
}

/// The consistency proof from the checkpoint of size `from_size` to the
/// checkpoint of size `to_size` (the newest if `None`) of `chain_id`.
///
/// Both sizes must be sizes of stored checkpoints of that chain: a proof
/// from or to an unsigned size would bind nothing a client can check.
/// `from_size == to_size` gives an empty proof.
pub async fn consistency_proof(
    conn: &mut PgConnection,
    chain_id: &str,
    from_size: u64,
    to_size: Option<u64>,
) -> Result<ConsistencyProof, ProofError> {
    if let Some(to_size) = to_size {
        if from_size > to_size {
            return Err(ProofError::BadRequest(format!(
                "from ({from_size}) must not be larger than to ({to_size})"
            )));
        }
    }
    let from = checkpoint_at(conn, chain_id, from_size).await?;
    let to = match to_size {
        Some(size) => checkpoint_at(conn, chain_id, size).await?,
        None => newest_checkpoint(conn, chain_id)
            .await?
            .ok_or_else(|| no_checkpoint(chain_id))?,
    };
    if from.tree_size > to.tree_size {
        return Err(ProofError::BadRequest(format!(
            "from ({from_size}) is larger than the newest checkpoint of chain {chain_id} ({})",
            to.tree_size
        )));
    }
    let ranges = consistency_ranges(from.tree_size, to.tree_size);
    // Equal sizes are one checkpoint (the primary key): nothing to prove.
    let proof = if from.tree_size == to.tree_size {
        Vec::new()
    } else {
        stream_proof(conn, &to, ranges, None).await?
    };
    Ok(ConsistencyProof {
        chain_id: chain_id.to_owned(),
        from,
        to,
        proof: proof.iter().map(hex::encode).collect(),
    })
}

/// Where an event is in its chain.
struct EventLeaf {
    chain_id: String,
    position: u64,
    hash: Hash,
}

async fn find_event(conn: &mut PgConnection, event_id: Uuid) -> Result<EventLeaf, ProofError> {
    // event_ids gives occurred_at, so only one partition of events is probed.
    let row = sqlx::query(
        "SELECT e.chain_id, e.chain_position, e.hash
         FROM event_ids i JOIN events e ON e.event_id = i.event_id AND e.occurred_at = i.occurred_at
         WHERE i.event_id = $1",
    )
    .bind(event_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Err(ProofError::NotFound(format!("no event with id {event_id}")));
    };
    let chain_id: Option<String> = row.try_get(0)?;
    let position: Option<i64> = row.try_get(1)?;
    let hash: Option<Vec<u8>> = row.try_get(2)?;
    match (chain_id, position, hash) {
        (Some(chain_id), Some(position), Some(hash)) if position >= 0 => Ok(EventLeaf {
            position: position as u64,
            hash: to_hash(hash).ok_or_else(|| {
                ProofError::Integrity(format!("event {event_id} has a malformed hash"))
            })?,
            chain_id,
        }),
        _ => Err(ProofError::NotFound(format!(
            "event {event_id} is in no hash chain (stored before chains existed), so no proof exists for it"
        ))),
    }
}

async fn newest_checkpoint(
    conn: &mut PgConnection,
    chain_id: &str,
) -> Result<Option<Checkpoint>, ProofError> {
    Ok(latest_checkpoints(conn, Some(chain_id)).await?.pop())
}

async fn checkpoint_at(
    conn: &mut PgConnection,
    chain_id: &str,
    tree_size: u64,
) -> Result<Checkpoint, ProofError> {
    let size = i64::try_from(tree_size)
        .map_err(|_| ProofError::BadRequest(format!("tree size {tree_size} is out of range")))?;
    let row = sqlx::query(
        "SELECT chain_id, tree_size, root_hash, signed_at, key_id, signature
         FROM checkpoints WHERE chain_id = $1 AND tree_size = $2",
    )
    .bind(chain_id)
    .bind(size)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => checkpoint_from_row(&row),
        None => Err(ProofError::NotFound(format!(
            "chain {chain_id} has no checkpoint of size {tree_size}; use the tree_size of a signed checkpoint (GET /v1/checkpoints/latest shows the newest)"
        ))),
    }
}

fn no_checkpoint(chain_id: &str) -> ProofError {
    ProofError::NotFound(format!(
        "chain {chain_id} has no checkpoint (or no such chain); chain ids look like orders/3 or system"
    ))
}

fn checkpoint_from_row(row: &PgRow) -> Result<Checkpoint, ProofError> {
    let chain_id: String = row.try_get(0)?;
    let tree_size: i64 = row.try_get(1)?;
    let malformed = || {
        ProofError::Integrity(format!(
            "checkpoint of chain {chain_id} at size {tree_size} is malformed"
        ))
    };
    let root_hash = to_hash(row.try_get(2)?).ok_or_else(malformed)?;
    let signature: [u8; 64] = row
        .try_get::<Vec<u8>, _>(5)?
        .try_into()
        .map_err(|_| malformed())?;
    Ok(Checkpoint {
        tree_size: u64::try_from(tree_size).map_err(|_| malformed())?,
        root_hash,
        timestamp: row.try_get::<DateTime<Utc>, _>(3)?,
        key_id: row.try_get(4)?,
        signature,
        chain_id,
    })
}

fn to_hash(bytes: Vec<u8>) -> Option<Hash> {
    bytes.try_into().ok()
}

/// Hex from our own proofs; anything else decodes to zeros and fails to verify.
fn decode_hash(text: &str) -> Hash {
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(text, &mut hash).is_err() {
        return [0u8; 32];
    }
    hash
}

/// The largest power of two strictly smaller than `n`, for `n >= 2`
/// (RFC 9162's split point `k`).
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (u64::BITS - 1 - (n - 1).leading_zeros())
}

/// The leaf ranges whose Merkle roots form the audit path of leaf `index`
/// in a tree of `size` leaves, in proof order: RFC 9162's PATH(m, D[n]),
/// with each MTH replaced by the range it hashes.
fn inclusion_ranges(index: u64, size: u64) -> Vec<Range<u64>> {
    fn path(m: u64, leaves: Range<u64>, out: &mut Vec<Range<u64>>) {
        let n = leaves.end - leaves.start;
        if n <= 1 {
            return;
        }
        let split = leaves.start + split_point(n);
        if m < split {
            path(m, leaves.start..split, out);
            out.push(split..leaves.end);
        } else {
            path(m, split..leaves.end, out);
            out.push(leaves.start..split);
        }
    }
    let mut out = Vec::new();
    if index < size {
        path(index, 0..size, &mut out);
    }
    out
}

/// The leaf ranges whose Merkle roots form the consistency proof from
/// `old_size` to `new_size`, in proof order: RFC 9162's SUBPROOF(m, D[n], b).
fn consistency_ranges(old_size: u64, new_size: u64) -> Vec<Range<u64>> {
    /// `m` counts the old tree's leaves inside `leaves`; `complete` is b.
    fn subproof(m: u64, leaves: Range<u64>, complete: bool, out: &mut Vec<Range<u64>>) {
        let n = leaves.end - leaves.start;
        if m == n {
            if !complete {
                out.push(leaves);
            }
            return;
        }
        let k = split_point(n);
        let split = leaves.start + k;
        if m <= k {
            subproof(m, leaves.start..split, complete, out);
            out.push(split..leaves.end);
        } else {
            subproof(m - k, split..leaves.end, false, out);
            out.push(leaves.start..split);
        }
    }
    let mut out = Vec::new();
    if old_size > 0 && old_size < new_size {
        subproof(old_size, 0..new_size, true, &mut out);
    }
    out
}

/// Hashes a chain's first `checkpoint.tree_size` leaves in one pass: the
/// root of each of `ranges` (returned in the given order) and the root of
/// all of them, which must equal the checkpoint's.
struct ProofBuilder {
    /// (range, index in the proof), sorted by range start; ranges are disjoint.
    ranges: Vec<(Range<u64>, usize)>,
    roots: Vec<CompactRange>,
    /// The range the next leaf may fall in (leaves come in order).
    cursor: usize,
    whole: CompactRange,
    /// The proven event's position and hash, checked when its row passes.
    leaf: Option<(u64, Hash)>,
}

impl ProofBuilder {
    fn new(ranges: Vec<Range<u64>>, leaf: Option<(u64, Hash)>) -> Self {
        let roots = vec![CompactRange::new(); ranges.len()];
        let mut ranges: Vec<(Range<u64>, usize)> = ranges
            .into_iter()
            .enumerate()
            .map(|(i, r)| (r, i))
            .collect();
        ranges.sort_by_key(|(r, _)| r.start);
        Self {
            ranges,
            roots,
            cursor: 0,
            whole: CompactRange::new(),
            leaf,
        }
    }

    /// The next leaf; `position` must be the number of leaves pushed so far.
    fn push(&mut self, position: u64, event_hash: &Hash) -> Result<(), u64> {
        let expected = self.whole.size();
        if position != expected {
            return Err(expected);
        }
        if let Some((at, hash)) = self.leaf {
            if at == position && hash != *event_hash {
                return Err(expected);
            }
        }
        let leaf = leaf_hash(event_hash);
        self.whole.push(leaf);
        while let Some((range, _)) = self.ranges.get(self.cursor) {
            if position < range.end {
                break;
            }
            self.cursor += 1;
        }
        if let Some((range, index)) = self.ranges.get(self.cursor) {
            if range.contains(&position) {
                self.roots[*index].push(leaf);
            }
        }
        Ok(())
    }

    fn finish(self, checkpoint: &Checkpoint) -> Result<Vec<Hash>, ProofError> {
        if self.whole.size() != checkpoint.tree_size {
            return Err(ProofError::Integrity(format!(
                "chain {} has only {} events, but a signed checkpoint covers {}: events were deleted",
                checkpoint.chain_id,
                self.whole.size(),
                checkpoint.tree_size
            )));
        }
        if self.whole.root() != checkpoint.root_hash {
            return Err(ProofError::Integrity(format!(
                "the Merkle root of the first {} events of chain {} differs from its signed checkpoint: events were changed",
                checkpoint.tree_size, checkpoint.chain_id
            )));
        }
        Ok(self.roots.iter().map(CompactRange::root).collect())
    }
}

/// How a chain's rows are read in position order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeafOrder {
    /// Kafka offset order through the Kafka position index.
    KafkaOffset,
    /// Rows without a Kafka position (the system chain), sorted by position.
    NoKafkaPosition,
    /// Any chain, sorted by position: a scan of `events`.
    Position,
}

/// The proof hashes for `ranges` over the first `checkpoint.tree_size`
/// leaves of its chain, checking the chain against the checkpoint.
async fn stream_proof(
    conn: &mut PgConnection,
    checkpoint: &Checkpoint,
    ranges: Vec<Range<u64>>,
    leaf: Option<(u64, Hash)>,
) -> Result<Vec<Hash>, ProofError> {
    let chain_id = checkpoint.chain_id.as_str();
    let first = match kafka_position(chain_id) {
        Some(_) => LeafOrder::KafkaOffset,
        None => LeafOrder::NoKafkaPosition,
    };
    let mut builder = ProofBuilder::new(ranges.clone(), leaf);
    match read_leaves(conn, checkpoint, first, &mut builder).await? {
        Ok(()) => return builder.finish(checkpoint),
        Err(_) if first == LeafOrder::KafkaOffset => {
            tracing::info!(
                chain = chain_id,
                "kafka offset order differs from chain order; reading the chain sorted by position"
            );
        }
        Err(expected) => return Err(gap(chain_id, expected)),
    }
    let mut builder = ProofBuilder::new(ranges, leaf);
    match read_leaves(conn, checkpoint, LeafOrder::Position, &mut builder).await? {
        Ok(()) => builder.finish(checkpoint),
        Err(expected) => Err(gap(chain_id, expected)),
    }
}

fn gap(chain_id: &str, expected: u64) -> ProofError {
    ProofError::Integrity(format!(
        "chain {chain_id} has no event (or a different one than expected) at position {expected}"
    ))
}

/// The (topic, partition) of a Kafka chain id, if it is one.
fn kafka_position(chain_id: &str) -> Option<(&str, i32)> {
    let (topic, partition) = chain_id.rsplit_once('/')?;
    let partition: i32 = partition.parse().ok()?;
    (kafka_chain_id(topic, partition) == chain_id).then_some((topic, partition))
}

/// Streams the chain's first `tree_size` rows into `builder`. The inner
/// `Err` is the first position that was not where `order` put it.
async fn read_leaves(
    conn: &mut PgConnection,
    checkpoint: &Checkpoint,
    order: LeafOrder,
    builder: &mut ProofBuilder,
) -> Result<Result<(), u64>, ProofError> {
    let chain_id = checkpoint.chain_id.as_str();
    let size = i64::try_from(checkpoint.tree_size).map_err(|_| {
        ProofError::Integrity(format!(
            "checkpoint size {} is out of range",
            checkpoint.tree_size
        ))
    })?;
    let query = match (order, kafka_position(chain_id)) {
        (LeafOrder::KafkaOffset, Some((topic, partition))) => sqlx::query(
            "SELECT chain_position, hash FROM events
             WHERE kafka_topic = $1 AND kafka_partition = $2 AND chain_id = $3
             ORDER BY kafka_offset LIMIT $4",
        )
        .bind(topic)
        .bind(partition)
        .bind(chain_id)
        .bind(size),
        (LeafOrder::NoKafkaPosition, _) => sqlx::query(
            "SELECT chain_position, hash FROM events
             WHERE kafka_topic IS NULL AND chain_id = $1 AND chain_position < $2
             ORDER BY chain_position",
        )
        .bind(chain_id)
        .bind(size),
        _ => sqlx::query(
            "SELECT chain_position, hash FROM events
             WHERE chain_id = $1 AND chain_position < $2
             ORDER BY chain_position",
        )
        .bind(chain_id)
        .bind(size),
    };
    let mut rows = query.fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        let position: i64 = row.try_get(0)?;
        let hash: Option<Vec<u8>> = row.try_get(1)?;
        let expected = builder.whole.size();
        let (Ok(position), Some(hash)) = (u64::try_from(position), hash.and_then(to_hash)) else {
            return Ok(Err(expected));
        };
        if let Err(expected) = builder.push(position, &hash) {
            return Ok(Err(expected));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    fn roots_of(ranges: &[Range<u64>], leaves: &[Hash]) -> Vec<Hash> {
        ranges
            .iter()
            .map(|r| merkle::root(&leaves[r.start as usize..r.end as usize]))
            .collect()
    }

    #[test]
    fn ranges_give_the_reference_inclusion_proofs() {
        for n in 1..=70u64 {
            let leaves = leaves(n);
            for m in 0..n {
                let expected = merkle::inclusion_proof(m, &leaves).unwrap();
                assert_eq!(
                    roots_of(&inclusion_ranges(m, n), &leaves),
                    expected,
                    "m={m} n={n}"
                );
            }
        }
    }

    #[test]
    fn ranges_give_the_reference_consistency_proofs() {
        for n in 0..=70u64 {
            let leaves = leaves(n);
            for m in 0..=n {
                let expected = merkle::consistency_proof(m, &leaves).unwrap();
                assert_eq!(
                    roots_of(&consistency_ranges(m, n), &leaves),
                    expected,
                    "m={m} n={n}"
                );
            }
        }
    }

    /// The streaming builder computes the same hashes as the reference.
    #[test]
    fn builder_streams_the_proof() {
        let key = crate::checkpoint::SigningKeyPair::generate();
        for n in [1u64, 2, 5, 13, 64, 65] {
            let events: Vec<Hash> = (0..n).map(|i| leaf_hash(&(i * 7).to_be_bytes())).collect();
            let leaves: Vec<Hash> = events.iter().map(|h| leaf_hash(h)).collect();
            let checkpoint = key.sign("c/0", n, merkle::root(&leaves), Utc::now());
            for m in [0, n / 2, n - 1] {
                let mut builder =
                    ProofBuilder::new(inclusion_ranges(m, n), Some((m, events[m as usize])));
                for (i, h) in events.iter().enumerate() {
                    builder.push(i as u64, h).unwrap();
                }
                let proof = builder.finish(&checkpoint).unwrap();
                assert_eq!(proof, merkle::inclusion_proof(m, &leaves).unwrap());
            }
            // Out of order, or a different hash at the proven leaf: refused.
            let mut builder = ProofBuilder::new(inclusion_ranges(0, n), Some((0, [9; 32])));
            assert_eq!(builder.push(0, &events[0]), Err(0));
            let mut builder = ProofBuilder::new(Vec::new(), None);
            assert_eq!(builder.push(1, &events[0]), Err(0));
            // Fewer leaves than signed, or another root: integrity errors.
            let builder = ProofBuilder::new(Vec::new(), None);
            assert!(matches!(
                builder.finish(&checkpoint),
                Err(ProofError::Integrity(_))
            ));
            let mut builder = ProofBuilder::new(Vec::new(), None);
            for (i, h) in events.iter().enumerate() {
                let h = if i == 0 { [1; 32] } else { *h };
                builder.push(i as u64, &h).unwrap();
            }
            let err = builder.finish(&checkpoint).unwrap_err();
            assert!(
                err.to_string()
                    .contains("differs from its signed checkpoint"),
                "{err}"
            );
        }
    }

    #[test]
    fn kafka_chain_ids_are_recognised() {
        assert_eq!(kafka_position("orders/3"), Some(("orders", 3)));
        assert_eq!(kafka_position("a.b-c/12"), Some(("a.b-c", 12)));
        assert_eq!(kafka_position("system"), None);
        assert_eq!(kafka_position("orders/03"), None);
        assert_eq!(kafka_position("orders/x"), None);
        assert_eq!(kafka_position("orders/+3"), None);
    }
}
