-- Version 2: ready keys, held per link between two sites before any SAE is named.
--
-- One row per ready key. `record` is the same versioned record as in dqkd_keys, with the link
-- name in place of the master and no slaves, so the seal (AAD = key ID and link) binds a key
-- to its pool. `link` and `expires_at` repeat it in plain columns for SQL. A key ID is never
-- in both tables: the store checks the other table inside every write that adds an ID.
CREATE TABLE dqkd_pool_keys (
    id         uuid PRIMARY KEY,
    link       text NOT NULL,
    expires_at bigint NOT NULL,
    record     bytea NOT NULL
);

-- Listing a pool soonest expiry first, in the order of the index.
CREATE INDEX dqkd_pool_keys_link_expires_at ON dqkd_pool_keys (link, expires_at, id);
-- Purging every pool by expiry.
CREATE INDEX dqkd_pool_keys_expires_at ON dqkd_pool_keys (expires_at);
