//! Running SQL scripts on a connection, and reading records back.
//!
//! A script is several statements sent as one text query: one round trip, one answer per
//! statement, and the server stops at the first statement that fails. [`script`] keeps the
//! answers of the statements that ran and the error that stopped the rest, so that a caller
//! can tell which statement failed (an `INSERT` that lost a race, error 1062, say).

use bytes::Bytes;
use idem::{Fingerprint, Key, Namespace, Record, State, StoreError, Timestamp, Token};
use mysql_async::prelude::{FromValue, Queryable};
use mysql_async::{Conn, Error as MyError, Row};

/// The answer of one statement of a script.
#[derive(Debug, Default)]
pub(crate) struct Done {
    /// Rows the statement changed (matched, for `UPDATE`: the store's connections set
    /// `CLIENT_FOUND_ROWS`).
    pub(crate) affected: u64,
    /// The rows it returned.
    pub(crate) rows: Vec<Row>,
}

/// The statements of a script that ran, and the error that stopped it, if any.
#[derive(Debug)]
pub(crate) struct Script {
    pub(crate) done: Vec<Done>,
    pub(crate) error: Option<MyError>,
}

impl Script {
    /// The answers, or the error if any statement failed.
    pub(crate) fn ok(self) -> Result<Vec<Done>, MyError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.done),
        }
    }
}

/// Runs `sql` (one or more statements separated by `;`) and collects every answer.
///
/// The driver reads one answer per statement it is asked for; how many there are cannot be
/// told from the protocol alone when the last ones carry no rows, so the statements are counted
/// in the text.
pub(crate) async fn script<Q: Queryable>(conn: &mut Q, sql: &str) -> Script {
    let n = count_statements(sql);
    let mut done = Vec::with_capacity(n);
    let mut result = match conn.query_iter(sql).await {
        Ok(result) => result,
        Err(e) => {
            return Script {
                done,
                error: Some(e),
            };
        }
    };
    for _ in 0..n {
        let affected = result.affected_rows();
        let mut rows = Vec::new();
        let read = result.reduce((), |(), row: Row| rows.push(row)).await;
        if let Err(e) = read {
            // The server stops at a failing statement: nothing after it ran.
            return Script {
                done,
                error: Some(e),
            };
        }
        done.push(Done { affected, rows });
    }
    let error = result.drop_result().await.err();
    Script { done, error }
}

/// How many statements `sql` holds: `;`-separated pieces that are not empty, outside string
/// literals and `--` comments (idem's SQL has no other quoting). Reads bytes, not chars: the
/// delimiters are ASCII, which no byte of a multi-byte UTF-8 character equals, and a string
/// literal (a batch's hex-encoded records, most of a script) is skipped in one search.
pub(crate) fn count_statements(sql: &str) -> usize {
    // The end of what starts at `i` (just after an ASCII byte, so on a character boundary):
    // past the next `end`, or the end of `sql`. `str::find` of a char searches a word at a time.
    let skip_past = |i: usize, end: char| {
        sql.get(i..)
            .and_then(|rest| rest.find(end))
            .map_or(sql.len(), |p| i + p + 1)
    };
    let bytes = sql.as_bytes();
    let mut count = 0;
    let mut content = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        i += 1;
        match b {
            b'\'' => {
                content = true;
                i = skip_past(i, '\'');
            }
            b'-' if bytes.get(i) == Some(&b'-') => i = skip_past(i, '\n'),
            b';' => {
                count += usize::from(content);
                content = false;
            }
            // Non-ASCII bytes are content, as every non-ASCII character idem's SQL could hold
            // (in a literal or an identifier) is.
            b if !b.is_ascii_whitespace() => content = true,
            _ => {}
        }
    }
    count + usize::from(content)
}

/// Rolls back an open transaction on a store connection and disarms the reset that would
/// otherwise roll it back when the connection returns to the pool.
pub(crate) async fn rollback(conn: &mut Conn) {
    if conn.query_drop("ROLLBACK").await.is_ok() {
        conn.reset_connection(false);
    }
}

/// Columns read for a record after the key (see [`decode`]).
pub(crate) const RECORD_COLUMNS: &str = "state, fingerprint, token, owner, lease_until, attempts, \
                                         result, created_at, updated_at, expires_at";

fn corrupt(key: &Key, what: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(format!("record {key}: {what}"))
}

fn take<T: FromValue>(row: &mut Row, i: usize, key: &Key, column: &str) -> Result<T, StoreError> {
    match row.take_opt::<T, usize>(i) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(corrupt(
            key,
            format_args!("column {column} holds {:?}", e.0),
        )),
        None => Err(corrupt(key, format_args!("column {column} is missing"))),
    }
}

/// Decodes the [`RECORD_COLUMNS`] that start at column `at` of `row`.
pub(crate) fn decode(key: &Key, row: &mut Row, at: usize) -> Result<Record, StoreError> {
    let state: i64 = take(row, at, key, "state")?;
    let state = State::from_code(state)
        .ok_or_else(|| corrupt(key, format_args!("unknown state {state}")))?;
    let fp: Vec<u8> = take(row, at + 1, key, "fingerprint")?;
    let fingerprint = Fingerprint::from_slice(&fp).ok_or_else(|| {
        corrupt(
            key,
            format_args!("fingerprint of {} bytes, expected 16", fp.len()),
        )
    })?;
    let token: Option<i64> = take(row, at + 2, key, "token")?;
    let owner: Option<Vec<u8>> = take(row, at + 3, key, "owner")?;
    let lease_until: Option<i64> = take(row, at + 4, key, "lease_until")?;
    let attempts: i64 = take(row, at + 5, key, "attempts")?;
    let attempts =
        u32::try_from(attempts).map_err(|_| corrupt(key, format_args!("attempts {attempts}")))?;
    let result: Option<Vec<u8>> = take(row, at + 6, key, "result")?;
    let created_at: i64 = take(row, at + 7, key, "created_at")?;
    let updated_at: i64 = take(row, at + 8, key, "updated_at")?;
    let expires_at: i64 = take(row, at + 9, key, "expires_at")?;
    if state == State::InProgress && (token.is_none() || lease_until.is_none()) {
        return Err(corrupt(key, "in progress without a token or lease"));
    }
    Ok(Record::new(
        key.clone(),
        state,
        fingerprint,
        token.map(Token::from_i64),
        owner.map(|o| String::from_utf8_lossy(&o).into()),
        lease_until.map(Timestamp::from_millis),
        attempts,
        result.map(Bytes::from),
        Timestamp::from_millis(created_at),
        Timestamp::from_millis(updated_at),
        Timestamp::from_millis(expires_at),
    ))
}

/// The stored key of a row whose first two columns are `namespace, id`, as raw bytes.
pub(crate) fn raw_key(row: &Row) -> Option<(&[u8], &[u8])> {
    let bytes = |i: usize| match row.as_ref(i) {
        Some(mysql_async::Value::Bytes(b)) => Some(b.as_slice()),
        _ => None,
    };
    Some((bytes(0)?, bytes(1)?))
}

/// The key of a row whose first two columns are `namespace, id`, validated.
pub(crate) fn stored_key(row: &Row) -> Result<Key, StoreError> {
    let (ns, id) =
        raw_key(row).ok_or_else(|| StoreError::corrupt("a record has no namespace or id"))?;
    let (ns, id) = (String::from_utf8_lossy(ns), String::from_utf8_lossy(id));
    Namespace::new(&*ns)
        .and_then(|n| n.key(&*id))
        .map_err(|e| StoreError::corrupt(format!("stored key {ns}:{id} is invalid: {e}")))
}

/// The single integer of a `SELECT <integer>` answer.
pub(crate) fn scalar_i64(done: Option<&mut Done>, what: &str) -> Result<i64, StoreError> {
    done.and_then(|d| d.rows.first_mut())
        .and_then(|row| row.take_opt::<i64, usize>(0))
        .and_then(Result::ok)
        .ok_or_else(|| {
            StoreError::new(
                idem::StoreErrorKind::Backend,
                format!("no {what} in the answer"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::count_statements;

    #[test]
    fn statements_are_counted_outside_literals_and_comments() {
        assert_eq!(count_statements("SELECT 1"), 1);
        assert_eq!(count_statements("SET @a = 1; SELECT @a;"), 2);
        assert_eq!(count_statements("SELECT X'3b'; SELECT ';'"), 2);
        assert_eq!(
            count_statements("-- a; comment\nCREATE TABLE t (a INT); -- b;\n"),
            1
        );
        assert_eq!(count_statements("  ;  "), 0);
        assert_eq!(count_statements("SELECT 'é;ü'; SELECT 'ß'"), 2);
        assert_eq!(count_statements("SELECT 'unterminated; x"), 1);
        assert_eq!(count_statements("SELECT 1; -- trailing, no newline"), 1);
    }
}
