-- Cross-site requests a process of this site sent and has not answered yet: what it must
-- withdraw at their peer sites if it dies first. A row leaves in the transaction that stores
-- the origin's own copy of the keys (or once a failed request is withdrawn everywhere).
CREATE TABLE dqkd_in_flight (
    request_id uuid PRIMARY KEY,
    owner      text NOT NULL,      -- the replica name of the process; '' for a single one
    sites      text[] NOT NULL,
    key_ids    uuid[] NOT NULL,
    ready      bigint[] NOT NULL   -- positions of the origin's ready keys the request binds
);
CREATE INDEX dqkd_in_flight_owner ON dqkd_in_flight (owner);
