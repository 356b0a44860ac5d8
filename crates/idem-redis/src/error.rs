//! How Redis failures become [`StoreError`]s: which are transient (connection lost, timeout,
//! loading, failover), which mean a corrupt record, and which are configuration problems.

use std::time::Duration;

use idem::{StoreError, StoreErrorKind};
use redis::{ErrorKind, RedisError, ServerError, ServerErrorKind};

/// The error code the scripts reply with when a record cannot be decoded.
const CORRUPT_CODE: &str = "IDEMCORRUPT";

/// A driver error from operation `op`.
pub(crate) fn from_redis(op: &str, e: RedisError) -> StoreError {
    let kind = classify(&e);
    let message = match kind {
        StoreErrorKind::Unavailable => {
            format!("{op}: Redis is unreachable or dropped the connection")
        }
        StoreErrorKind::Timeout => format!(
            "{op}: Redis did not answer in time; the operation may or may not have been applied"
        ),
        StoreErrorKind::Config if is_tls_failure(&e) => {
            format!("{op}: the TLS handshake failed (is the server's certificate trusted?)")
        }
        _ => format!("{op}: {}", e.category()),
    };
    StoreError::new(kind, message).with_source(e)
}

/// A server error reply to one command (of a pipeline, say).
pub(crate) fn from_server(op: &str, e: ServerError) -> StoreError {
    from_redis(op, RedisError::from(e))
}

/// The whole operation, reconnection included, took longer than `timeout`.
pub(crate) fn elapsed(op: &str, timeout: Duration) -> StoreError {
    StoreError::new(
        StoreErrorKind::Timeout,
        format!(
            "{op}: no answer from Redis within {timeout:?}; the operation may or may not have been \
             applied"
        ),
    )
}

/// A reply of an unexpected shape: the scripts and this crate disagree, or the key holds
/// something that is not an idem record.
pub(crate) fn unexpected(op: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(format!("{op}: unexpected reply from Redis: {what}"))
}

fn classify(e: &RedisError) -> StoreErrorKind {
    match e.kind() {
        ErrorKind::Io if e.is_timeout() => StoreErrorKind::Timeout,
        // A TLS handshake that fails on the certificate will fail again: a configuration
        // problem, not an outage. The driver keeps the cause only as text.
        ErrorKind::Io if is_tls_failure(e) => StoreErrorKind::Config,
        ErrorKind::Io => StoreErrorKind::Unavailable,
        ErrorKind::Server(kind) => match kind {
            // Loading a dataset after a restart.
            ServerErrorKind::BusyLoading => StoreErrorKind::Busy,
            // Failover in progress, or a replica promoted elsewhere: retry later.
            ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly => StoreErrorKind::Unavailable,
            ServerErrorKind::NoPerm => StoreErrorKind::Config,
            // Redis 6 wraps an error raised inside a script in a generic `ERR`.
            ServerErrorKind::ResponseError if mentions(e, "WRONGTYPE") => StoreErrorKind::Corrupt,
            ServerErrorKind::ResponseError if mentions(e, CORRUPT_CODE) => StoreErrorKind::Corrupt,
            _ => StoreErrorKind::Backend,
        },
        ErrorKind::Extension => match e.code() {
            Some(CORRUPT_CODE | "WRONGTYPE") => StoreErrorKind::Corrupt,
            // A script or command running too long, or memory full under `noeviction`: both
            // clear by themselves.
            Some("BUSY" | "OOM") => StoreErrorKind::Busy,
            Some("NOAUTH" | "WRONGPASS" | "NOPERM") => StoreErrorKind::Config,
            _ => StoreErrorKind::Backend,
        },
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig => StoreErrorKind::Config,
        _ => StoreErrorKind::Backend,
    }
}

fn is_tls_failure(e: &RedisError) -> bool {
    if e.is_connection_refusal() || e.is_connection_dropped() {
        return false;
    }
    let text = e.to_string().to_ascii_lowercase();
    text.contains("certificate") || text.contains("handshake")
}

fn mentions(e: &RedisError, code: &str) -> bool {
    e.detail().is_some_and(|d| d.contains(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(code: &str, detail: &str) -> RedisError {
        redis::make_extension_error(code.to_owned(), Some(detail.to_owned()))
    }

    #[test]
    fn classifies_errors() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&io), StoreErrorKind::Unavailable);
        let slow = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(classify(&slow), StoreErrorKind::Timeout);
        assert_eq!(
            classify(&server_error("IDEMCORRUPT", "k: bad")),
            StoreErrorKind::Corrupt
        );
        assert_eq!(
            classify(&server_error("WRONGTYPE", "Operation against a key")),
            StoreErrorKind::Corrupt
        );
        assert_eq!(
            classify(&server_error("OOM", "used memory")),
            StoreErrorKind::Busy
        );
        assert_eq!(
            classify(&server_error("NOAUTH", "")),
            StoreErrorKind::Config
        );
        assert_eq!(
            classify(&server_error("WHATEVER", "")),
            StoreErrorKind::Backend
        );
        let e = from_redis("claim", io);
        assert!(e.is_transient());
        assert!(e.to_string().contains("claim"), "{e}");
    }
}
