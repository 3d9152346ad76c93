//! Merkle proofs served from a real PostgreSQL store: events written through
//! the store's own path (chains, signed checkpoints), then every proof is
//! checked as a client would, with `merkle::verify_*` and the public key.

use std::sync::Arc;
use std::time::Duration;

use audit_ledger::checkpoint::SigningKeyPair;
use audit_ledger::merkle::{self, Hash};
use audit_ledger::proofs::{self, ProofError};
use audit_ledger::store::checkpointer::{insert_checkpoint, CheckpointPolicy, Checkpointer};
use audit_ledger::store::conformance;
use audit_ledger::store::postgres::PgConfig;
use audit_ledger::store::{OffsetKey, PgEventStore, WriteOutcome};
use audit_ledger::testing::TestDatabase;
use audit_ledger::{ParseOptions, PreparedBatch};
use ed25519_dalek::VerifyingKey;
use serde_json::json;
use uuid::Uuid;

struct Fixture {
    db: TestDatabase,
    store: PgEventStore,
    /// Reads as the API's role, so its grants are tested too.
    api: PgEventStore,
    public_key: VerifyingKey,
}

async fn fixture() -> Fixture {
    let db = TestDatabase::create().await.expect("test database");
    let key = SigningKeyPair::generate();
    let public_key = key.public_key();
    let policy = CheckpointPolicy {
        every_events: 5,
        every: Duration::from_secs(3600),
    };
    let store = PgEventStore::connect(&PgConfig::new(&db.url))
        .await
        .expect("connect")
        .with_checkpoints(Arc::new(Checkpointer::new(key, None, policy, "test")));
    let api = PgEventStore::connect(&PgConfig {
        role: Some("audit_api".into()),
        ..PgConfig::new(&db.url)
    })
    .await
    .expect("connect as audit_api");
    Fixture {
        db,
        store,
        api,
        public_key,
    }
}

impl Fixture {
    async fn close(self) {
        self.store.pool().close().await;
        self.api.pool().close().await;
        self.db.drop_database().await;
    }

    async fn conn(&self) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
        self.api.pool().acquire().await.expect("connection")
    }
}

fn envelope(event_id: Uuid, stream: &str, occurred_at: &str) -> Vec<u8> {
    json!({
        "event_id": event_id,
        "event_type": "order.created",
        "stream_id": stream,
        "occurred_at": occurred_at,
        "payload": { "n": 1 },
    })
    .to_string()
    .into_bytes()
}

/// Writes `count` new events at offsets `first..` of (topic, partition) for
/// consumer group `group`, in one batch. Returns their ids in offset order.
async fn write(
    store: &PgEventStore,
    group: &str,
    topic: &str,
    partition: i32,
    first: i64,
    count: i64,
    occurred_at: &str,
) -> Vec<Uuid> {
    let key = OffsetKey {
        group_id: group.into(),
        topic: topic.into(),
        partition,
    };
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::new_v4()).collect();
    let records = ids
        .iter()
        .zip(first..)
        .map(|(id, offset)| {
            conformance::record(
                topic,
                partition,
                offset,
                &envelope(*id, "order-1", occurred_at),
            )
        })
        .collect();
    let batch = PreparedBatch::parse(records, &ParseOptions::default()).expect("batch");
    let expected = (first > 0).then_some(first);
    let outcome = conformance::write(store, &key, expected, &batch).await;
    assert!(
        matches!(outcome, WriteOutcome::Committed(s) if s.events == count as u64),
        "{outcome:?}"
    );
    ids
}

fn decode(hex_text: &str) -> Hash {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut hash).expect("hex");
    hash
}

/// Checks an inclusion proof with nothing but the merkle module, as a
/// client would, besides `InclusionProof::verify`.
fn check_inclusion(proof: &proofs::InclusionProof, public_key: &VerifyingKey) {
    proof
        .checkpoint
        .verify(public_key)
        .expect("signed checkpoint");
    proof.verify().expect("inclusion proof verifies");
    let path: Vec<Hash> = proof.audit_path.iter().map(|h| decode(h)).collect();
    let leaf = merkle::leaf_hash(&decode(&proof.event_hash));
    assert_eq!(hex::encode(leaf), proof.leaf_hash);
    assert_eq!(proof.tree_size, proof.checkpoint.tree_size);
    merkle::verify_inclusion(
        proof.leaf_index,
        proof.checkpoint.tree_size,
        &leaf,
        &path,
        &proof.checkpoint.root_hash,
    )
    .expect("verify_inclusion");
}

const T1: &str = "2026-11-27T10:00:00.123Z";
const T2: &str = "2026-11-27T11:00:00.456Z";

#[tokio::test]
async fn inclusion_and_consistency_proofs_verify_against_signed_checkpoints() {
    let f = fixture().await;
    // Batches of 3, 4, 6, 1, 9 events: checkpoints (every 5 events) at 7, 13 and 23.
    let mut ids = Vec::new();
    let mut offset = 0;
    for count in [3, 4, 6, 1, 9] {
        ids.extend(write(&f.store, "g", "proofs", 0, offset, count, T1).await);
        offset += count;
    }
    // Another chain, to show chains do not mix: one checkpoint at 6.
    let other = write(&f.store, "g", "proofs", 1, 0, 6, T1).await;
    // The tail: stored after the last checkpoint.
    ids.extend(write(&f.store, "g", "proofs", 0, offset, 2, T1).await);

    let mut conn = f.conn().await;
    let latest = proofs::latest_checkpoints(&mut conn, None).await.unwrap();
    let sizes: Vec<(&str, u64)> = latest
        .iter()
        .map(|c| (c.chain_id.as_str(), c.tree_size))
        .collect();
    assert_eq!(sizes, [("proofs/0", 23), ("proofs/1", 6)]);
    for checkpoint in &latest {
        checkpoint.verify(&f.public_key).unwrap();
    }
    let one = proofs::latest_checkpoints(&mut conn, Some("proofs/1"))
        .await
        .unwrap();
    assert_eq!(one, latest[1..]);
    assert!(proofs::latest_checkpoints(&mut conn, Some("nope/0"))
        .await
        .unwrap()
        .is_empty());

    // Every checkpointed event: a proof against the newest checkpoint.
    for (position, id) in ids.iter().enumerate().take(23) {
        let proof = proofs::inclusion_proof(&mut conn, *id).await.unwrap();
        assert_eq!(
            (proof.chain_id.as_str(), proof.leaf_index),
            ("proofs/0", position as u64)
        );
        assert_eq!(proof.event_id, *id);
        assert_eq!(proof.checkpoint, latest[0]);
        check_inclusion(&proof, &f.public_key);
    }
    for (position, id) in other.iter().enumerate() {
        let proof = proofs::inclusion_proof(&mut conn, *id).await.unwrap();
        assert_eq!(
            (proof.chain_id.as_str(), proof.leaf_index, proof.tree_size),
            ("proofs/1", position as u64, 6)
        );
        check_inclusion(&proof, &f.public_key);
    }

    // Against an older checkpoint the client holds.
    let proof = proofs::inclusion_proof_at(&mut conn, ids[2], Some(7))
        .await
        .unwrap();
    assert_eq!((proof.leaf_index, proof.tree_size), (2, 7));
    check_inclusion(&proof, &f.public_key);
    let err = proofs::inclusion_proof_at(&mut conn, ids[10], Some(7))
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::BadRequest(_)), "{err}");
    let err = proofs::inclusion_proof_at(&mut conn, ids[2], Some(8))
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("no checkpoint of size 8"), "{err}");

    // The unsigned tail.
    for (position, id) in ids.iter().enumerate().skip(23) {
        let err = proofs::inclusion_proof(&mut conn, *id).await.unwrap_err();
        match &err {
            ProofError::NotYetCheckpointed {
                position: p,
                checkpointed,
                chain_id,
                ..
            } => {
                assert_eq!(
                    (*p, *checkpointed, chain_id.as_str()),
                    (position as u64, Some(23), "proofs/0")
                );
            }
            other => panic!("expected NotYetCheckpointed, got {other}"),
        }
        assert!(
            err.to_string()
                .contains("try again after the next checkpoint"),
            "{err}"
        );
    }
    let err = proofs::inclusion_proof(&mut conn, Uuid::new_v4())
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::NotFound(_)), "{err}");

    // Consistency between every pair of checkpoints.
    for (from, to) in [(7, 13), (7, 23), (13, 23), (13, 13)] {
        let proof = proofs::consistency_proof(&mut conn, "proofs/0", from, Some(to))
            .await
            .unwrap();
        assert_eq!((proof.from.tree_size, proof.to.tree_size), (from, to));
        proof.from.verify(&f.public_key).unwrap();
        proof.to.verify(&f.public_key).unwrap();
        proof.verify().unwrap();
        let hashes: Vec<Hash> = proof.proof.iter().map(|h| decode(h)).collect();
        merkle::verify_consistency(
            from,
            to,
            &proof.from.root_hash,
            &proof.to.root_hash,
            &hashes,
        )
        .unwrap();
    }
    let newest = proofs::consistency_proof(&mut conn, "proofs/0", 7, None)
        .await
        .unwrap();
    assert_eq!(newest.to.tree_size, 23);
    let err = proofs::consistency_proof(&mut conn, "proofs/0", 23, Some(7))
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::BadRequest(_)), "{err}");
    let err = proofs::consistency_proof(&mut conn, "proofs/0", 8, Some(23))
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::NotFound(_)), "{err}");
    let err = proofs::consistency_proof(&mut conn, "nope/0", 7, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::NotFound(_)), "{err}");

    // Tampered proofs fail, and so do proofs moved to another leaf or size.
    let good = proofs::inclusion_proof(&mut conn, ids[9]).await.unwrap();
    for i in 0..good.audit_path.len() {
        let mut bad = good.clone();
        let mut hash = decode(&bad.audit_path[i]);
        hash[0] ^= 1;
        bad.audit_path[i] = hex::encode(hash);
        assert!(bad.verify().is_err(), "tampered hash {i} accepted");
    }
    let mut bad = good.clone();
    bad.audit_path.pop();
    assert!(bad.verify().is_err());
    let mut bad = good.clone();
    bad.leaf_index = 8;
    assert!(bad.verify().is_err());
    let mut bad = good.clone();
    bad.event_hash = proofs::inclusion_proof(&mut conn, ids[8])
        .await
        .unwrap()
        .event_hash;
    assert!(bad.verify().is_err());
    let mut bad = proofs::consistency_proof(&mut conn, "proofs/0", 7, Some(23))
        .await
        .unwrap();
    let mut hash = decode(&bad.proof[0]);
    hash[31] ^= 0x80;
    bad.proof[0] = hex::encode(hash);
    assert!(bad.verify().is_err());

    // The JSON the API serves: the checkpoint in its signed form.
    let value = serde_json::to_value(&good).unwrap();
    assert_eq!(value["checkpoint"]["tree_size"], 23);
    assert_eq!(value["checkpoint"]["version"], 1);
    assert_eq!(value["leaf_index"], 9);
    assert_eq!(
        value["audit_path"].as_array().unwrap().len(),
        good.audit_path.len()
    );

    drop(conn);
    f.close().await;
}

/// The system chain has no Kafka position: its rows are read another way.
#[tokio::test]
async fn system_chain_events_have_proofs() {
    let f = fixture().await;
    let owner = PgEventStore::connect(&PgConfig {
        role: None,
        ..PgConfig::new(&f.db.url)
    })
    .await
    .expect("connect as owner");
    let key = SigningKeyPair::generate();
    let mut erasures = Vec::new();
    let mut head = None;
    for subject in ["customer-1", "customer-2", "customer-3"] {
        let (erasure, new_head) =
            audit_ledger::store::system::erase_subject(owner.pool(), subject, "test", "tester")
                .await
                .unwrap();
        erasures.push(erasure.event_id);
        head = new_head;
    }
    let head = head.unwrap();
    let checkpoint = key.sign(&head.chain_id, head.length, head.root(), chrono::Utc::now());
    insert_checkpoint(owner.pool(), &checkpoint, "test")
        .await
        .unwrap();

    let mut conn = f.conn().await;
    for (position, id) in erasures.iter().enumerate() {
        let proof = proofs::inclusion_proof(&mut conn, *id).await.unwrap();
        assert_eq!(
            (proof.chain_id.as_str(), proof.leaf_index, proof.tree_size),
            ("system", position as u64, 3)
        );
        check_inclusion(&proof, &key.public_key());
    }
    drop(conn);
    owner.pool().close().await;
    f.close().await;
}

/// A topic recreated under the same name restarts its offsets in the same
/// chain: offset order is no longer chain order, and proofs still verify.
#[tokio::test]
async fn proofs_do_not_trust_offset_order() {
    let f = fixture().await;
    let mut ids = write(&f.store, "before", "re", 0, 0, 6, T1).await;
    ids.extend(write(&f.store, "after", "re", 0, 0, 6, T2).await);
    let mut conn = f.conn().await;
    let latest = proofs::latest_checkpoints(&mut conn, Some("re/0"))
        .await
        .unwrap();
    assert_eq!(latest[0].tree_size, 12);
    for (position, id) in ids.iter().enumerate() {
        let proof = proofs::inclusion_proof(&mut conn, *id).await.unwrap();
        assert_eq!(proof.leaf_index, position as u64);
        check_inclusion(&proof, &f.public_key);
    }
    proofs::consistency_proof(&mut conn, "re/0", 6, Some(12))
        .await
        .unwrap()
        .verify()
        .unwrap();
    drop(conn);
    f.close().await;
}

/// A store that disagrees with its own signed checkpoint serves no proof.
#[tokio::test]
async fn a_tampered_store_gives_an_integrity_error() {
    let f = fixture().await;
    let ids = write(&f.store, "g", "tamper", 0, 0, 8, T1).await;
    let owner = PgEventStore::connect(&PgConfig {
        role: None,
        ..PgConfig::new(&f.db.url)
    })
    .await
    .expect("connect as owner");
    let mut conn = f.conn().await;
    proofs::inclusion_proof(&mut conn, ids[0]).await.unwrap();

    // Rewrite one hash, bypassing the append-only triggers as superuser.
    let mut admin = owner.pool().acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *admin)
        .await
        .unwrap();
    sqlx::query("UPDATE events SET hash = sha256(hash) WHERE event_id = $1")
        .bind(ids[5])
        .execute(&mut *admin)
        .await
        .unwrap();
    let err = proofs::inclusion_proof(&mut conn, ids[0])
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::Integrity(_)), "{err}");
    assert!(
        err.to_string()
            .contains("differs from its signed checkpoint"),
        "{err}"
    );

    // A deleted row: a gap.
    sqlx::query("DELETE FROM events WHERE event_id = $1")
        .bind(ids[3])
        .execute(&mut *admin)
        .await
        .unwrap();
    let err = proofs::inclusion_proof(&mut conn, ids[0])
        .await
        .unwrap_err();
    assert!(matches!(err, ProofError::Integrity(_)), "{err}");
    assert!(err.to_string().contains("position 3"), "{err}");
    drop(admin);
    drop(conn);
    owner.pool().close().await;
    f.close().await;
}
