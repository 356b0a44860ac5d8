//! The store operations as SQL on one connection, inside a transaction the caller opened.
//!
//! Each operation reads the key's row, applies the contract's transition from
//! [`idem::transition`] and writes the row back in one statement. They are atomic because every
//! caller holds SQLite's write lock (`BEGIN IMMEDIATE`) around them: the writer thread in store
//! mode, the caller's own transaction in transactional mode.

use std::time::Duration;

use bytes::Bytes;
use idem::transition::{self, Change};
use idem::{
    Claim, ClaimRequest, Completion, Fingerprint, Key, Namespace, Record, State, StoreError,
    StoreErrorKind, Timestamp, Token, WriteOutcome,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

/// The schema, applied when a store opens a database.
pub(crate) const MIGRATION: &str = include_str!("../migrations/sqlite/0001_records.sql");
/// The schema version this code reads and writes.
pub(crate) const SCHEMA_VERSION: i64 = 1;

const SELECT: &str = "SELECT state, fingerprint, token, owner, lease_until, attempts, result, \
                      created_at, updated_at, expires_at FROM idem_records \
                      WHERE namespace = ?1 AND id = ?2";

const UPSERT: &str = "INSERT INTO idem_records (namespace, id, state, fingerprint, token, owner, \
                      lease_until, attempts, result, created_at, updated_at, expires_at) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
                      ON CONFLICT (namespace, id) DO UPDATE SET state = excluded.state, \
                      fingerprint = excluded.fingerprint, token = excluded.token, \
                      owner = excluded.owner, lease_until = excluded.lease_until, \
                      attempts = excluded.attempts, result = excluded.result, \
                      created_at = excluded.created_at, updated_at = excluded.updated_at, \
                      expires_at = excluded.expires_at";

const INSERT_NEW: &str = "INSERT INTO idem_records (namespace, id, state, fingerprint, token, \
                          owner, lease_until, attempts, result, created_at, updated_at, \
                          expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
                          ON CONFLICT (namespace, id) DO NOTHING";

// The happy path of `complete`: one statement, fenced by state and token.
const COMPLETE: &str = "UPDATE idem_records SET state = 2, lease_until = NULL, result = ?4, \
                        updated_at = ?5, expires_at = ?6 \
                        WHERE namespace = ?1 AND id = ?2 AND state = 1 AND token = ?3";

/// Maps a SQLite error to a store error kind callers can act on.
pub(crate) fn sql_error(context: &'static str, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    let kind = match &e {
        rusqlite::Error::SqliteFailure(f, msg) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => StoreErrorKind::Busy,
            C::CannotOpen
            | C::SystemIoFailure
            | C::DiskFull
            | C::ReadOnly
            | C::PermissionDenied => StoreErrorKind::Unavailable,
            C::DatabaseCorrupt | C::NotADatabase => StoreErrorKind::Corrupt,
            _ if msg.as_deref().is_some_and(|m| m.contains("no such table")) => {
                StoreErrorKind::Schema
            }
            _ => StoreErrorKind::Backend,
        },
        _ => StoreErrorKind::Backend,
    };
    StoreError::new(kind, format!("sqlite {context}: {e}")).with_source(e)
}

fn corrupt(key: &Key, what: &str) -> StoreError {
    StoreError::corrupt(format!("record {key}: {what}"))
}

/// Decodes the record columns of `SELECT`, which start at column `at` of the row.
fn decode(key: &Key, row: &Row<'_>, at: usize) -> Result<Record, StoreError> {
    // A column of the wrong type or out of range is a corrupt record, not a database failure.
    let get_err = |e: rusqlite::Error| match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => corrupt(key, &e.to_string()),
        e => sql_error("read record", e),
    };
    let state: i64 = row.get(at).map_err(get_err)?;
    let state =
        State::from_code(state).ok_or_else(|| corrupt(key, &format!("unknown state {state}")))?;
    let fp: Vec<u8> = row.get(at + 1).map_err(get_err)?;
    let fingerprint = Fingerprint::from_slice(&fp).ok_or_else(|| {
        corrupt(
            key,
            &format!("fingerprint of {} bytes, expected 16", fp.len()),
        )
    })?;
    let token: Option<i64> = row.get(at + 2).map_err(get_err)?;
    let owner: Option<String> = row.get(at + 3).map_err(get_err)?;
    let lease_until: Option<i64> = row.get(at + 4).map_err(get_err)?;
    let attempts: i64 = row.get(at + 5).map_err(get_err)?;
    let attempts =
        u32::try_from(attempts).map_err(|_| corrupt(key, &format!("attempts {attempts}")))?;
    let result: Option<Vec<u8>> = row.get(at + 6).map_err(get_err)?;
    let ts = |i| {
        row.get::<_, i64>(at + i)
            .map(Timestamp::from_millis)
            .map_err(get_err)
    };
    if state == State::InProgress && (token.is_none() || lease_until.is_none()) {
        return Err(corrupt(key, "in progress without a token or lease"));
    }
    // A completed record without its result would replay an empty one; a failed one without
    // its reason would dead-letter with none.
    if matches!(state, State::Completed | State::Failed) && result.is_none() {
        return Err(corrupt(key, &format!("{state} without a stored result")));
    }
    Ok(Record::new(
        key.clone(),
        state,
        fingerprint,
        token.map(Token::from_i64),
        owner.map(Into::into),
        lease_until.map(Timestamp::from_millis),
        attempts,
        result.map(Bytes::from),
        ts(7)?,
        ts(8)?,
        ts(9)?,
    ))
}

/// Reads a key's record.
pub(crate) fn load(conn: &Connection, key: &Key) -> Result<Option<Record>, StoreError> {
    let mut stmt = conn
        .prepare_cached(SELECT)
        .map_err(|e| sql_error("prepare", e))?;
    let mut rows = stmt
        .query(params![key.namespace().as_str(), key.id()])
        .map_err(|e| sql_error("select record", e))?;
    match rows.next().map_err(|e| sql_error("select record", e))? {
        Some(row) => decode(key, row, 0).map(Some),
        None => Ok(None),
    }
}

fn write(conn: &Connection, sql: &str, rec: &Record) -> Result<usize, StoreError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(|e| sql_error("prepare", e))?;
    stmt.execute(params![
        rec.key.namespace().as_str(),
        rec.key.id(),
        rec.state.code(),
        &rec.fingerprint.to_bytes()[..],
        rec.token.map(Token::as_i64),
        rec.owner.as_deref(),
        rec.lease_until.map(Timestamp::as_millis),
        i64::from(rec.attempts),
        rec.result.as_deref(),
        rec.created_at.as_millis(),
        rec.updated_at.as_millis(),
        rec.expires_at.as_millis(),
    ])
    .map_err(|e| sql_error("write record", e))
}

/// Writes a record (insert or replace).
pub(crate) fn save(conn: &Connection, rec: &Record) -> Result<(), StoreError> {
    write(conn, UPSERT, rec).map(drop)
}

/// Loads the slot, applies `f`, writes the slot back if it changed.
pub(crate) fn apply<R>(
    conn: &Connection,
    key: &Key,
    now: Timestamp,
    f: impl FnOnce(&mut Option<Record>, Timestamp) -> (R, Change),
) -> Result<R, StoreError> {
    let mut slot = load(conn, key)?;
    let (out, change) = f(&mut slot, now);
    if let (true, Some(rec)) = (change.is_write(), &slot) {
        save(conn, rec)?;
    }
    Ok(out)
}

/// Claims a key.
pub(crate) fn claim(
    conn: &Connection,
    req: &ClaimRequest,
    now: Timestamp,
) -> Result<Claim, StoreError> {
    // New keys, the common case, take one statement.
    let (fresh, lease) = transition::new_record(req, now);
    if write(conn, INSERT_NEW, &fresh)? == 1 {
        return Ok(Claim::Acquired(lease));
    }
    apply(conn, &req.key, now, |slot, now| {
        transition::claim(slot, req, now)
    })
}

/// Completes a claim (the result size is checked by the caller).
pub(crate) fn complete(
    conn: &Connection,
    c: &Completion,
    now: Timestamp,
) -> Result<WriteOutcome, StoreError> {
    let mut stmt = conn
        .prepare_cached(COMPLETE)
        .map_err(|e| sql_error("prepare", e))?;
    let expires = now.plus(c.retention);
    let n = stmt
        .execute(params![
            c.key.namespace().as_str(),
            c.key.id(),
            c.token.as_i64(),
            &c.result[..],
            now.as_millis(),
            expires.as_millis(),
        ])
        .map_err(|e| sql_error("complete", e))?;
    if n == 1 {
        return Ok(WriteOutcome::Applied);
    }
    // Refused by the fence: a repeated complete by the same token, or a lost lease.
    apply(conn, &c.key, now, |slot, now| {
        transition::complete(slot, c, now)
    })
}

pub(crate) fn release(
    conn: &Connection,
    key: &Key,
    token: Token,
    retention: Duration,
    now: Timestamp,
) -> Result<WriteOutcome, StoreError> {
    apply(conn, key, now, |slot, now| {
        transition::release(slot, token, retention, now)
    })
}

pub(crate) fn extend(
    conn: &Connection,
    key: &Key,
    token: Token,
    lease: Duration,
    now: Timestamp,
) -> Result<WriteOutcome, StoreError> {
    apply(conn, key, now, |slot, now| {
        transition::extend(slot, token, lease, now)
    })
}

pub(crate) fn fail(
    conn: &Connection,
    key: &Key,
    token: Token,
    reason: &str,
    retention: Duration,
    now: Timestamp,
) -> Result<WriteOutcome, StoreError> {
    apply(conn, key, now, |slot, now| {
        transition::fail(slot, token, reason, retention, now)
    })
}

pub(crate) fn evict(conn: &Connection, key: &Key) -> Result<bool, StoreError> {
    let mut stmt = conn
        .prepare_cached("DELETE FROM idem_records WHERE namespace = ?1 AND id = ?2")
        .map_err(|e| sql_error("prepare", e))?;
    let n = stmt
        .execute(params![key.namespace().as_str(), key.id()])
        .map_err(|e| sql_error("evict", e))?;
    Ok(n > 0)
}

/// Deletes up to `limit` expired rows, oldest first, through the `expires_at` index.
pub(crate) fn purge(conn: &Connection, now: Timestamp, limit: usize) -> Result<usize, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "DELETE FROM idem_records WHERE (namespace, id) IN (SELECT namespace, id \
             FROM idem_records WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
        )
        .map_err(|e| sql_error("prepare", e))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    stmt.execute(params![now.as_millis(), limit])
        .map_err(|e| sql_error("purge", e))
}

/// Counts records by state, for operators.
pub(crate) fn count_by_state(conn: &Connection) -> Result<Vec<(State, u64)>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT state, COUNT(*) FROM idem_records GROUP BY state ORDER BY state")
        .map_err(|e| sql_error("prepare", e))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .map_err(|e| sql_error("count", e))?;
    let mut out = Vec::new();
    for row in rows {
        let (code, n) = row.map_err(|e| sql_error("count", e))?;
        let state = State::from_code(code)
            .ok_or_else(|| StoreError::corrupt(format!("a record has unknown state {code}")))?;
        out.push((state, u64::try_from(n).unwrap_or(0)));
    }
    Ok(out)
}

/// In-progress records, oldest claim first, for operators.
pub(crate) fn list_in_progress(conn: &Connection, limit: usize) -> Result<Vec<Record>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT namespace, id, state, fingerprint, token, owner, lease_until, attempts, \
             result, created_at, updated_at, expires_at FROM idem_records WHERE state = 1 \
             ORDER BY lease_until, updated_at LIMIT ?1",
        )
        .map_err(|e| sql_error("prepare", e))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = stmt.query([limit]).map_err(|e| sql_error("list", e))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| sql_error("list", e))? {
        let ns: String = row.get(0).map_err(|e| sql_error("list", e))?;
        let id: String = row.get(1).map_err(|e| sql_error("list", e))?;
        let key = Namespace::new(&ns)
            .and_then(|ns| ns.key(id.clone()))
            .map_err(|e| StoreError::corrupt(format!("stored key {ns}:{id} is invalid: {e}")))?;
        out.push(decode(&key, row, 2)?);
    }
    Ok(out)
}

/// Creates the schema if missing and checks its version.
pub(crate) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(MIGRATION)
        .map_err(|e| sql_error("create schema", e))?;
    let version: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM idem_schema", [], |r| r.get(0))
        .optional()
        .map_err(|e| sql_error("read schema version", e))?
        .flatten();
    match version {
        Some(SCHEMA_VERSION) => Ok(()),
        other => Err(StoreError::new(
            StoreErrorKind::Schema,
            format!(
                "idem schema version {other:?} in this database; this idem reads version {SCHEMA_VERSION}"
            ),
        )),
    }
}
