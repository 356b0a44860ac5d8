//! What the operator commands read beyond the [`Inspect`] trait: counts within one namespace,
//! the records in one state (in progress or failed, within a namespace or not), and how many
//! records are past retention (`purge --dry-run`).
//!
//! SQL stores answer with one query on their own table (the keys, in order), then the records
//! come from [`Store::get`], so that every record is decoded by its store. Redis has no index:
//! its answers `SCAN` the keys under the prefix (of one namespace, with `--namespace`) and read
//! each record, like the store's own `Inspect` views. The memory store is never inspected (it
//! lives in one process).

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};
use idem::{Inspect, Key, MemoryStore, Namespace, Record, State, Store, Timestamp};
use idem_mysql::MysqlStore;
use idem_postgres::PostgresStore;
use idem_redis::RedisStore;
use idem_sqlite::SqliteStore;

/// Records read at once when listing or scanning.
const CONCURRENT_READS: usize = 32;

/// The operator's reads, on every store.
pub(super) trait Records: Inspect + Sync {
    /// How many records of `ns` are in each state (expired ones not purged yet included).
    async fn count_in(&self, ns: &Namespace) -> anyhow::Result<Vec<(State, u64)>>;

    /// Records in `state` (of `ns`, if given), at most `limit`: in progress ones by lease end
    /// (stuck ones first, as [`Inspect::in_progress`]), the others most recently changed first.
    async fn list(
        &self,
        state: State,
        ns: Option<&Namespace>,
        limit: usize,
    ) -> anyhow::Result<Vec<Record>>;

    /// How many records are past retention at `now` (what a purge deletes).
    async fn count_expired(&self, now: Timestamp) -> anyhow::Result<u64>;
}

/// The order of [`Records::list`], as SQL.
fn order_by(state: State) -> &'static str {
    if state == State::InProgress {
        "lease_until, updated_at"
    } else {
        "updated_at DESC"
    }
}

/// The order of [`Records::list`], for stores that sort in memory.
fn sort(records: &mut [Record], state: State) {
    if state == State::InProgress {
        records.sort_by_key(|r| (r.lease_until, r.updated_at));
    } else {
        records.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
    }
}

/// The records of `keys`, in order, through the store: those gone or no longer in `state`
/// since the keys were read are left out.
async fn records_of<S: Store + Sync>(
    store: &S,
    keys: Vec<Key>,
    state: State,
) -> anyhow::Result<Vec<Record>> {
    let records: Vec<Option<Record>> = futures_util::stream::iter(keys)
        .map(|key| async move { store.get(&key).await })
        .buffered(CONCURRENT_READS)
        .try_collect()
        .await?;
    Ok(records
        .into_iter()
        .flatten()
        .filter(|r| r.state == state)
        .collect())
}

/// A stored key, checked.
fn key_of(ns: &str, id: &str) -> anyhow::Result<Key> {
    Namespace::new(ns)
        .and_then(|n| n.key(id))
        .with_context(|| format!("the store holds an invalid key {ns}:{id}"))
}

fn counts_from(rows: impl IntoIterator<Item = (i64, i64)>) -> anyhow::Result<Vec<(State, u64)>> {
    rows.into_iter()
        .map(|(code, n)| {
            let state = State::from_code(code)
                .with_context(|| format!("a record has an unknown state {code}"))?;
            Ok((state, u64::try_from(n).unwrap_or(0)))
        })
        .collect()
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Records for MemoryStore {
    async fn count_in(&self, _: &Namespace) -> anyhow::Result<Vec<(State, u64)>> {
        bail!("the memory store cannot be inspected from another process")
    }

    async fn list(&self, _: State, _: Option<&Namespace>, _: usize) -> anyhow::Result<Vec<Record>> {
        bail!("the memory store cannot be inspected from another process")
    }

    async fn count_expired(&self, _: Timestamp) -> anyhow::Result<u64> {
        bail!("the memory store cannot be inspected from another process")
    }
}

/// Runs `f` on a read-only connection of its own to the store's file (WAL: readers never wait
/// for the writer), off the async threads.
async fn sqlite_read<T: Send + 'static>(
    store: &SqliteStore,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = store
        .path()
        .context("an in-memory SQLite store cannot be inspected")?
        .to_owned();
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        f(&conn)
    })
    .await?
    .context("reading the SQLite store")
}

impl Records for SqliteStore {
    async fn count_in(&self, ns: &Namespace) -> anyhow::Result<Vec<(State, u64)>> {
        let ns = ns.as_str().to_owned();
        let rows = sqlite_read(self, move |conn| {
            conn.prepare(
                "SELECT state, COUNT(*) FROM idem_records WHERE namespace = ?1 \
                     GROUP BY state ORDER BY state",
            )?
            .query_map([ns], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<(i64, i64)>>>()
        })
        .await?;
        counts_from(rows)
    }

    async fn list(
        &self,
        state: State,
        ns: Option<&Namespace>,
        limit: usize,
    ) -> anyhow::Result<Vec<Record>> {
        let ns = ns.map(|n| n.as_str().to_owned());
        let sql = format!(
            "SELECT namespace, id FROM idem_records WHERE state = ?1 \
             AND (?2 IS NULL OR namespace = ?2) ORDER BY {} LIMIT ?3",
            order_by(state)
        );
        let rows = sqlite_read(self, move |conn| {
            conn.prepare(&sql)?
                .query_map(rusqlite::params![state.code(), ns, sql_limit(limit)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<rusqlite::Result<Vec<(String, String)>>>()
        })
        .await?;
        let keys = rows
            .iter()
            .map(|(ns, id)| key_of(ns, id))
            .collect::<anyhow::Result<_>>()?;
        records_of(self, keys, state).await
    }

    async fn count_expired(&self, now: Timestamp) -> anyhow::Result<u64> {
        let n: i64 = sqlite_read(self, move |conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM idem_records WHERE expires_at <= ?1",
                [now.as_millis()],
                |r| r.get(0),
            )
        })
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl Records for PostgresStore {
    async fn count_in(&self, ns: &Namespace) -> anyhow::Result<Vec<(State, u64)>> {
        let client = self
            .pool()
            .get()
            .await
            .context("connecting to PostgreSQL")?;
        let sql = format!(
            "SELECT state::int8, count(*)::int8 FROM {} WHERE namespace = $1 \
             GROUP BY state ORDER BY state",
            self.table().qualified()
        );
        let rows = client.query(&sql, &[&ns.as_str()]).await?;
        counts_from(
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?,
        )
    }

    async fn list(
        &self,
        state: State,
        ns: Option<&Namespace>,
        limit: usize,
    ) -> anyhow::Result<Vec<Record>> {
        let client = self
            .pool()
            .get()
            .await
            .context("connecting to PostgreSQL")?;
        let sql = format!(
            "SELECT namespace, id FROM {} WHERE state = $1::int8 \
             AND ($2::text IS NULL OR namespace = $2::text) ORDER BY {} LIMIT $3::int8",
            self.table().qualified(),
            order_by(state)
        );
        let ns = ns.map(Namespace::as_str);
        let rows = client
            .query(&sql, &[&state.code(), &ns, &sql_limit(limit)])
            .await?;
        let keys = rows
            .iter()
            .map(|r| key_of(r.try_get(0)?, r.try_get(1)?))
            .collect::<anyhow::Result<_>>()?;
        drop(client);
        records_of(self, keys, state).await
    }

    async fn count_expired(&self, _: Timestamp) -> anyhow::Result<u64> {
        let client = self
            .pool()
            .get()
            .await
            .context("connecting to PostgreSQL")?;
        // On the server's clock, as the purge itself.
        let sql = format!(
            "SELECT count(*)::int8 FROM {} WHERE expires_at <= now()",
            self.table().qualified()
        );
        let n: i64 = client.query_one(&sql, &[]).await?.try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl Records for MysqlStore {
    async fn count_in(&self, ns: &Namespace) -> anyhow::Result<Vec<(State, u64)>> {
        use mysql_async::prelude::Queryable;
        let mut conn = self
            .pool()
            .get_conn()
            .await
            .context("connecting to MySQL")?;
        let sql = format!(
            "SELECT state, COUNT(*) FROM `{}` WHERE namespace = ? GROUP BY state ORDER BY state",
            self.table()
        );
        let rows: Vec<(i64, i64)> = conn.exec(sql, (ns.as_str(),)).await?;
        counts_from(rows)
    }

    async fn list(
        &self,
        state: State,
        ns: Option<&Namespace>,
        limit: usize,
    ) -> anyhow::Result<Vec<Record>> {
        use mysql_async::prelude::Queryable;
        let mut conn = self
            .pool()
            .get_conn()
            .await
            .context("connecting to MySQL")?;
        let sql = format!(
            "SELECT namespace, id FROM `{}` WHERE state = ? AND (? IS NULL OR namespace = ?) \
             ORDER BY {} LIMIT {}",
            self.table(),
            order_by(state),
            sql_limit(limit)
        );
        let ns = ns.map(Namespace::as_str);
        let rows: Vec<(Vec<u8>, Vec<u8>)> = conn.exec(sql, (state.code(), ns, ns)).await?;
        drop(conn);
        let keys = rows
            .iter()
            .map(|(ns, id)| key_of(&String::from_utf8_lossy(ns), &String::from_utf8_lossy(id)))
            .collect::<anyhow::Result<_>>()?;
        records_of(self, keys, state).await
    }

    async fn count_expired(&self, now: Timestamp) -> anyhow::Result<u64> {
        use mysql_async::prelude::Queryable;
        let mut conn = self
            .pool()
            .get_conn()
            .await
            .context("connecting to MySQL")?;
        let sql = format!(
            "SELECT COUNT(*) FROM `{}` WHERE expires_at <= ?",
            self.table()
        );
        let n: Option<i64> = conn.exec_first(sql, (now.as_millis(),)).await?;
        Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }
}

/// Every record under the prefix of `store` (of `ns`, if given). Costs one `SCAN` over the
/// whole database and one `GET` per record.
async fn redis_records(store: &RedisStore, ns: Option<&Namespace>) -> anyhow::Result<Vec<Record>> {
    let mut pattern = glob_escape(store.prefix());
    pattern.push('{');
    if let Some(ns) = ns {
        pattern.push_str(&glob_escape(ns.as_str()));
        pattern.push(':');
    }
    pattern.push('*');
    // Every master of a cluster; SCAN may return a key twice: the set keeps one.
    let keys: std::collections::BTreeSet<Vec<u8>> = store
        .scan_keys(&pattern)
        .await
        .context("scanning the Redis keys")?
        .into_iter()
        .collect();
    let keys = keys
        .iter()
        .map(|raw| redis_key(store, raw))
        .collect::<anyhow::Result<Vec<Key>>>()?;
    let records: Vec<Option<Record>> = futures_util::stream::iter(keys)
        .map(|key| async move { store.get(&key).await })
        .buffer_unordered(CONCURRENT_READS)
        .try_collect()
        .await?;
    Ok(records.into_iter().flatten().collect())
}

/// The idem key of a Redis key under the prefix of `store` (`<prefix>{namespace:id}`).
fn redis_key(store: &RedisStore, raw: &[u8]) -> anyhow::Result<Key> {
    let text = String::from_utf8_lossy(raw);
    text.strip_prefix(store.prefix())
        .and_then(|t| t.strip_prefix('{'))
        .and_then(|t| t.strip_suffix('}'))
        .and_then(|t| Key::parse(t).ok())
        .with_context(|| {
            format!("Redis key {text:?} is under the prefix but is not an idem record key")
        })
}

/// `s` with the glob characters of `SCAN MATCH` escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Records for RedisStore {
    async fn count_in(&self, ns: &Namespace) -> anyhow::Result<Vec<(State, u64)>> {
        let mut counts: Vec<(State, u64)> = Vec::new();
        for r in redis_records(self, Some(ns)).await? {
            match counts.iter_mut().find(|(s, _)| *s == r.state) {
                Some((_, n)) => *n += 1,
                None => counts.push((r.state, 1)),
            }
        }
        Ok(counts)
    }

    async fn list(
        &self,
        state: State,
        ns: Option<&Namespace>,
        limit: usize,
    ) -> anyhow::Result<Vec<Record>> {
        let mut records: Vec<Record> = redis_records(self, ns)
            .await?
            .into_iter()
            .filter(|r| r.state == state)
            .collect();
        sort(&mut records, state);
        records.truncate(limit);
        Ok(records)
    }

    async fn count_expired(&self, now: Timestamp) -> anyhow::Result<u64> {
        let records = redis_records(self, None).await?;
        Ok(records.iter().filter(|r| r.is_expired(now)).count() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_patterns_escape_globs() {
        assert_eq!(glob_escape("idem:"), "idem:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
