-- The append-only event store. See docs/DECISIONS.md for why each piece is here.

-- Group roles (NOLOGIN). Deployments create login users that are members of
-- one of them; the node switches to audit_writer on every connection.
DO $$
BEGIN
    CREATE ROLE audit_writer NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$
BEGIN
    CREATE ROLE audit_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;

-- Refuses any change to an append-only table.
CREATE FUNCTION audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'events are immutable; record a correcting event instead';
END $$;

CREATE SEQUENCE events_seq AS bigint;

CREATE TABLE events (
    seq             bigint      NOT NULL DEFAULT nextval('events_seq'),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      CHECK (stream_version >= 1),
    occurred_at     timestamptz NOT NULL,
    ingested_at     timestamptz NOT NULL DEFAULT now(),
    source          text,
    correlation_id  uuid,
    causation_id    uuid,
    subject_id      text,
    payload         jsonb       NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    metadata        jsonb,
    headers         jsonb       NOT NULL DEFAULT '[]',
    content_hash    bytea       NOT NULL,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    -- A unique constraint on a partitioned table must contain the partition
    -- key. occurred_at is part of the content, so a producer retry (same
    -- content) still collides here; the writer also checks event_id alone.
    PRIMARY KEY (seq, occurred_at),
    CONSTRAINT events_event_id_key UNIQUE (event_id, occurred_at),
    CONSTRAINT events_kafka_position_key UNIQUE (kafka_topic, kafka_partition, kafka_offset, occurred_at)
) PARTITION BY RANGE (occurred_at);

ALTER SEQUENCE events_seq OWNED BY events.seq;

-- Only the indexes the queries need: each one costs ingest throughput.
CREATE INDEX events_stream_idx ON events (stream_id, seq);
CREATE INDEX events_type_time_idx ON events (event_type, occurred_at);
CREATE INDEX events_correlation_idx ON events (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX events_occurred_at_idx ON events (occurred_at);

-- Events whose month has no partition yet (far past or future timestamps).
CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE TRIGGER events_append_only_rows
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
-- Statement triggers are not inherited: each partition gets its own.
CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Creates the monthly partitions (UTC months) from the current month to
-- `months_ahead` months ahead. SECURITY DEFINER so the writer role needs no
-- DDL privilege. Returns how many partitions it created.
CREATE FUNCTION audit_ensure_event_partitions(months_ahead integer DEFAULT 3) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_catalog AS $$
DECLARE
    month_start timestamp;
    partition_name text;
    created integer := 0;
BEGIN
    FOR i IN 0..greatest(months_ahead, 0) LOOP
        month_start := date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i);
        partition_name := format('events_%s', to_char(month_start, 'YYYY_MM'));
        CONTINUE WHEN to_regclass(partition_name) IS NOT NULL;
        BEGIN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                month_start AT TIME ZONE 'UTC',
                (month_start + interval '1 month') AT TIME ZONE 'UTC');
            EXECUTE format(
                'CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON %I '
                'FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()',
                partition_name);
            created := created + 1;
        EXCEPTION
            -- Another node created it meanwhile.
            WHEN duplicate_table THEN NULL;
            -- The default partition already holds rows of that month; they
            -- cannot move (the store is append-only), so the month stays there.
            WHEN check_violation THEN
                RAISE WARNING 'partition % not created: events_default already holds rows of that month',
                    partition_name;
        END;
    END LOOP;
    RETURN created;
END $$;

SELECT audit_ensure_event_partitions(3);

CREATE TABLE dead_letters (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    raw_key         bytea,
    raw_value       bytea,
    headers         jsonb       NOT NULL DEFAULT '[]',
    event_id        uuid,
    reason_code     text        NOT NULL,
    reason          text        NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letters_kafka_position_key UNIQUE (kafka_topic, kafka_partition, kafka_offset)
);
CREATE INDEX dead_letters_received_at_idx ON dead_letters (received_at);
CREATE TRIGGER dead_letters_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON dead_letters
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Producer retries: same event_id, same content. Counted, one row per
-- offset, so every consumed offset is accounted for somewhere.
CREATE TABLE duplicates (
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);
CREATE TRIGGER duplicates_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON duplicates
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- The truth about consumption progress, written in the same transaction as
-- the rows it covers. Kafka's committed offsets are informational only.
CREATE TABLE consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    -- NULL: claimed by a writer, nothing committed yet.
    next_offset bigint      CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text,
    PRIMARY KEY (group_id, topic, partition)
);

REVOKE ALL ON events, events_default, dead_letters, duplicates, consumer_offsets FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_ensure_event_partitions(integer) FROM PUBLIC;
GRANT SELECT, INSERT ON events, dead_letters, duplicates TO audit_writer;
GRANT SELECT, INSERT, UPDATE ON consumer_offsets TO audit_writer;
GRANT USAGE ON SEQUENCE events_seq TO audit_writer;
GRANT EXECUTE ON FUNCTION audit_ensure_event_partitions(integer) TO audit_writer;
GRANT SELECT ON events, dead_letters, duplicates, consumer_offsets TO audit_reader;
