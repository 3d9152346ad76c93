-- The query and replay API (issue 4).
--
-- * `tx`: the 64-bit id of the transaction that stored the event. Pages and
--   replays run in (tx, seq) order and only up to the oldest transaction
--   still in flight (pg_snapshot_xmin of the reader's snapshot), so a reader
--   never skips an event that commits later with a smaller position. seq
--   alone cannot do that: concurrent batches take seq values before they
--   commit, in any order.
-- * Indexes the API filters need.
-- * `access_log`: every read of decrypted personal data (also recorded as
--   an `audit.pii_read` event in the system chain).
-- * `replay_jobs`: republishing matching events to a Kafka topic.
-- * Role `audit_api`: what the API may do, and nothing more.

ALTER TABLE events ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_tx_seq_idx ON events (tx, seq);
CREATE INDEX events_causation_idx ON events (causation_id) WHERE causation_id IS NOT NULL;
CREATE INDEX events_blind_index_idx ON events USING gin (blind_index) WHERE blind_index <> '{}';

CREATE TABLE access_log (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    -- Token name and role of the reader.
    actor           text        NOT NULL,
    role            text        NOT NULL,
    purpose         text        NOT NULL CHECK (purpose <> ''),
    -- What was read: the route and the events whose fields were decrypted.
    route           text        NOT NULL,
    event_ids       uuid[]      NOT NULL,
    -- The audit.pii_read event recording this read.
    audit_event_id  uuid        NOT NULL
);
CREATE INDEX access_log_at_idx ON access_log (at);
CREATE TRIGGER access_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON access_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

CREATE TABLE replay_jobs (
    -- Client-supplied: POSTing the same id again returns the same job.
    job_id          text        PRIMARY KEY CHECK (job_id ~ '^[A-Za-z0-9._-]{1,128}$'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text        NOT NULL,
    -- The request as accepted (filters, target topic, rate).
    request         jsonb       NOT NULL,
    target_topic    text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    -- Progress: the (tx, seq) cursor of the last event published and acknowledged.
    cursor          text,
    published       bigint      NOT NULL DEFAULT 0,
    -- Matching events when the job started (the replay covers exactly these).
    total           bigint,
    -- Upper bound of the replay: events stored after the job started are not replayed.
    until_tx        xid8,
    error           text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    -- Node that runs it now (lease), and until when.
    lease_owner     text,
    lease_until     timestamptz
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_api') THEN
        CREATE ROLE audit_api NOLOGIN;
    END IF;
END $$;

REVOKE ALL ON access_log, replay_jobs FROM PUBLIC;
-- Reads of everything the routes show; keys only to decrypt for auditors.
GRANT SELECT ON events, event_ids, dead_letters, duplicates, consumer_offsets, chains, checkpoints,
    erased_subjects, access_log, replay_jobs TO audit_api;
GRANT SELECT ON subject_keys TO audit_api;
-- System events (audit.pii_read, audit.subject_erased) in the system chain.
GRANT INSERT ON events, event_ids, access_log, erased_subjects, checkpoints TO audit_api;
GRANT UPDATE ON chains TO audit_api;
GRANT INSERT ON chains TO audit_api;
GRANT USAGE ON SEQUENCE events_seq TO audit_api;
-- Erasure (admin route) deletes a subject's key.
GRANT DELETE ON subject_keys TO audit_api;
GRANT SELECT, INSERT, UPDATE ON replay_jobs TO audit_api;
GRANT SELECT ON access_log TO audit_reader;
