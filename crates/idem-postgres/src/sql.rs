//! Where the records live ([`Table`]) and the SQL of every transition, generated once per table.
//!
//! Each transition is one statement on the server's clock, `now()`: the start of the current
//! transaction. In store mode every statement is its own transaction, so `now()` is the moment
//! the statement started; in transactional mode it is the start of the transaction, so every
//! record of one transaction gets one timestamp (as SQLite's group commit does). Columns are
//! `timestamptz` (microseconds, readable by operators); idem reads them as milliseconds,
//! rounded down like [`idem::Timestamp`].
//!
//! Batches travel as arrays (`unnest ... WITH ORDINALITY`), one row per key; the statements
//! report for every key what happened, so the Rust side only decodes. Reads inside the
//! statements come from the statement's snapshot; when the snapshot and the row locked by the
//! write disagree (another session changed the key in between), the statement says so
//! (`RACE`) and the caller runs it again for those keys, with a fresh snapshot.

use std::sync::Arc;

use idem::{StoreError, StoreErrorKind};

/// The longest schema or table name accepted: derived names (the expiry index) must stay
/// under PostgreSQL's 63-byte identifier limit.
const MAX_IDENT: usize = 40;

/// The default schema.
pub const DEFAULT_SCHEMA: &str = "public";
/// The default table.
pub const DEFAULT_TABLE: &str = "idem_records";

/// Where idem's records live: a schema and a table, and the SQL for them.
///
/// Names are plain lower-case identifiers (`[a-z_][a-z0-9_]*`, at most 40 bytes), so they
/// never need escaping and never change meaning when quoted.
///
/// ```
/// let table = idem_postgres::Table::new("billing", "idem_records")?;
/// assert_eq!(table.qualified(), "\"billing\".\"idem_records\"");
/// # Ok::<(), idem::StoreError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Table {
    schema: String,
    name: String,
    qualified: String,
    sql: Arc<Statements>,
}

impl PartialEq for Table {
    fn eq(&self, other: &Self) -> bool {
        self.qualified == other.qualified
    }
}

impl Eq for Table {}

impl Default for Table {
    fn default() -> Self {
        Self::from_checked(DEFAULT_SCHEMA, DEFAULT_TABLE)
    }
}

impl Table {
    /// A table `name` in `schema`.
    ///
    /// # Errors
    /// [`StoreErrorKind::Config`] for a name that is not a plain lower-case identifier.
    pub fn new(schema: &str, name: &str) -> Result<Self, StoreError> {
        check_ident("schema", schema)?;
        check_ident("table", name)?;
        Ok(Self::from_checked(schema, name))
    }

    fn from_checked(schema: &str, name: &str) -> Self {
        let mut table = Self {
            schema: schema.to_owned(),
            name: name.to_owned(),
            qualified: format!("\"{schema}\".\"{name}\""),
            sql: Arc::default(),
        };
        table.sql = Arc::new(Statements::new(&table));
        table
    }

    /// The statements for this table.
    pub(crate) fn sql(&self) -> &Statements {
        &self.sql
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `"schema"."table"`, for SQL.
    pub fn qualified(&self) -> &str {
        &self.qualified
    }

    /// The expiry index's name (unqualified: indexes live in their table's schema).
    pub(crate) fn expiry_index(&self) -> String {
        format!("\"{}_expires_at_idx\"", self.name)
    }

    /// `sql` with `{table}`, `{schema}` and `{index}` filled in.
    pub(crate) fn render(&self, sql: &str) -> String {
        sql.replace("{table}", &self.qualified)
            .replace("{schema}", &format!("\"{}\"", self.schema))
            .replace("{index}", &self.expiry_index())
    }
}

fn check_ident(what: &str, s: &str) -> Result<(), StoreError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_IDENT
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::new(
            StoreErrorKind::Config,
            format!(
                "invalid {what} name {s:?}: use 1 to {MAX_IDENT} characters of a-z, 0-9 and _, \
                 not starting with a digit"
            ),
        ))
    }
}

/// What a claim statement says about one key (`kind` column).
pub(crate) mod claim_kind {
    /// The snapshot and the locked row disagreed: run again.
    pub(crate) const RACE: i16 = 0;
    /// No record: inserted, attempt 1.
    pub(crate) const INSERTED: i16 = 1;
    /// The record was rewritten: acquired (retry, takeover, reprocess) or exhausted.
    pub(crate) const UPDATED: i16 = 2;
    /// Nothing to write: in progress, completed, failed or mismatched, as read.
    pub(crate) const UNCHANGED: i16 = 3;
}

/// What a fenced write statement says about one key (`kind` column).
pub(crate) mod write_kind {
    /// See [`super::claim_kind::RACE`].
    pub(crate) const RACE: i16 = 0;
    /// Applied (now, or earlier by the same token where that counts).
    pub(crate) const APPLIED: i16 = 1;
    /// The token does not hold the record.
    pub(crate) const LEASE_LOST: i16 = 2;
}

/// A timestamp column as milliseconds since the epoch, rounded down like `idem::Timestamp`.
macro_rules! ms {
    ($e:literal) => {
        concat!("floor(extract(epoch FROM ", $e, ") * 1000)::int8")
    };
}

/// Claims, in order of `ord`. Parameters: namespaces, ids, fingerprints, tokens, owners, lease
/// ms, retention ms, max attempts (0: none), all arrays of one length without repeated keys.
///
/// Rows are inserted and locked in key order, whatever the order of the request: two batches
/// that share keys then wait for each other instead of deadlocking (a redelivered batch
/// overlapping one in flight is common).
///
/// New keys, the common case, are inserted first (`ins`) and cost one index probe. For the
/// rest, `snap` is the statement's snapshot; `old` locks the rows the transition rewrites and
/// re-reads them at their latest version (READ COMMITTED re-checks the condition), so the
/// rewrite is decided on the row it writes. A key that is in neither `ins` nor the snapshot
/// was inserted by another session meanwhile: `RACE`.
const CLAIM: &str = concat!(
    "WITH req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[], $5::text[],
                         $6::int8[], $7::int8[], $8::int8[])
        WITH ORDINALITY AS r(namespace, id, fingerprint, token, owner, lease_ms, retention_ms,
                             max_attempts, ord)
), ins AS (
    INSERT INTO {table} AS t (namespace, id, state, fingerprint, token, owner, lease_until,
                              attempts, result, created_at, updated_at, expires_at)
    SELECT req.namespace, req.id, {acq_state}, req.fingerprint, req.token, req.owner,
           {acq_lease}, 1, {acq_result}, now(), now(), {acq_expires}
    FROM req
    ORDER BY req.namespace, req.id
    ON CONFLICT (namespace, id) DO NOTHING
    RETURNING t.namespace, t.id
), rest AS (
    SELECT req.* FROM req
    WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.namespace = req.namespace AND ins.id = req.id)
), snap AS (
    SELECT req.ord, t.state, t.fingerprint, t.attempts, t.lease_until, t.result,
           {rewrite} AS rewrite
    FROM rest req JOIN {table} t ON t.namespace = req.namespace AND t.id = req.id
), old AS (
    SELECT req.ord, t.state, t.expires_at <= now() AS expired
    FROM rest req JOIN {table} t ON t.namespace = req.namespace AND t.id = req.id
    WHERE {rewrite}
    ORDER BY t.namespace, t.id
    FOR UPDATE OF t
), upd AS (
    UPDATE {table} t SET
        state = CASE WHEN {exhaust} THEN 4 ELSE {acq_state} END,
        fingerprint = req.fingerprint,
        token = CASE WHEN {exhaust} THEN t.token ELSE req.token END,
        owner = CASE WHEN {exhaust} THEN NULL ELSE req.owner END,
        lease_until = CASE WHEN {exhaust} THEN NULL ELSE {acq_lease} END,
        attempts = CASE WHEN old.expired THEN 1 WHEN {exhaust} THEN t.attempts
                   ELSE t.attempts + 1 END,
        result = CASE WHEN {exhaust} THEN convert_to('attempts exhausted: ' || t.attempts
                      || ' of at most ' || req.max_attempts || ', the last one never completed',
                      'UTF8') ELSE {acq_result} END,
        created_at = CASE WHEN old.expired THEN now() ELSE t.created_at END,
        updated_at = now(),
        expires_at = CASE WHEN {exhaust} THEN now() + req.retention_ms * interval '1 millisecond'
                     ELSE {acq_expires} END
    FROM old JOIN rest req ON req.ord = old.ord
    WHERE t.namespace = req.namespace AND t.id = req.id
    RETURNING req.ord, old.state AS prev_state, old.expired AS prev_expired, t.state,
              t.fingerprint, t.attempts, t.result
)
SELECT req.ord,
       (CASE WHEN i.id IS NOT NULL THEN 1 WHEN u.ord IS NOT NULL THEN 2
             WHEN s.ord IS NOT NULL AND NOT s.rewrite THEN 3 ELSE 0 END)::int2 AS kind,
       u.prev_state, u.prev_expired,
       COALESCE(u.state, s.state) AS state,
       COALESCE(u.fingerprint, s.fingerprint) AS fingerprint,
       COALESCE(u.attempts, s.attempts) AS attempts, ",
    ms!("CASE WHEN i.id IS NOT NULL OR u.ord IS NOT NULL
                THEN now() + req.lease_ms * interval '1 millisecond' ELSE s.lease_until END"),
    " AS lease_until,
       COALESCE(u.result, s.result) AS result, ",
    ms!("now()"),
    " AS now
FROM req
LEFT JOIN ins i ON i.namespace = req.namespace AND i.id = req.id
LEFT JOIN upd u ON u.ord = req.ord
LEFT JOIN snap s ON s.ord = req.ord
ORDER BY req.ord"
);

/// Transactional mode's first try: insert every key as completed (see `ACQUIRE_COMPLETED`),
/// with the claim's parameters; returns the id and token of each key inserted, and the clock.
/// Keys that were not inserted (they exist) go through `claim_completed`. A batch of new keys,
/// the common case, thus costs one plain multi-row insert.
const INSERT_COMPLETED: &str = concat!(
    "INSERT INTO {table} AS t (namespace, id, state, fingerprint, token, owner, lease_until,
                          attempts, result, created_at, updated_at, expires_at)
SELECT r.namespace, r.id, 2, r.fingerprint, r.token, r.owner, NULL, 1, '\\x'::bytea, now(),
       now(), now() + r.retention_ms * interval '1 millisecond'
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[], $5::text[], $6::int8[],
            $7::int8[], $8::int8[])
    AS r(namespace, id, fingerprint, token, owner, lease_ms, retention_ms, max_attempts)
ORDER BY r.namespace, r.id
ON CONFLICT (namespace, id) DO NOTHING
RETURNING t.id, t.token, ",
    ms!("now()")
);

/// What an acquiring claim writes (state, lease, result, expiry), in store mode: an in-progress
/// record holding a lease, which expires `retention` after the lease.
const ACQUIRE_IN_PROGRESS: [(&str, &str); 4] = [
    ("{acq_state}", "1"),
    (
        "{acq_lease}",
        "now() + req.lease_ms * interval '1 millisecond'",
    ),
    ("{acq_result}", "NULL::bytea"),
    (
        "{acq_expires}",
        "now() + (req.lease_ms + req.retention_ms) * interval '1 millisecond'",
    ),
];

/// What an acquiring claim writes in transactional mode: the completed record with an empty
/// result, as the transaction will commit it if the handler succeeds. It is written before the
/// handler runs, inside a savepoint that is rolled back if the handler fails, so no second
/// write of the row is needed on success (a non-empty result is set with `set_result_many`).
/// No session sees it before the commit.
const ACQUIRE_COMPLETED: [(&str, &str); 4] = [
    ("{acq_state}", "2"),
    ("{acq_lease}", "NULL::timestamptz"),
    ("{acq_result}", "'\\x'::bytea"),
    (
        "{acq_expires}",
        "now() + req.retention_ms * interval '1 millisecond'",
    ),
];

/// Whether a claim rewrites the record `t` for request `req`: it has expired, or (same
/// payload) it was released or its lease has ended. Everything else is answered as read.
const REWRITE: &str = "(t.expires_at <= now() OR (t.fingerprint = req.fingerprint AND \
     (t.state = 3 OR (t.state = 1 AND (t.lease_until IS NULL OR t.lease_until <= now())))))";

/// Whether a rewriting claim fails the record instead: it would start attempt `max + 1`.
const EXHAUST: &str =
    "(NOT old.expired AND req.max_attempts > 0 AND t.attempts >= req.max_attempts)";

/// Completions, in order of `ord`. Parameters: namespaces, ids, tokens, results, retention ms.
/// A record completed by the same token counts as applied (a retried completion). With
/// `{from}` = 2 it sets the result of records claimed as completed in transactional mode.
const COMPLETE_MANY: &str = "WITH req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::bytea[], $5::int8[])
        WITH ORDINALITY AS r(namespace, id, token, result, retention_ms, ord)
), upd AS (
    UPDATE {table} t SET state = 2, lease_until = NULL, result = req.result, updated_at = now(),
        expires_at = now() + req.retention_ms * interval '1 millisecond'
    FROM req
    WHERE t.namespace = req.namespace AND t.id = req.id AND t.state = {from}
      AND t.token = req.token
    RETURNING req.ord
)
SELECT (CASE WHEN u.ord IS NOT NULL THEN 1
             WHEN {from} = 1 AND s.state = 2 AND s.token = req.token THEN 1
             WHEN s.state = 1 AND s.token = req.token THEN 0
             ELSE 2 END)::int2 AS kind
FROM req
LEFT JOIN upd u ON u.ord = req.ord
LEFT JOIN {table} s ON s.namespace = req.namespace AND s.id = req.id
ORDER BY req.ord";

/// A fenced write of one key: `{set}` is the transition, `{again}` the state in which a
/// repeated write by the same token counts as applied (or `0`: none). Parameters: namespace,
/// id, token, `$4` bytes (the result or the failure reason; unused by release and extend) and
/// `$5` milliseconds (the retention, or the lease for extend).
const FENCED: &str = "WITH upd AS (
    UPDATE {table} t SET {set}
    WHERE t.namespace = $1::text AND t.id = $2::text AND t.state = 1 AND t.token = $3::int8
    RETURNING 1
)
SELECT (CASE WHEN EXISTS (SELECT 1 FROM upd) THEN 1
             WHEN s.state = {again} AND s.token = $3 THEN 1
             WHEN s.state = 1 AND s.token = $3 THEN 0
             ELSE 2 END)::int2 AS kind
FROM (SELECT 1) one LEFT JOIN {table} s ON s.namespace = $1 AND s.id = $2";

/// The columns of a record, in the order `decode` reads them.
macro_rules! record_columns {
    () => {
        concat!(
            "state, fingerprint, token, owner, ",
            ms!("lease_until"),
            ", attempts, result, ",
            ms!("created_at"),
            ", ",
            ms!("updated_at"),
            ", ",
            ms!("expires_at")
        )
    };
}

/// Every statement for one table.
#[derive(Debug, Default)]
pub(crate) struct Statements {
    pub(crate) claim: String,
    /// The claim of transactional mode: acquired keys are written completed (see
    /// `ACQUIRE_COMPLETED`).
    pub(crate) claim_completed: String,
    /// Transactional mode's first try for new keys (see `INSERT_COMPLETED`).
    pub(crate) insert_completed: String,
    pub(crate) complete_many: String,
    /// Sets the result of keys claimed by `claim_completed`.
    pub(crate) set_result_many: String,
    pub(crate) complete: String,
    pub(crate) release: String,
    pub(crate) extend: String,
    pub(crate) fail: String,
    pub(crate) get: String,
    pub(crate) evict: String,
    pub(crate) purge: String,
    pub(crate) count_by_state: String,
    pub(crate) in_progress: String,
    pub(crate) now: &'static str,
}

impl Statements {
    pub(crate) fn new(table: &Table) -> Self {
        let claim = |acquire: &[(&str, &str)]| {
            let sql = CLAIM
                .replace("{rewrite}", REWRITE)
                .replace("{exhaust}", EXHAUST);
            table.render(&acquire.iter().fold(sql, |sql, (k, v)| sql.replace(k, v)))
        };
        let fenced = |set: &str, again: &str| {
            table.render(&FENCED.replace("{set}", set).replace("{again}", again))
        };
        Self {
            claim: claim(&ACQUIRE_IN_PROGRESS),
            claim_completed: claim(&ACQUIRE_COMPLETED),
            insert_completed: table.render(INSERT_COMPLETED),
            complete_many: table.render(&COMPLETE_MANY.replace("{from}", "1")),
            set_result_many: table.render(&COMPLETE_MANY.replace("{from}", "2")),
            complete: fenced(
                "state = 2, lease_until = NULL, result = $4::bytea, updated_at = now(), \
                 expires_at = now() + $5::int8 * interval '1 millisecond'",
                "2",
            ),
            release: fenced(
                "state = 3, token = NULL, owner = NULL, lease_until = NULL, updated_at = now(), \
                 expires_at = now() + $5::int8 * interval '1 millisecond'",
                "0",
            ),
            // Keeps the retention an abandoned claim gets after its lease (never negative).
            extend: fenced(
                "lease_until = now() + $5::int8 * interval '1 millisecond', updated_at = now(), \
                 expires_at = now() + $5::int8 * interval '1 millisecond' + \
                 GREATEST(t.expires_at - COALESCE(t.lease_until, now()), interval '0')",
                "0",
            ),
            fail: fenced(
                "state = 4, lease_until = NULL, owner = NULL, result = $4::bytea, updated_at = now(), \
                 expires_at = now() + $5::int8 * interval '1 millisecond'",
                "4",
            ),
            get: table.render(concat!(
                "SELECT ",
                record_columns!(),
                " FROM {table} WHERE namespace = $1 AND id = $2"
            )),
            evict: table.render("DELETE FROM {table} WHERE namespace = $1 AND id = $2"),
            // The oldest expired rows through the expiry index; rows locked by a running
            // transition are skipped (they are being rewritten), and the outer condition is
            // checked again on the row deleted, so a row reprocessed meanwhile stays.
            purge: table.render(
                "DELETE FROM {table} WHERE (namespace, id) IN (
                    SELECT namespace, id FROM {table} WHERE expires_at <= now()
                    ORDER BY expires_at LIMIT $1::int8 FOR UPDATE SKIP LOCKED)
                 AND expires_at <= now()",
            ),
            count_by_state: table
                .render("SELECT state, count(*)::int8 FROM {table} GROUP BY state ORDER BY state"),
            in_progress: table.render(concat!(
                "SELECT namespace, id, ",
                record_columns!(),
                " FROM {table} WHERE state = 1 ORDER BY lease_until, updated_at LIMIT $1::int8"
            )),
            now: concat!("SELECT ", ms!("now()")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_identifiers() {
        assert!(Table::new("app", "idem_records").is_ok());
        assert!(Table::new("_x1", "t").is_ok());
        for bad in ["", "Upper", "1abc", "a-b", "a\"b", &"x".repeat(41)] {
            let err = Table::new(bad, "t").expect_err(bad);
            assert_eq!(err.kind(), StoreErrorKind::Config);
            assert!(Table::new("s", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statements_name_the_table_everywhere() {
        let t = Table::new("s1", "recs").expect("table");
        let st = Statements::new(&t);
        for sql in [&st.claim, &st.complete, &st.extend, &st.purge, &st.get] {
            assert!(sql.contains("\"s1\".\"recs\""), "{sql}");
            assert!(!sql.contains('{'), "unfilled placeholder in {sql}");
        }
    }
}
