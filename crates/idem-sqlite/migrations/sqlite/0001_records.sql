-- idem records (contract section 3). One row per key.
-- Times are milliseconds since the Unix epoch on the host clock; state codes are
-- idem::State::code(): 1 in progress, 2 completed, 3 released, 4 failed.
CREATE TABLE IF NOT EXISTS idem_records (
    namespace   TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    state       INTEGER NOT NULL,
    fingerprint BLOB    NOT NULL,
    token       INTEGER,
    owner       TEXT,
    lease_until INTEGER,
    attempts    INTEGER NOT NULL,
    result      BLOB,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (namespace, id)
) WITHOUT ROWID;

-- Makes retention purges cheap: they delete the oldest expired rows in bounded batches.
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);

CREATE TABLE IF NOT EXISTS idem_schema (version INTEGER NOT NULL);
INSERT INTO idem_schema (version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM idem_schema);
