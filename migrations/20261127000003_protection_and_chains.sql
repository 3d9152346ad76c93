-- Data protection and tamper evidence (issue 3).
--
-- * Personal data in payloads is encrypted per data subject; the subject's
--   data key is kept here only wrapped by a key-encryption key (KEK) that
--   never enters the database. Erasing a subject deletes its key.
-- * Every event is linked into a hash chain: one chain per Kafka (topic,
--   partition), plus the `system` chain for events the node writes itself.
--   `chains` keeps each chain's head and Merkle compact range, updated in
--   the same transaction as the events.
-- * Signed Merkle checkpoints of the chains are kept in `checkpoints` (and
--   published outside the database).

-- The administrative role: erasure, KEK rotation, system events. The node's
-- ingest role (audit_writer) cannot delete or rewrap keys.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_admin') THEN
        CREATE ROLE audit_admin NOLOGIN;
    END IF;
END $$;

-- System events (erasures, audited reads) have no Kafka position.
ALTER TABLE events ALTER COLUMN kafka_topic DROP NOT NULL;
ALTER TABLE events ALTER COLUMN kafka_partition DROP NOT NULL;
ALTER TABLE events ALTER COLUMN kafka_offset DROP NOT NULL;
ALTER TABLE event_ids ALTER COLUMN kafka_topic DROP NOT NULL;
ALTER TABLE event_ids ALTER COLUMN kafka_partition DROP NOT NULL;
ALTER TABLE event_ids ALTER COLUMN kafka_offset DROP NOT NULL;

-- Chain link of each event. NULL only for rows stored before this
-- migration (pre-release development databases); `verify` reports them.
ALTER TABLE events ADD COLUMN chain_id text;
ALTER TABLE events ADD COLUMN chain_position bigint CHECK (chain_position >= 0);
ALTER TABLE events ADD COLUMN hash bytea CHECK (octet_length(hash) = 32);
-- Keyed HMAC tokens of blind-indexed fields ("email:3f2a..."), for equality
-- search without decrypting.
ALTER TABLE events ADD COLUMN blind_index text[] NOT NULL DEFAULT '{}';

-- The head of every chain. Its only writers hold the row lock while they
-- append, so a chain is strictly sequential.
CREATE TABLE chains (
    chain_id        text        PRIMARY KEY,
    length          bigint      NOT NULL CHECK (length >= 0),
    head_hash       bytea       NOT NULL CHECK (octet_length(head_hash) = 32),
    -- RFC 9162 Merkle compact range of the chain's leaves (see docs/INTEGRITY.md).
    frontier        bytea       NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Signed checkpoints: chain `chain_id` had `tree_size` events with Merkle
-- root `root_hash`, signed with the Ed25519 key `key_id`.
CREATE TABLE checkpoints (
    chain_id        text        NOT NULL,
    tree_size       bigint      NOT NULL CHECK (tree_size >= 0),
    root_hash       bytea       NOT NULL CHECK (octet_length(root_hash) = 32),
    signed_at       timestamptz NOT NULL,
    key_id          text        NOT NULL,
    signature       bytea       NOT NULL CHECK (octet_length(signature) = 64),
    written_by      text,
    PRIMARY KEY (chain_id, tree_size)
);
CREATE TRIGGER checkpoints_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- One data key per data subject; subject '' is the default key for events
-- without a subject. The key is stored only wrapped by a KEK version.
CREATE TABLE subject_keys (
    subject_id      text        PRIMARY KEY,
    key_id          uuid        NOT NULL UNIQUE,
    kek_version     text        NOT NULL,
    wrapped_key     bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    rewrapped_at    timestamptz
);

-- Erased subjects: their key is gone for good. A subject is erased once.
CREATE TABLE erased_subjects (
    subject_id      text        PRIMARY KEY CHECK (subject_id <> ''),
    key_id          uuid,
    erased_at       timestamptz NOT NULL DEFAULT now(),
    erased_by       text        NOT NULL,
    reason          text        NOT NULL CHECK (reason <> ''),
    -- The audit.subject_erased event recording it.
    event_id        uuid        NOT NULL
);
CREATE TRIGGER erased_subjects_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON erased_subjects
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

REVOKE ALL ON chains, checkpoints, subject_keys, erased_subjects FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON chains TO audit_writer;
GRANT SELECT, INSERT ON checkpoints, subject_keys TO audit_writer;
GRANT SELECT ON erased_subjects TO audit_writer;
GRANT SELECT ON chains, checkpoints, erased_subjects TO audit_reader;
-- Readers never see wrapped keys; decryption goes through the API's auditor role.

GRANT SELECT, INSERT ON events, event_ids, checkpoints, erased_subjects TO audit_admin;
GRANT SELECT, INSERT, UPDATE ON chains TO audit_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON subject_keys TO audit_admin;
GRANT SELECT ON dead_letters, duplicates, consumer_offsets TO audit_admin;
GRANT USAGE ON SEQUENCE events_seq TO audit_admin;
-- SELECT ... FOR KEY SHARE (how a writer pins the data keys it used until
-- its batch commits, so an erasure waits for it) needs UPDATE on a column.
GRANT UPDATE (rewrapped_at) ON subject_keys TO audit_writer;
