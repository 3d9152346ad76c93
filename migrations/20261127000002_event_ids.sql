-- Every stored event id, globally unique (the partitioned `events` table can
-- only enforce uniqueness together with occurred_at). The writer claims a
-- batch's ids here first: the primary key finds ids already stored in the
-- same index descent that enforces uniqueness, and serialises two partitions
-- racing with the same id.
CREATE TABLE event_ids (
    event_id        uuid        PRIMARY KEY,
    content_hash    bytea       NOT NULL,
    occurred_at     timestamptz NOT NULL,
    kafka_topic     text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL
);
CREATE TRIGGER event_ids_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON event_ids
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Events stored before this table existed keep their ids unique too.
INSERT INTO event_ids (event_id, content_hash, occurred_at, kafka_topic, kafka_partition, kafka_offset)
SELECT DISTINCT ON (event_id) event_id, content_hash, occurred_at, kafka_topic, kafka_partition, kafka_offset
FROM events ORDER BY event_id, seq
ON CONFLICT DO NOTHING;

REVOKE ALL ON event_ids FROM PUBLIC;
GRANT SELECT, INSERT ON event_ids TO audit_writer;
GRANT SELECT ON event_ids TO audit_reader;
