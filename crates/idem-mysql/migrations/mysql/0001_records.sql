-- idem records (contract section 3), one row per key. `idem_records` is replaced by the
-- configured table name when the migration runs.
--
-- namespace and id are VARBINARY so that keys compare byte for byte: no collation folds case,
-- accents or trailing spaces into another key. Times are milliseconds since the Unix epoch on
-- the server's clock. State codes are idem::State::code(): 1 in progress, 2 completed,
-- 3 released, 4 failed. MEDIUMBLOB holds results up to 16 MiB (BLOB stops one byte short of
-- the default 64 KiB limit).
CREATE TABLE IF NOT EXISTS idem_records (
    namespace   VARBINARY(64)   NOT NULL,
    id          VARBINARY(512)  NOT NULL,
    state       TINYINT         NOT NULL,
    fingerprint BINARY(16)      NOT NULL,
    token       BIGINT          NULL,
    owner       VARBINARY(255)  NULL,
    lease_until BIGINT          NULL,
    attempts    INT UNSIGNED    NOT NULL,
    result      MEDIUMBLOB      NULL,
    created_at  BIGINT          NOT NULL,
    updated_at  BIGINT          NOT NULL,
    expires_at  BIGINT          NOT NULL,
    PRIMARY KEY (namespace, id),
    -- Retention purges delete the oldest expired rows in bounded batches through this index.
    KEY idem_expires_at (expires_at)
) ENGINE = InnoDB;
