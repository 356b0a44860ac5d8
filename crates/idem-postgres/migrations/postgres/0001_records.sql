-- idem records (contract section 3): one row per key.
-- `{table}` and `{schema}` are replaced by the quoted names chosen in PostgresStoreBuilder;
-- `{index}` by the name of the expiry index. Times are on the server's clock (now()).
-- State codes are idem::State::code(): 1 in progress, 2 completed, 3 released, 4 failed.
CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE IF NOT EXISTS {table} (
    -- "C" collation: keys compare as bytes, which is what idem means by equal, and the
    -- primary key index is cheaper than with a linguistic collation.
    namespace   text COLLATE "C" NOT NULL,
    id          text COLLATE "C" NOT NULL,
    state       smallint    NOT NULL CHECK (state BETWEEN 1 AND 4),
    fingerprint bytea       NOT NULL,
    token       bigint,
    owner       text,
    lease_until timestamptz,
    attempts    integer     NOT NULL,
    result      bytea,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (namespace, id)
) WITH (fillfactor = 90); -- room on each page for HOT updates (claim, then complete)

-- Makes retention purges cheap: they delete the oldest expired rows in bounded batches.
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
