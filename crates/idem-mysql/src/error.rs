//! From `mysql_async` errors to [`StoreError`]s callers can act on.
//!
//! The server's error code decides the kind: lock waits and deadlocks are `Busy` (transient),
//! a missing table is `Schema` with the command that creates it, lost connections are
//! `Unavailable`. The driver's error stays the `source`; messages never hold the URL.

use idem::{StoreError, StoreErrorKind};
use mysql_async::{DriverError, Error as MyError};

/// Server error codes idem reacts to.
pub(crate) mod code {
    /// `ER_DUP_ENTRY`: the key already has a row.
    pub(crate) const DUP_ENTRY: u16 = 1062;
    /// `ER_LOCK_DEADLOCK`: the whole transaction was rolled back.
    pub(crate) const DEADLOCK: u16 = 1213;
    /// `ER_NO_SUCH_TABLE`.
    pub(crate) const NO_SUCH_TABLE: u16 = 1146;
}

/// The server error code of `e`, if it is a server error.
pub(crate) fn server_code(e: &MyError) -> Option<u16> {
    match e {
        MyError::Server(s) => Some(s.code),
        _ => None,
    }
}

/// The kind of a driver error.
pub(crate) fn kind_of(e: &MyError) -> StoreErrorKind {
    match e {
        MyError::Server(s) => match s.code {
            // Lock wait timeout, deadlock, NOWAIT lock, too many concurrent transactions.
            1205 | 1213 | 3572 | 1637 => StoreErrorKind::Busy,
            // No such table, unknown column, wrong column count: the schema is missing or from
            // another version of idem.
            1146 | 1054 | 1136 => StoreErrorKind::Schema,
            // Unknown database, access denied (to the server, the database, a table).
            1049 | 1044 | 1045 | 1142 | 1143 | 1227 => StoreErrorKind::Config,
            // Too many connections, server shutting down, connection killed, query interrupted,
            // read-only server (a fail-over in progress), disk or table full, idle disconnect.
            1040 | 1053 | 1927 | 1317 | 1290 | 1836 | 1792 | 1021 | 1114 | 4031 => {
                StoreErrorKind::Unavailable
            }
            _ => StoreErrorKind::Backend,
        },
        MyError::Io(_) => StoreErrorKind::Unavailable,
        MyError::Driver(d) => match d {
            DriverError::ConnectionClosed
            | DriverError::PoolDisconnected
            | DriverError::PacketOutOfOrder
            | DriverError::UnexpectedPacket { .. }
            | DriverError::BadCompressedPacketHeader => StoreErrorKind::Unavailable,
            DriverError::UnknownAuthPlugin { .. }
            | DriverError::MysqlOldPasswordDisabled
            | DriverError::CleartextPluginDisabled
            | DriverError::NoClientSslFlagFromServer
            | DriverError::NoKeyFound => StoreErrorKind::Config,
            DriverError::PacketTooLarge => StoreErrorKind::Config,
            _ => StoreErrorKind::Backend,
        },
        MyError::Url(_) => StoreErrorKind::Config,
        MyError::Other(_) => StoreErrorKind::Backend,
    }
}

/// Wraps a driver error, naming what idem was doing; a missing table also says how to create
/// it.
pub(crate) fn store_error(context: &str, table: &str, e: MyError) -> StoreError {
    let kind = kind_of(&e);
    let message = if server_code(&e) == Some(code::NO_SUCH_TABLE) {
        format!(
            "mysql {context}: the idem table `{table}` does not exist ({e}); create it with \
             MysqlStore::migrate()"
        )
    } else {
        format!("mysql {context}: {e}")
    };
    StoreError::new(kind, message).with_source(e)
}

#[cfg(test)]
mod tests {
    use mysql_async::ServerError;

    use super::*;

    fn server(code: u16) -> MyError {
        MyError::Server(ServerError {
            code,
            message: "m".into(),
            state: "HY000".into(),
        })
    }

    #[test]
    fn server_codes_map_to_kinds() {
        assert_eq!(kind_of(&server(1205)), StoreErrorKind::Busy);
        assert_eq!(kind_of(&server(1213)), StoreErrorKind::Busy);
        assert_eq!(kind_of(&server(1146)), StoreErrorKind::Schema);
        assert_eq!(kind_of(&server(1045)), StoreErrorKind::Config);
        assert_eq!(kind_of(&server(1053)), StoreErrorKind::Unavailable);
        assert_eq!(kind_of(&server(1064)), StoreErrorKind::Backend);
        assert_eq!(
            kind_of(&MyError::Driver(DriverError::ConnectionClosed)),
            StoreErrorKind::Unavailable
        );
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(kind_of(&MyError::from(io)), StoreErrorKind::Unavailable);
    }

    #[test]
    fn a_missing_table_says_how_to_create_it() {
        let e = store_error("claim", "idem_records", server(1146));
        assert_eq!(e.kind(), StoreErrorKind::Schema);
        assert!(e.to_string().contains("MysqlStore::migrate()"), "{e}");
    }
}
