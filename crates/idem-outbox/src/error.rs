//! [`OutboxError`]: what enqueueing, the relay and the operator calls report. It is
//! [`idem::KindError`] with an [`OutboxErrorKind`], the shape idem's stores and brokers use.

use std::fmt;

/// What went wrong, for callers to `match` on without seeing driver internals.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum OutboxErrorKind {
    /// The database cannot be reached or dropped the connection. Transient.
    Unavailable,
    /// The database refused a statement (a constraint, a lock timeout, a deadlock...).
    Database,
    /// The outbox table is missing or has another shape: run the migration.
    Schema,
    /// A URL, a table name or a setting is wrong.
    Config,
    /// A message cannot be stored (an empty destination, a message id too long...).
    Invalid,
    /// The broker failed (connecting the relay's producer).
    Broker,
}

impl OutboxErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "outbox database unavailable",
            Self::Database => "outbox database",
            Self::Schema => "outbox schema",
            Self::Config => "outbox configuration",
            Self::Invalid => "outbox message",
            Self::Broker => "outbox broker",
        }
    }
}

impl fmt::Display for OutboxErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl idem::ErrorKind for OutboxErrorKind {
    fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::Database | Self::Broker)
    }
}

/// An error of the outbox: a [`kind`](idem::KindError::kind), one line for humans (never a
/// password), and the driver's error as `source`.
pub type OutboxError = idem::KindError<OutboxErrorKind>;

pub(crate) fn err(kind: OutboxErrorKind, message: impl Into<String>) -> OutboxError {
    OutboxError::new(kind, message.into())
}

pub(crate) fn pg(what: &str, e: tokio_postgres::Error) -> OutboxError {
    let kind = if e.is_closed() || e.as_db_error().is_none() && e.code().is_none() {
        OutboxErrorKind::Unavailable
    } else {
        match e.code().map(|c| c.code()) {
            Some("42P01") | Some("42703") => OutboxErrorKind::Schema,
            Some(c) if c.starts_with("08") || c.starts_with("57") => OutboxErrorKind::Unavailable,
            _ => OutboxErrorKind::Database,
        }
    };
    let detail = e
        .as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned());
    OutboxError::new(kind, format!("{what}: {detail}")).with_source(e)
}

pub(crate) fn pool(what: &str, e: deadpool_postgres::PoolError) -> OutboxError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(what, e),
        other => OutboxError::new(
            OutboxErrorKind::Unavailable,
            format!("{what}: no PostgreSQL connection: {other}"),
        ),
    }
}

pub(crate) fn my(what: &str, e: mysql_async::Error) -> OutboxError {
    let kind = match &e {
        mysql_async::Error::Server(s) => match s.code {
            1146 | 1054 => OutboxErrorKind::Schema,
            _ => OutboxErrorKind::Database,
        },
        mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => OutboxErrorKind::Unavailable,
        _ => OutboxErrorKind::Database,
    };
    let detail = match &e {
        mysql_async::Error::Server(s) => s.message.clone(),
        other => other.to_string(),
    };
    OutboxError::new(kind, format!("{what}: {detail}")).with_source(e)
}

pub(crate) fn lite(what: &str, e: rusqlite::Error) -> OutboxError {
    let text = e.to_string();
    let kind = if text.contains("no such table") || text.contains("no such column") {
        OutboxErrorKind::Schema
    } else if matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::CannotOpen) | Some(rusqlite::ErrorCode::NotADatabase)
    ) {
        OutboxErrorKind::Unavailable
    } else {
        OutboxErrorKind::Database
    };
    OutboxError::new(kind, format!("{what}: {text}")).with_source(e)
}
