//! How PostgreSQL failures become [`StoreError`]s: the SQLSTATE decides the
//! [`StoreErrorKind`], the driver's error stays the `source`, and messages never carry a
//! password (they name the table and the operation, not the URL).

use idem::{StoreError, StoreErrorKind};

/// What to tell an operator whose schema is missing or old.
pub(crate) const MIGRATE_HINT: &str = "create or upgrade it with `PostgresStoreBuilder::migrate` \
     (or `idem migrate --store postgres://...`) before connecting";

/// The kind of a SQLSTATE, by its class where a whole class means one thing.
pub(crate) fn kind_of_sqlstate(code: &str) -> StoreErrorKind {
    match code {
        // serialization_failure, deadlock_detected, lock_not_available: retry the transaction.
        "40001" | "40P01" | "55P03" => StoreErrorKind::Busy,
        // query_canceled (statement_timeout, or a cancel request).
        "57014" => StoreErrorKind::Timeout,
        // undefined_table, undefined_column, invalid_schema_name, undefined_function.
        "42P01" | "42703" | "3F000" | "42883" => StoreErrorKind::Schema,
        // admin_shutdown, crash_shutdown, cannot_connect_now, database_dropped,
        // idle_session_timeout; too_many_connections; the whole connection exception class.
        "57P01" | "57P02" | "57P03" | "57P04" | "57P05" | "53300" => StoreErrorKind::Unavailable,
        c if c.starts_with("08") => StoreErrorKind::Unavailable,
        // insufficient_resources (disk full, out of memory): transient from idem's view.
        c if c.starts_with("53") => StoreErrorKind::Unavailable,
        // invalid_authorization_specification, invalid_password, invalid_catalog_name.
        "28000" | "28P01" | "3D000" => StoreErrorKind::Config,
        // insufficient_privilege: the role cannot use the table.
        "42501" => StoreErrorKind::Config,
        _ => StoreErrorKind::Backend,
    }
}

/// The kind of a driver error without a SQLSTATE, from the driver's own error kinds (which it
/// exposes only through its message): connection failures are transient, a column that does not
/// decode means a record idem cannot read.
fn kind_of_driver_error(e: &tokio_postgres::Error) -> StoreErrorKind {
    if e.is_closed() {
        return StoreErrorKind::Unavailable;
    }
    let text = e.to_string();
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| text.starts_with(p));
    if starts(&[
        "error communicating",
        "error connecting",
        "unexpected message",
        "error parsing response",
        "error encoding message",
        "error performing TLS",
    ]) {
        StoreErrorKind::Unavailable
    } else if starts(&["timeout waiting"]) {
        StoreErrorKind::Timeout
    } else if starts(&[
        "authentication error",
        "invalid connection",
        "invalid configuration",
    ]) {
        StoreErrorKind::Config
    } else if starts(&[
        "error deserializing column",
        "invalid column",
        "query returned an unexpected number of columns",
    ]) {
        StoreErrorKind::Corrupt
    } else {
        StoreErrorKind::Backend
    }
}

/// Maps a driver error: by SQLSTATE when the server answered, by the driver's error kind
/// otherwise.
pub(crate) fn pg_error(context: &str, e: tokio_postgres::Error) -> StoreError {
    let (kind, detail) = match e.as_db_error() {
        Some(db) => {
            let kind = kind_of_sqlstate(db.code().code());
            (
                kind,
                format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            )
        }
        None => (kind_of_driver_error(&e), e.to_string()),
    };
    let hint = if kind == StoreErrorKind::Schema {
        format!("; the idem schema looks missing or old: {MIGRATE_HINT}")
    } else {
        String::new()
    };
    StoreError::new(kind, format!("postgres {context}: {detail}{hint}")).with_source(e)
}

/// Maps a pool error: timeouts waiting for or creating a connection, and failed connects.
pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError as P;
    match e {
        P::Backend(e) => pg_error("connect", e),
        P::Timeout(t) => StoreError::new(
            StoreErrorKind::Unavailable,
            format!("postgres pool: timed out ({t:?}) getting a connection"),
        ),
        P::Closed => StoreError::unavailable("postgres pool is closed"),
        other => StoreError::new(StoreErrorKind::Config, format!("postgres pool: {other}"))
            .with_source(other),
    }
}

/// An operation that did not finish within the store's operation timeout.
pub(crate) fn op_timeout(context: &str, limit: std::time::Duration) -> StoreError {
    StoreError::new(
        StoreErrorKind::Timeout,
        format!(
            "postgres {context}: no answer within {limit:?}; the write may or may not have happened"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_kinds_callers_act_on() {
        use StoreErrorKind as K;
        for (code, kind) in [
            ("40001", K::Busy),
            ("40P01", K::Busy),
            ("55P03", K::Busy),
            ("57014", K::Timeout),
            ("42P01", K::Schema),
            ("3F000", K::Schema),
            ("57P01", K::Unavailable),
            ("08006", K::Unavailable),
            ("53300", K::Unavailable),
            ("28P01", K::Config),
            ("23505", K::Backend),
            ("22P02", K::Backend),
        ] {
            assert_eq!(kind_of_sqlstate(code), kind, "SQLSTATE {code}");
        }
        assert!(K::Busy.is_transient() && K::Timeout.is_transient());
    }
}
