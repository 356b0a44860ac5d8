//! Store URLs on the command line: `memory`, `sqlite:PATH`, `redis://…`, `rediss://…`,
//! `postgres://…`, `mysql://…`. Networked stores add their schemes here. Credentials are never
//! printed: `Display` redacts passwords.
//!
//! [`StoreArgs`] is `--store` (with `IDEM_STORE` and the default [`DEFAULT_STORE`]) and where in
//! the store the records live (`--schema`, `--table`, `--prefix`: [`Location`]), as every
//! command that works on one store takes them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use idem::MemoryStore;
use idem_mysql::MysqlStore;
use idem_postgres::PostgresStore;
use idem_redis::RedisStore;
use idem_sqlite::{SqliteStore, Synchronous};

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// In-process memory (`memory`).
    Memory,
    /// A SQLite file (`sqlite:PATH`, `sqlite://PATH`).
    Sqlite(PathBuf),
    /// A MySQL or MariaDB server (`mysql://user:password@host:port/database`).
    Mysql(String),
    /// A PostgreSQL server (`postgres://` or `postgresql://`), the URL as given.
    Postgres(String),
    /// A Redis server (`redis://[user:password@]host[:port][/db]`, `rediss://` for TLS; a
    /// cluster: `redis://h1:p1,h2:p2`; `?wait_replicas=N[&wait_timeout_ms=MS]` waits for N
    /// replicas after every write). Holds the URL with its password: never print it, print the
    /// `StoreUrl` (redacted).
    Redis(String),
}

impl FromStr for StoreUrl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "memory" || s == "memory:" {
            return Ok(StoreUrl::Memory);
        }
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                bail!("store URL {s:?} has no path: use sqlite:PATH, e.g. sqlite:idem.db");
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("mysql://") {
            return Ok(StoreUrl::Mysql(s.to_owned()));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_owned()));
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            return Ok(StoreUrl::Redis(s.to_owned()));
        }
        let scheme = s.split_once(':').map_or(s, |(scheme, _)| scheme);
        bail!(
            "unsupported store URL scheme {scheme:?} in {}: expected memory, sqlite:PATH, \
             redis://HOST, rediss://HOST, postgres://USER@HOST/DB or mysql://USER@HOST/DB",
            redact(s)
        )
    }
}

/// `--store` parses without clap repeating the raw value, password included (see
/// [`crate::url_arg`]).
impl crate::url_arg::RedactedParse for StoreUrl {
    fn parse_redacted(text: &str) -> Result<Self, String> {
        text.parse().map_err(|e: anyhow::Error| e.to_string())
    }
}

impl clap::builder::ValueParserFactory for StoreUrl {
    type Parser = crate::url_arg::UrlParser<StoreUrl>;

    fn value_parser() -> Self::Parser {
        crate::url_arg::UrlParser::new()
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreUrl::Mysql(url) => f.write_str(&redact(url)),
            StoreUrl::Postgres(url) => f.write_str(&redact(url)),
            StoreUrl::Redis(url) => f.write_str(&idem_redis::redact(url)),
        }
    }
}

/// A URL with any password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    idem::redact_url(url)
}

/// The store of a command that is given none: `--store`, then `IDEM_STORE`, then this.
pub(crate) const DEFAULT_STORE: &str = "sqlite:idem.db";

/// The variable that holds the store URL when `--store` is not given.
pub(crate) const STORE_ENV: &str = "IDEM_STORE";

/// `--store` and [`Location`]: the one store a command works on, and where in it idem's
/// records live. Flatten it into a command's arguments (`#[command(flatten)]`) so that every
/// command finds its store the same way: `--store`, then `IDEM_STORE`, then
/// [`DEFAULT_STORE`].
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct StoreArgs {
    /// The store: `sqlite:PATH`, `redis://HOST/DB`, `postgres://USER@HOST/DB` or
    /// `mysql://USER@HOST/DB`. Help never shows the variable's value (it may hold a password).
    #[arg(
        long,
        env = STORE_ENV,
        hide_env_values = true,
        value_name = "URL",
        default_value = DEFAULT_STORE
    )]
    pub(crate) store: StoreUrl,
    #[command(flatten)]
    pub(crate) location: Location,
}

impl StoreArgs {
    /// Whether the store is the default one (none given), for messages that say how to pick
    /// another.
    pub(crate) fn is_default(&self) -> bool {
        DEFAULT_STORE
            .parse::<StoreUrl>()
            .is_ok_and(|d| d == self.store)
    }
}

/// Where in the store idem's records live, when not where they do by default. Each option
/// belongs to some schemes only; giving it for another is an error, not ignored.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Location {
    /// PostgreSQL: the schema of the records table [default: public].
    #[arg(long, value_name = "NAME")]
    pub(crate) schema: Option<String>,
    /// PostgreSQL and MySQL: the records table [default: idem_records].
    #[arg(long, value_name = "NAME")]
    pub(crate) table: Option<String>,
    /// Redis: the prefix of idem's keys [default: idem:].
    #[arg(long, value_name = "PREFIX")]
    pub(crate) prefix: Option<String>,
}

impl Location {
    /// Refuses an option that `url`'s store does not have.
    pub(crate) fn check(&self, url: &StoreUrl) -> anyhow::Result<()> {
        let scheme = match url {
            StoreUrl::Memory => "the memory store",
            StoreUrl::Sqlite(_) => "a SQLite store",
            StoreUrl::Mysql(_) => "a MySQL store",
            StoreUrl::Postgres(_) => "a PostgreSQL store",
            StoreUrl::Redis(_) => "a Redis store",
        };
        if self.schema.is_some() && !matches!(url, StoreUrl::Postgres(_)) {
            bail!(
                "--schema is for postgres:// stores, not {scheme} (MySQL uses the URL's \
                 database)"
            );
        }
        if self.table.is_some() && !matches!(url, StoreUrl::Postgres(_) | StoreUrl::Mysql(_)) {
            bail!(
                "--table is for postgres:// and mysql:// stores, not {scheme} (SQLite's table is \
                 always idem_records; Redis keeps records under --prefix)"
            );
        }
        if self.prefix.is_some() && !matches!(url, StoreUrl::Redis(_)) {
            bail!("--prefix is for redis:// stores, not {scheme}");
        }
        Ok(())
    }

    /// The PostgreSQL schema and table, defaults filled in.
    pub(crate) fn postgres(&self) -> (&str, &str) {
        (
            self.schema
                .as_deref()
                .unwrap_or(idem_postgres::DEFAULT_SCHEMA),
            self.table
                .as_deref()
                .unwrap_or(idem_postgres::DEFAULT_TABLE),
        )
    }

    /// The MySQL table, default filled in.
    pub(crate) fn mysql(&self) -> &str {
        self.table.as_deref().unwrap_or(idem_mysql::DEFAULT_TABLE)
    }
}

/// How a store is opened.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OpenOptions {
    pub(crate) synchronous: Synchronous,
    /// Refuse to create a missing SQLite file (operator commands must not create databases).
    pub(crate) must_exist: bool,
}

/// An opened store, keeping its concrete type for store-specific work.
#[derive(Clone, Debug)]
pub(crate) enum Opened {
    Memory(MemoryStore),
    Sqlite(SqliteStore),
    /// Not migrated: commands that need the table check for it, none creates it silently.
    Mysql(MysqlStore),
    /// Connected; its schema must exist (`idem migrate` creates it).
    Postgres(PostgresStore),
    /// Connected; warns at connect if the server may evict records.
    Redis(RedisStore),
}

/// Evaluates `$body` with `$store` bound to the concrete store inside an [`Opened`], so code
/// generic over `Store` and `Inspect` (verify's store mode, the operator commands) runs on every
/// scheme: a new scheme adds its arm here and nothing else.
macro_rules! with_store {
    ($opened:expr, $store:ident => $body:expr) => {
        match $opened {
            $crate::store_url::Opened::Memory($store) => $body,
            $crate::store_url::Opened::Sqlite($store) => $body,
            $crate::store_url::Opened::Mysql($store) => $body,
            $crate::store_url::Opened::Postgres($store) => $body,
            $crate::store_url::Opened::Redis($store) => $body,
        }
    };
}

impl StoreUrl {
    /// The URL with its credentials, for a process that opens the same store (never print
    /// it: `Display` is the redacted form).
    pub(crate) fn with_credentials(&self) -> String {
        match self {
            StoreUrl::Memory => "memory".to_owned(),
            StoreUrl::Sqlite(p) => format!("sqlite:{}", p.display()),
            StoreUrl::Mysql(url) | StoreUrl::Postgres(url) | StoreUrl::Redis(url) => url.clone(),
        }
    }

    /// Opens the store: SQLite opens its file, networked stores connect.
    pub(crate) async fn open(&self, opts: OpenOptions) -> anyhow::Result<Opened> {
        self.open_in(&Location::default(), opts).await
    }

    /// Opens the store with its records where `location` says.
    pub(crate) async fn open_in(
        &self,
        location: &Location,
        opts: OpenOptions,
    ) -> anyhow::Result<Opened> {
        location.check(self)?;
        match self {
            StoreUrl::Memory => Ok(Opened::Memory(MemoryStore::new())),
            StoreUrl::Sqlite(path) => {
                if opts.must_exist {
                    check_idem_database(path)?;
                }
                let store = SqliteStore::builder(path)
                    .synchronous(opts.synchronous)
                    .open()
                    .with_context(|| format!("opening {self}"))?;
                Ok(Opened::Sqlite(store))
            }
            StoreUrl::Mysql(url) => {
                let store = MysqlStore::builder(url.as_str())
                    .table(location.mysql())
                    .build()
                    .with_context(|| format!("opening {self}"))?;
                Ok(Opened::Mysql(store))
            }
            StoreUrl::Postgres(url) => {
                let (schema, table) = location.postgres();
                let store = PostgresStore::builder(url.as_str())
                    .schema(schema)
                    .table(table)
                    .connect()
                    .await
                    .with_context(|| format!("opening {self}"))?;
                Ok(Opened::Postgres(store))
            }
            StoreUrl::Redis(url) => {
                let (url, wait) = redis_wait(url)?;
                let mut builder = RedisStore::builder(url);
                if let Some((replicas, timeout)) = wait {
                    builder = builder.wait_for_replicas(replicas, timeout);
                }
                if let Some(prefix) = &location.prefix {
                    builder = builder.prefix(prefix.as_str());
                }
                let store = builder
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {self}"))?;
                Ok(Opened::Redis(store))
            }
        }
    }
}

/// How long a `WAIT` asked for by `wait_replicas` waits, unless `wait_timeout_ms` says.
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_millis(500);

/// Splits idem's durability parameters off a Redis URL's query: `wait_replicas=N` (after every
/// claim and completion, `WAIT N`: see `RedisStoreBuilder::wait_for_replicas`) and
/// `wait_timeout_ms=MS` (how long that waits, 500 by default). The rest of the URL goes to the
/// client as it was.
pub(crate) fn redis_wait(url: &str) -> anyhow::Result<(String, Option<(u32, Duration)>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let (mut replicas, mut timeout, mut rest) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("wait_replicas", v)) => {
                let n: u32 = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("wait_replicas={v}: expected a number from 1"))?;
                replicas = Some(n);
            }
            Some(("wait_timeout_ms", v)) => {
                let ms: u64 = v
                    .parse()
                    .with_context(|| format!("wait_timeout_ms={v}: expected milliseconds"))?;
                timeout = Some(Duration::from_millis(ms));
            }
            _ => rest.push(pair),
        }
    }
    if timeout.is_some() && replicas.is_none() {
        bail!("wait_timeout_ms needs wait_replicas in the Redis URL");
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((
        url,
        replicas.map(|n| (n, timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT))),
    ))
}

/// Refuses, with a clear message, a path that is not an existing idem SQLite database: operator
/// commands must neither create a database nor add idem's tables to someone else's.
fn check_idem_database(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    if !path.exists() {
        bail!("no SQLite database at {shown}");
    }
    if path.is_dir() {
        bail!("{shown} is a directory, not a SQLite database");
    }
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {shown} as a SQLite database"))?;
    let has_records: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'idem_records')",
            [],
            |r| r.get(0),
        )
        .with_context(|| format!("cannot read {shown} as a SQLite database"))?;
    if !has_records {
        bail!("{shown} is a SQLite database without idem records (no idem_records table)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_carry_the_wait_for_replicas() {
        let plain = redis_wait("redis://h:7000,h:7001/0").unwrap();
        assert_eq!(plain, ("redis://h:7000,h:7001/0".to_owned(), None));
        let (url, wait) = redis_wait("redis://h:7000?wait_replicas=1").unwrap();
        assert_eq!(url, "redis://h:7000");
        assert_eq!(wait, Some((1, DEFAULT_WAIT_TIMEOUT)));
        let (url, wait) =
            redis_wait("redis://h?protocol=resp3&wait_replicas=2&wait_timeout_ms=200").unwrap();
        assert_eq!(url, "redis://h?protocol=resp3");
        assert_eq!(wait, Some((2, Duration::from_millis(200))));
        for bad in [
            "redis://h?wait_replicas=0",
            "redis://h?wait_replicas=x",
            "redis://h?wait_timeout_ms=200",
        ] {
            assert!(redis_wait(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_and_rejects_clearly() {
        assert_eq!("memory".parse::<StoreUrl>().unwrap(), StoreUrl::Memory);
        assert_eq!(
            "sqlite:/tmp/a.db".parse::<StoreUrl>().unwrap(),
            StoreUrl::Sqlite("/tmp/a.db".into())
        );
        assert_eq!(
            "sqlite:///tmp/a.db".parse::<StoreUrl>().unwrap(),
            StoreUrl::Sqlite("/tmp/a.db".into())
        );
        let redis = "redis://:secret@127.0.0.1:6379/14"
            .parse::<StoreUrl>()
            .unwrap();
        assert_eq!(
            redis,
            StoreUrl::Redis("redis://:secret@127.0.0.1:6379/14".into())
        );
        assert_eq!(redis.to_string(), "redis://:***@127.0.0.1:6379/14");
        assert!(matches!(
            "rediss://h".parse::<StoreUrl>().unwrap(),
            StoreUrl::Redis(_)
        ));
        let err = "sqlite:".parse::<StoreUrl>().unwrap_err().to_string();
        assert!(err.contains("no path"), "{err}");
        let pg = "postgres://u:secret@h:5432/db".parse::<StoreUrl>().unwrap();
        assert_eq!(
            pg,
            StoreUrl::Postgres("postgres://u:secret@h:5432/db".into())
        );
        assert_eq!(pg.to_string(), "postgres://u:***@h:5432/db");
        let err = "ftp://u:secret@h/x"
            .parse::<StoreUrl>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"ftp\"") && !err.contains("secret"), "{err}");
        let url = "mysql://app:secret@db:3306/idem"
            .parse::<StoreUrl>()
            .unwrap();
        assert_eq!(
            url,
            StoreUrl::Mysql("mysql://app:secret@db:3306/idem".into())
        );
        assert_eq!(url.to_string(), "mysql://app:***@db:3306/idem");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("redis://:pw@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact("postgres://user:pw@host/db"),
            "postgres://user:***@host/db"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
    }
}
