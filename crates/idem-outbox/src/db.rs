//! [`DbUrl`] and [`OutboxDb`]: the outbox table of any of the three databases, chosen by URL,
//! for the relay and the operator commands.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{OutboxError, OutboxErrorKind, err};
use crate::message::NewMessage;
use crate::mysql::MysqlOutbox;
use crate::postgres::PgOutbox;
use crate::rows::{Claimed, DeadRow, Failed, OutboxStats, Requeue};
use crate::sqlite::SqliteOutbox;
use crate::table::Table;

/// Which database an outbox lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbKind {
    /// SQLite (rusqlite).
    Sqlite,
    /// PostgreSQL (tokio-postgres).
    Postgres,
    /// MySQL or MariaDB (mysql_async).
    Mysql,
}

impl fmt::Display for DbKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        })
    }
}

/// A database URL: `sqlite:PATH` (or `sqlite://PATH`), `postgres://...` (or
/// `postgresql://`), `mysql://...` (or `mariadb://`). `Display` and `Debug` hide the password.
///
/// ```
/// use idem_outbox::{DbKind, DbUrl};
/// let url = DbUrl::parse("postgres://app:secret@127.0.0.1/app").unwrap();
/// assert_eq!(url.kind(), DbKind::Postgres);
/// assert_eq!(url.to_string(), "postgres://app:***@127.0.0.1/app");
/// assert_eq!(DbUrl::parse("sqlite:data/app.db").unwrap().kind(), DbKind::Sqlite);
/// assert!(DbUrl::parse("oracle://x").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct DbUrl {
    kind: DbKind,
    url: String,
}

impl DbUrl {
    /// Parses `text`.
    ///
    /// # Errors
    /// [`OutboxErrorKind::Config`] for another scheme or an empty SQLite path.
    pub fn parse(text: &str) -> Result<Self, OutboxError> {
        let text = text.trim();
        let (scheme, rest) = text.split_once(':').ok_or_else(|| bad(text))?;
        let (kind, url) = match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.is_empty() {
                    return Err(err(OutboxErrorKind::Config, "sqlite: URL without a path"));
                }
                (DbKind::Sqlite, path.to_owned())
            }
            "postgres" | "postgresql" => (DbKind::Postgres, text.to_owned()),
            "mysql" => (DbKind::Mysql, text.to_owned()),
            "mariadb" => (DbKind::Mysql, format!("mysql:{rest}")),
            _ => return Err(bad(text)),
        };
        Ok(Self { kind, url })
    }

    /// The database.
    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// The URL with its password, for the driver (the file path for SQLite). Never log it.
    pub fn expose(&self) -> &str {
        &self.url
    }
}

fn bad(text: &str) -> OutboxError {
    err(
        OutboxErrorKind::Config,
        format!(
            "unsupported database URL {}: want sqlite:PATH, postgres://... or mysql://...",
            idem::redact_url(text)
        ),
    )
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DbKind::Sqlite => write!(f, "sqlite:{}", self.url),
            _ => f.write_str(&idem::redact_url(&self.url)),
        }
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

impl std::str::FromStr for DbUrl {
    type Err = OutboxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[derive(Clone)]
enum Inner {
    Sqlite(SqliteOutbox),
    Postgres(PgOutbox),
    Mysql(MysqlOutbox),
}

/// An outbox table in one of the three databases, with a connection (pool) of its own: what
/// the relay drives, and the operator API (stats, dead rows, requeue, retention). Cheap to
/// clone (shares the pool).
///
/// Applications enqueue inside their own transactions with [`sqlite::enqueue`](crate::sqlite::enqueue),
/// [`postgres::enqueue`](crate::postgres::enqueue) or [`mysql::enqueue`](crate::mysql::enqueue);
/// [`OutboxDb::enqueue`] is for tools and tests (a transaction of its own).
#[derive(Clone)]
pub struct OutboxDb {
    inner: Inner,
    url: DbUrl,
    table: Table,
}

impl fmt::Debug for OutboxDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxDb")
            .field("url", &self.url)
            .field("table", &self.table.to_string())
            .finish()
    }
}

impl OutboxDb {
    /// Connects to `url`'s database (lazily for PostgreSQL and MySQL: the first statement
    /// connects). Does not create the table: see [`migrate`](OutboxDb::migrate).
    ///
    /// # Errors
    /// [`OutboxErrorKind::Config`] for a bad URL; SQLite: the file cannot be opened.
    pub async fn connect(url: &DbUrl, table: Table) -> Result<Self, OutboxError> {
        let inner = match url.kind {
            DbKind::Sqlite => {
                Inner::Sqlite(SqliteOutbox::open(PathBuf::from(&url.url), table.clone())?)
            }
            DbKind::Postgres => Inner::Postgres(PgOutbox::connect(&url.url, table.clone(), 8)?),
            DbKind::Mysql => Inner::Mysql(MysqlOutbox::connect(&url.url, table.clone())?),
        };
        Ok(Self {
            inner,
            url: url.clone(),
            table,
        })
    }

    /// The database.
    pub fn kind(&self) -> DbKind {
        self.url.kind
    }

    /// The table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Creates the table (and its indexes; on PostgreSQL its `NOTIFY` trigger) if missing.
    ///
    /// # Errors
    /// An [`OutboxError`] when the database refuses.
    pub async fn migrate(&self) -> Result<(), OutboxError> {
        match &self.inner {
            Inner::Sqlite(d) => d.migrate().await,
            Inner::Postgres(d) => d.migrate().await,
            Inner::Mysql(d) => d.migrate().await,
        }
    }

    /// Enqueues `message` in a transaction of its own; returns its row id. Applications enqueue
    /// inside their business transaction instead (see the type's docs).
    ///
    /// # Errors
    /// As the per-database `enqueue` functions.
    pub async fn enqueue(&self, message: &NewMessage) -> Result<i64, OutboxError> {
        match &self.inner {
            Inner::Sqlite(d) => d.enqueue(message).await,
            Inner::Postgres(d) => d.enqueue(message).await,
            Inner::Mysql(d) => d.enqueue(message).await,
        }
    }

    /// Counts of pending, retrying, dead and sent rows and the age of the oldest pending row.
    /// Scans the table: fine for an operator command or a scrape every few seconds.
    ///
    /// # Errors
    /// A database error.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        match &self.inner {
            Inner::Sqlite(d) => d.stats().await,
            Inner::Postgres(d) => d.stats().await,
            Inner::Mysql(d) => d.stats().await,
        }
    }

    /// The first `limit` dead rows, in outbox order.
    ///
    /// # Errors
    /// A database error.
    pub async fn dead(&self, limit: usize) -> Result<Vec<DeadRow>, OutboxError> {
        match &self.inner {
            Inner::Sqlite(d) => d.dead(limit).await,
            Inner::Postgres(d) => d.dead(limit).await,
            Inner::Mysql(d) => d.dead(limit).await,
        }
    }

    /// Sends dead rows back to pending with their attempts reset; they keep their position
    /// and message id. Returns how many were requeued. On PostgreSQL the relays are woken.
    ///
    /// # Errors
    /// A database error.
    pub async fn requeue(&self, which: &Requeue) -> Result<u64, OutboxError> {
        match &self.inner {
            Inner::Sqlite(d) => d.requeue(which).await,
            Inner::Postgres(d) => d.requeue(which).await,
            Inner::Mysql(d) => d.requeue(which).await,
        }
    }

    /// Deletes sent rows older than `older_than`, in batches of `batch` rows (each batch its
    /// own short statement), until fewer than `batch` remain or `max_batches` ran. Returns the
    /// rows deleted.
    ///
    /// # Errors
    /// A database error (rows deleted by earlier batches stay deleted).
    pub async fn purge_sent(
        &self,
        older_than: Duration,
        batch: usize,
        max_batches: usize,
    ) -> Result<u64, OutboxError> {
        let older_ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX / 2);
        let batch = batch.max(1);
        let mut total = 0;
        for _ in 0..max_batches.max(1) {
            let n = match &self.inner {
                Inner::Sqlite(d) => d.purge_sent(older_ms, batch).await?,
                Inner::Postgres(d) => d.purge_sent(older_ms, batch).await?,
                Inner::Mysql(d) => d.purge_sent(older_ms, batch).await?,
            };
            total += n;
            if (n as usize) < batch {
                break;
            }
        }
        Ok(total)
    }

    pub(crate) async fn claim(
        &self,
        limit: usize,
        lease: Duration,
        stop_key: bool,
    ) -> Result<Vec<Claimed>, OutboxError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        match &self.inner {
            Inner::Sqlite(d) => d.claim(limit, lease_ms, stop_key).await,
            Inner::Postgres(d) => d.claim(limit, lease_ms, stop_key).await,
            Inner::Mysql(d) => d.claim(limit, lease_ms, stop_key).await,
        }
    }

    pub(crate) async fn mark_sent(&self, rows: &[(i64, i64)]) -> Result<u64, OutboxError> {
        match &self.inner {
            Inner::Sqlite(d) => d.mark_sent(rows).await,
            Inner::Postgres(d) => d.mark_sent(rows).await,
            Inner::Mysql(d) => d.mark_sent(rows).await,
        }
    }

    pub(crate) async fn mark_failed(&self, f: &Failed) -> Result<u64, OutboxError> {
        match &self.inner {
            Inner::Sqlite(d) => d.mark_failed(f).await,
            Inner::Postgres(d) => d.mark_failed(f).await,
            Inner::Mysql(d) => d.mark_failed(f).await,
        }
    }

    /// The PostgreSQL listener, when this is PostgreSQL.
    pub(crate) fn listener(&self) -> Option<PgOutbox> {
        match &self.inner {
            Inner::Postgres(d) => Some(d.clone()),
            _ => None,
        }
    }

    /// Closes the connections (MySQL's pool wants an explicit disconnect).
    pub async fn close(self) {
        if let Inner::Mysql(d) = self.inner {
            d.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = DbUrl::parse("sqlite:///tmp/x.db").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.kind(), u.expose()), (DbKind::Sqlite, "/tmp/x.db"));
        let u = DbUrl::parse("sqlite:x.db").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.expose(), "x.db");
        let u = DbUrl::parse("mariadb://root:pw@127.0.0.1/test").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.kind(), DbKind::Mysql);
        assert_eq!(u.expose(), "mysql://root:pw@127.0.0.1/test");
        assert!(!format!("{u:?}").contains("pw"));
        assert!(DbUrl::parse("sqlite:").is_err());
        let e = DbUrl::parse("redis://:pw@h")
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert!(!e.to_string().contains("pw"), "{e}");
    }
}
