-- Stable dead-letter pages (Decision 40, applied to dead letters).
--
-- Dead letters of concurrent batches commit out of `id` order: a page
-- following `id` alone can pass a row that commits later with a smaller id,
-- and never show it. Like `events.tx`, `dead_letters.tx` is the id of the
-- transaction that stored the row; the API pages in (tx, id) order and only
-- up to the oldest transaction still in flight (pg_snapshot_xmin of the
-- reader's snapshot), so no row can later appear before a position a reader
-- has passed.
--
-- Rows stored before this migration all get the migrating transaction's id,
-- in `id` order among themselves, ahead of everything stored later.

ALTER TABLE dead_letters ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX dead_letters_tx_id_idx ON dead_letters (tx, id);
