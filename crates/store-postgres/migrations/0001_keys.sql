-- Version 1: store-wide facts and the keys.
--
-- dqkd_meta holds the KEK check value (name 'kek_check'), so a replica started with another
-- key-encryption key is refused at connect.
CREATE TABLE dqkd_meta (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);

-- One row per key. `record` is the same versioned record the embedded store keeps (metadata
-- in clear, key bytes sealed with AES-256-GCM under the site KEK, AAD = key ID and master);
-- it is the authority for delivery decisions. `master`, `expires_at` and `remaining` (slaves
-- that may still fetch the key) repeat parts of it in plain columns for SQL: purging by expiry
-- and the per-(master, slave) pending counts.
CREATE TABLE dqkd_keys (
    id         uuid PRIMARY KEY,
    master     text NOT NULL,
    expires_at bigint NOT NULL,
    remaining  text[] NOT NULL,
    record     bytea NOT NULL
);

CREATE INDEX dqkd_keys_expires_at ON dqkd_keys (expires_at);
