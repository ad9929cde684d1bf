-- Version 3: ready keys are found by their position in the link's fill order.
--
-- A ready key is addressed by its slot: `seq`, the position the filling site gave it in the
-- link's fill order (nanoseconds since the Unix epoch or smaller, so it fits a bigint; the
-- store refuses anything larger rather than wrap it), and its ID, which a bind checks.
--
-- (link, seq) replaces the ID as primary key: a bind takes the oldest positions and a refill
-- appends the newest, so both touch only the ends of this index however large a pool grows,
-- where an index on random IDs would scatter every write over the whole of it. Nothing looks
-- ready keys up by ID any more (IDs are random, and not checked across pools), so no index on
-- `id` is kept, and listing follows the primary key, so the old listing index goes too.
--
-- Ready keys stored before have no position. They belong to no SAE and the peer site's copies
-- expire, so they are dropped rather than given made-up positions.
DELETE FROM dqkd_pool_keys;

ALTER TABLE dqkd_pool_keys
    DROP CONSTRAINT dqkd_pool_keys_pkey,
    ADD COLUMN seq bigint NOT NULL CHECK (seq >= 0),
    ADD CONSTRAINT dqkd_pool_keys_pkey PRIMARY KEY (link, seq);

DROP INDEX dqkd_pool_keys_link_expires_at;
