//! The store operations as SQL scripts on one pooled connection.
//!
//! Claims decide in Rust with [`idem::transition`], so the table of the contract lives in one
//! place; the server supplies the clock and the locks:
//!
//! 1. **Optimistic round trip** (autocommit): read the clock, `INSERT IGNORE` fresh in-progress
//!    records for all keys (absent keys are inserted, existing ones left alone), and only if
//!    some key existed, read the rows. New keys, the common case, end here: one round trip, one
//!    commit, no read. The rows answer every claim that changes nothing: a duplicate of a
//!    completed key, a live lease, a mismatch, a failed key.
//! 2. **Locked round trips**: otherwise `START TRANSACTION`, read the rows `FOR UPDATE`, apply
//!    the transitions in order, write the changed rows (a plain `INSERT` for keys that were
//!    absent, so that a concurrent claimer's insert shows up as 1062 instead of being
//!    overwritten), `COMMIT`. A lost race (1062) or a deadlock (1213) rolls everything back and
//!    the batch is tried again.
//!
//! Fenced writes (complete, release, extend, fail) are one `UPDATE … WHERE state = 1 AND token
//! = ?` each; the store's connections set `CLIENT_FOUND_ROWS`, so "affected" means "matched by
//! the fence" even when an extend changes nothing. When the fence does not match, a read tells
//! a repeated complete (or fail) by the same token, which is applied, from a lost lease.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use idem::transition;
use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Key, Lease, Record, State, StoreError,
    StoreErrorKind, Timestamp, Token, WriteOutcome,
};
use mysql_async::Conn;

use crate::error::{code, server_code, store_error};
use crate::exec::{self, Done, RECORD_COLUMNS, decode, raw_key, script};
use crate::sql::{
    self, COLUMNS, NOW_MS, NOW_VAR, SCRIPT_BUDGET, Table, clamp, hex, key_eq, keys_in, millis,
};

/// How often a claim batch is tried again after losing a race or a deadlock.
const MAX_ATTEMPTS: u32 = 8;

/// The store's table and what every operation needs to report errors.
pub(crate) struct Ctx<'a> {
    pub(crate) table: &'a Table,
}

impl Ctx<'_> {
    fn err(&self, context: &str, e: mysql_async::Error) -> StoreError {
        store_error(context, self.table.name(), e)
    }

    async fn run(
        &self,
        conn: &mut Conn,
        context: &str,
        sql: &str,
    ) -> Result<Vec<Done>, StoreError> {
        script(conn, sql)
            .await
            .ok()
            .map_err(|e| self.err(context, e))
    }
}

/// One key's record during a batch: as read, then as the transitions leave it.
pub(crate) struct Slot {
    /// The record, `None` for an absent key.
    pub(crate) rec: Option<Record>,
    /// Whether the key had a row when it was read.
    existed: bool,
    /// Whether the record changed since.
    dirty: bool,
}

/// The distinct keys of a batch, and which slot each request uses.
pub(crate) struct Keys<'r> {
    /// Each key once, in order of first appearance.
    pub(crate) distinct: Vec<&'r Key>,
    /// For each request, the index of its key in `distinct`.
    pub(crate) slot_of: Vec<usize>,
}

impl<'r> Keys<'r> {
    pub(crate) fn of(keys: impl Iterator<Item = &'r Key>) -> Self {
        let mut index: HashMap<&Key, usize> = HashMap::new();
        let mut distinct = Vec::new();
        let slot_of = keys
            .map(|k| {
                *index.entry(k).or_insert_with(|| {
                    distinct.push(k);
                    distinct.len() - 1
                })
            })
            .collect();
        Self { distinct, slot_of }
    }

    /// Slots filled from the rows of `SELECT namespace, id, <record columns>`.
    pub(crate) fn slots(&self, rows: Vec<mysql_async::Row>) -> Result<Vec<Slot>, StoreError> {
        let lookup: HashMap<(&[u8], &[u8]), usize> = self
            .distinct
            .iter()
            .enumerate()
            .map(|(i, k)| ((k.namespace().as_str().as_bytes(), k.id().as_bytes()), i))
            .collect();
        let mut slots: Vec<Slot> = (0..self.distinct.len())
            .map(|_| Slot {
                rec: None,
                existed: false,
                dirty: false,
            })
            .collect();
        for mut row in rows {
            let i = raw_key(&row)
                .and_then(|k| lookup.get(&k).copied())
                .ok_or_else(|| StoreError::corrupt("the server returned a row for another key"))?;
            let rec = decode(self.distinct[i], &mut row, 2)?;
            slots[i] = Slot {
                rec: Some(rec),
                existed: true,
                dirty: false,
            };
        }
        Ok(slots)
    }
}

/// Appends a `SELECT` of the keys' rows. `FORCE INDEX`: on a small table the optimizer may
/// prefer a full scan to many primary-key lookups, and a locking full scan waits for (and
/// deadlocks with) rows that other transactions hold.
pub(crate) fn select_rows(out: &mut String, table: &Table, keys: &[&Key], lock: bool) {
    let _ = write!(
        out,
        "SELECT namespace, id, {RECORD_COLUMNS} FROM {} FORCE INDEX (PRIMARY) WHERE ",
        table.q()
    );
    keys_in(out, keys.iter().copied());
    if lock {
        out.push_str(" FOR UPDATE");
    }
}

/// As [`select_rows`], reading only if `condition` (constant for the statement) holds.
fn select_rows_if(out: &mut String, table: &Table, keys: &[&Key], condition: &str, lock: bool) {
    let _ = write!(
        out,
        "SELECT namespace, id, {RECORD_COLUMNS} FROM {} FORCE INDEX (PRIMARY) WHERE {condition} \
         AND ",
        table.q()
    );
    keys_in(out, keys.iter().copied());
    if lock {
        out.push_str(" FOR UPDATE");
    }
}

/// Clamps a request's durations (see [`sql::clamp`]) so Rust and SQL compute the same times.
fn clamped(req: &ClaimRequest) -> ClaimRequest {
    req.clone()
        .lease(clamp(req.lease))
        .retention(clamp(req.retention))
}

/// Claims keys in order, as if one claim after another. See the module docs.
pub(crate) async fn claim_many(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    reqs: &[ClaimRequest],
) -> Result<Vec<Claim>, StoreError> {
    let reqs: Vec<ClaimRequest> = reqs.iter().map(clamped).collect();
    let mut answers = claim_optimistic(ctx, conn, &reqs).await?;
    let rest: Vec<usize> = (0..reqs.len()).filter(|&i| answers[i].is_none()).collect();
    if !rest.is_empty() {
        let sub: Vec<ClaimRequest> = rest.iter().map(|&i| reqs[i].clone()).collect();
        let claims = claim_locked_retrying(ctx, conn, &sub).await?;
        for (i, claim) in rest.into_iter().zip(claims) {
            answers[i] = Some(claim);
        }
    }
    answers
        .into_iter()
        .map(|a| a.ok_or_else(|| StoreError::new(StoreErrorKind::Backend, "claim left unanswered")))
        .collect()
}

async fn claim_locked_retrying(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    reqs: &[ClaimRequest],
) -> Result<Vec<Claim>, StoreError> {
    let keys = Keys::of(reqs.iter().map(|r| &r.key));
    let mut attempt = 0;
    loop {
        attempt += 1;
        match claim_locked(ctx, conn, reqs, &keys).await {
            Ok(claims) => return Ok(claims),
            Err(Retry::Race(e)) if attempt < MAX_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "claim lost a race; trying again");
                tokio::time::sleep(Duration::from_millis(
                    fastrand::u64(1..=5) << attempt.min(5),
                ))
                .await;
            }
            Err(Retry::Race(e)) => {
                return Err(StoreError::new(
                    StoreErrorKind::Busy,
                    format!(
                        "mysql claim: lost {MAX_ATTEMPTS} races in a row with concurrent claims \
                         of the same keys"
                    ),
                )
                .with_source(e));
            }
            Err(Retry::Fatal(e)) => return Err(e),
        }
    }
}

/// The optimistic round trip (autocommit): `INSERT IGNORE` a fresh in-progress record for
/// every request, which inserts the absent keys (the first request of each) and leaves the
/// others alone; then, only if some row was not inserted, read the keys' rows. Returns the
/// answer of every request that needs no further write; `None` for those the locked path must
/// decide (and for every later request of their keys).
///
/// `INSERT IGNORE` turns errors other than duplicates into warnings too; none can happen with
/// these values (every length and number is checked or bounded before it reaches SQL).
async fn claim_optimistic(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    reqs: &[ClaimRequest],
) -> Result<Vec<Option<Claim>>, StoreError> {
    let keys = Keys::of(reqs.iter().map(|r| &r.key));
    let n = reqs.len();
    let mut sql = format!(
        "SET {NOW_VAR} = {NOW_MS}; SELECT {NOW_VAR}; INSERT IGNORE INTO {} ({COLUMNS}) VALUES ",
        ctx.table.q()
    );
    for (i, req) in sql::key_order(reqs, |r| &r.key).into_iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql::new_claim_values(&mut sql, req);
    }
    // When every row was inserted, the server sees an impossible WHERE and reads nothing.
    sql.push_str("; ");
    select_rows_if(
        &mut sql,
        ctx.table,
        &keys.distinct,
        &format!("ROW_COUNT() < {n}"),
        false,
    );
    let mut done = ctx.run(conn, "claim", &sql).await?;
    let now = Timestamp::from_millis(exec::scalar_i64(done.get_mut(1), "clock")?);
    if done.get(2).is_some_and(|d| d.affected == n as u64) {
        return Ok(reqs
            .iter()
            .map(|r| {
                let until = Timestamp::from_millis(now.as_millis() + millis(r.lease));
                Some(Claim::Acquired(Lease::new(
                    r.token,
                    1,
                    until,
                    Acquisition::New,
                )))
            })
            .collect());
    }
    let rows = done
        .get_mut(3)
        .map(|d| std::mem::take(&mut d.rows))
        .unwrap_or_default();
    let mut slots = keys.slots(rows)?;
    let mut seen = vec![false; slots.len()];
    let mut deferred = vec![false; slots.len()];
    let mut answers = Vec::with_capacity(n);
    for (req, &s) in reqs.iter().zip(&keys.slot_of) {
        let first = !std::mem::replace(&mut seen[s], true);
        if deferred[s] {
            answers.push(None);
            continue;
        }
        let slot = &mut slots[s].rec;
        // The row this request's INSERT created: its token, written at this `now`.
        let ours = slot.as_ref().and_then(|r| {
            let fresh = r.token == Some(req.token)
                && r.created_at == now
                && r.state == State::InProgress
                && r.attempts == 1;
            (first && fresh).then_some(r.lease_until).flatten()
        });
        if let Some(until) = ours {
            answers.push(Some(Claim::Acquired(Lease::new(
                req.token,
                1,
                until,
                Acquisition::New,
            ))));
            continue;
        }
        let (claim, change) = transition::claim(slot, req, now);
        if change.is_write() {
            deferred[s] = true;
            answers.push(None);
        } else {
            answers.push(Some(claim));
        }
    }
    Ok(answers)
}

/// Why a locked attempt failed.
enum Retry {
    /// Lost a race (1062) or a deadlock (1213): everything was rolled back; try again.
    Race(mysql_async::Error),
    /// Anything else.
    Fatal(StoreError),
}

/// The locked round trips of a claim batch.
async fn claim_locked(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    reqs: &[ClaimRequest],
    keys: &Keys<'_>,
) -> Result<Vec<Claim>, Retry> {
    let fail = |e: mysql_async::Error| match server_code(&e) {
        Some(code::DUP_ENTRY | code::DEADLOCK) => Retry::Race(e),
        _ => Retry::Fatal(ctx.err("claim", e)),
    };
    let mut sql = format!("START TRANSACTION; SET {NOW_VAR} = {NOW_MS}; SELECT {NOW_VAR}; ");
    select_rows(&mut sql, ctx.table, &keys.distinct, true);
    // Armed while a transaction may be open: if this future is dropped mid-way, the pool
    // resets the connection, which rolls the transaction back.
    conn.reset_connection(true);
    let mut done = match script(conn, &sql).await.ok() {
        Ok(done) => done,
        Err(e) => {
            exec::rollback(conn).await;
            return Err(fail(e));
        }
    };
    let decided = (|| {
        let now = Timestamp::from_millis(exec::scalar_i64(done.get_mut(2), "clock")?);
        let rows = done
            .get_mut(3)
            .map(|d| std::mem::take(&mut d.rows))
            .unwrap_or_default();
        let mut slots = keys.slots(rows)?;
        let mut claims = Vec::with_capacity(reqs.len());
        for (req, &s) in reqs.iter().zip(&keys.slot_of) {
            let (claim, change) = transition::claim(&mut slots[s].rec, req, now);
            slots[s].dirty |= change.is_write();
            claims.push(claim);
        }
        Ok::<_, StoreError>((claims, slots))
    })();
    let (claims, slots) = match decided {
        Ok(d) => d,
        Err(e) => {
            exec::rollback(conn).await;
            return Err(Retry::Fatal(e));
        }
    };
    let mut sql = String::new();
    let mut first = true;
    let absent: Vec<&Record> = slots
        .iter()
        .filter(|s| s.dirty && !s.existed)
        .filter_map(|s| s.rec.as_ref())
        .collect();
    for rec in sql::key_order(&absent, |r| &r.key) {
        if first {
            let _ = write!(sql, "INSERT INTO {} ({COLUMNS}) VALUES ", ctx.table.q());
            first = false;
        } else {
            sql.push_str(", ");
        }
        sql::values(&mut sql, rec);
    }
    if !first {
        sql.push_str("; ");
    }
    // Rows that existed are locked by this transaction: the upsert always updates them.
    let existing = slots
        .iter()
        .filter(|s| s.dirty && s.existed)
        .filter_map(|s| s.rec.as_ref());
    for upsert in sql::upserts(ctx.table, existing) {
        sql.push_str(&upsert);
        sql.push_str("; ");
    }
    sql.push_str("COMMIT");
    if let Err(e) = script(conn, &sql).await.ok() {
        exec::rollback(conn).await;
        return Err(fail(e));
    }
    conn.reset_connection(false);
    Ok(claims)
}

/// Appends the fenced `UPDATE` of a completion.
fn complete_sql(out: &mut String, table: &Table, c: &Completion) {
    let _ = write!(
        out,
        "UPDATE {} SET state = 2, lease_until = NULL, result = ",
        table.q()
    );
    hex(out, &c.result);
    let _ = write!(
        out,
        ", updated_at = {NOW_MS}, expires_at = {NOW_MS} + {} WHERE ",
        millis(c.retention)
    );
    key_eq(out, &c.key);
    let _ = write!(out, " AND state = 1 AND token = {}", c.token.as_i64());
}

/// Appends one fenced `UPDATE` for many completions: each row matches only with its own
/// token, and `CASE token` gives it its own result and retention (the first completion of a
/// token wins, as when they run one after another).
fn complete_many_sql(out: &mut String, table: &Table, cs: &[Completion]) {
    let same =
        |f: &dyn Fn(&Completion, &Completion) -> bool| cs.windows(2).all(|w| f(&w[0], &w[1]));
    let _ = write!(
        out,
        "UPDATE {} FORCE INDEX (PRIMARY) SET state = 2, lease_until = NULL, result = ",
        table.q()
    );
    if same(&|a, b| a.result == b.result) {
        hex(out, &cs[0].result);
    } else {
        out.push_str("CASE token");
        for c in cs {
            let _ = write!(out, " WHEN {} THEN ", c.token.as_i64());
            hex(out, &c.result);
        }
        out.push_str(" END");
    }
    let _ = write!(out, ", updated_at = {NOW_MS}, expires_at = {NOW_MS} + ");
    if same(&|a, b| a.retention == b.retention) {
        let _ = write!(out, "{}", millis(cs[0].retention));
    } else {
        out.push_str("CASE token");
        for c in cs {
            let _ = write!(
                out,
                " WHEN {} THEN {}",
                c.token.as_i64(),
                millis(c.retention)
            );
        }
        out.push_str(" END");
    }
    out.push_str(" WHERE ");
    for (i, c) in cs.iter().enumerate() {
        out.push_str(if i == 0 { "(" } else { " OR (" });
        key_eq(out, &c.key);
        let _ = write!(out, " AND state = 1 AND token = {})", c.token.as_i64());
    }
}

/// Whether the record is completed by `token`: the state a completion leaves, and in which a
/// repeated completion by the same token is applied.
fn completed_by(rec: Option<&Record>, token: Token) -> WriteOutcome {
    let done = rec.is_some_and(|r| r.state == State::Completed && r.token == Some(token));
    outcome(done)
}

/// Completes claims in order, as if one after another.
///
/// One completion is one fenced `UPDATE` (and a read when the fence refuses it). A batch is
/// one round trip and one commit per [`SCRIPT_BUDGET`] of results: `START TRANSACTION`, one
/// fenced `UPDATE` for all of them, a locking read of their rows only if the update matched
/// fewer rows than there are completions, `COMMIT`. All matched: all applied. Otherwise each
/// outcome follows from the row as the update left it (nobody else can change a row between
/// the two, the update or the read holds its lock): completed by the completion's token means
/// applied, now or by an earlier try; anything else means the lease was lost.
pub(crate) async fn complete_many(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    cs: &[Completion],
) -> Result<Vec<WriteOutcome>, StoreError> {
    if let [c] = cs {
        let mut sql = String::new();
        complete_sql(&mut sql, ctx.table, c);
        let done = ctx.run(conn, "complete", &sql).await?;
        if done.first().is_some_and(|d| d.affected > 0) {
            return Ok(vec![WriteOutcome::Applied]);
        }
        let states = current_states(ctx, conn, &[&c.key]).await?;
        let same = states.get(&c.key) == Some(&(State::Completed, Some(c.token)));
        return Ok(vec![outcome(same)]);
    }
    let mut out = Vec::with_capacity(cs.len());
    let mut start = 0;
    while start < cs.len() {
        let mut end = start + 1;
        let mut size = 2 * cs[start].result.len();
        while end < cs.len() && size + 2 * cs[end].result.len() < SCRIPT_BUDGET {
            size += 2 * cs[end].result.len();
            end += 1;
        }
        let chunk = &cs[start..end];
        let keys = Keys::of(chunk.iter().map(|c| &c.key));
        let mut sql = String::from("START TRANSACTION; ");
        complete_many_sql(&mut sql, ctx.table, chunk);
        sql.push_str("; ");
        // Read only when some completion did not match (the server sees an impossible WHERE
        // otherwise).
        let n = chunk.len();
        let guard = format!("ROW_COUNT() < {n}");
        select_rows_if(&mut sql, ctx.table, &keys.distinct, &guard, true);
        sql.push_str("; COMMIT");
        let mut done = in_transaction(ctx, conn, "complete", &sql).await?;
        if done.get(1).is_some_and(|d| d.affected == n as u64) {
            out.extend(std::iter::repeat_n(WriteOutcome::Applied, n));
            start = end;
            continue;
        }
        let rows = done
            .get_mut(2)
            .map(|d| std::mem::take(&mut d.rows))
            .unwrap_or_default();
        let slots = keys.slots(rows)?;
        out.extend(
            chunk
                .iter()
                .zip(&keys.slot_of)
                .map(|(c, &s)| completed_by(slots[s].rec.as_ref(), c.token)),
        );
        start = end;
    }
    Ok(out)
}

/// Runs a script that opens and commits a transaction, tried again after a deadlock (which
/// rolled everything back).
async fn in_transaction(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    context: &str,
    sql: &str,
) -> Result<Vec<Done>, StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        conn.reset_connection(true);
        match script(conn, sql).await.ok() {
            Ok(done) => {
                conn.reset_connection(false);
                return Ok(done);
            }
            Err(e) => {
                exec::rollback(conn).await;
                if server_code(&e) != Some(code::DEADLOCK) || attempt >= MAX_ATTEMPTS {
                    return Err(ctx.err(context, e));
                }
            }
        }
    }
}

/// The state and token of each key's record (absent keys are missing from the map).
async fn current_states<'k>(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    keys: &[&'k Key],
) -> Result<HashMap<&'k Key, (State, Option<Token>)>, StoreError> {
    let keys = Keys::of(keys.iter().copied());
    let mut sql = String::new();
    select_rows(&mut sql, ctx.table, &keys.distinct, false);
    let mut done = ctx.run(conn, "read", &sql).await?;
    let rows = done
        .first_mut()
        .map(|d| std::mem::take(&mut d.rows))
        .unwrap_or_default();
    let slots = keys.slots(rows)?;
    Ok(keys
        .distinct
        .iter()
        .zip(slots)
        .filter_map(|(k, s)| s.rec.map(|r| (*k, (r.state, r.token))))
        .collect())
}

/// A fenced `UPDATE` that sets `set` on the record held by `token`; whether it matched.
async fn fenced(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    context: &str,
    key: &Key,
    token: Token,
    set: &str,
) -> Result<bool, StoreError> {
    let mut sql = format!("UPDATE {} SET {set} WHERE ", ctx.table.q());
    key_eq(&mut sql, key);
    let _ = write!(sql, " AND state = 1 AND token = {}", token.as_i64());
    let done = ctx.run(conn, context, &sql).await?;
    Ok(done.first().is_some_and(|d| d.affected > 0))
}

fn outcome(matched: bool) -> WriteOutcome {
    if matched {
        WriteOutcome::Applied
    } else {
        WriteOutcome::LeaseLost
    }
}

pub(crate) async fn release(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    key: &Key,
    token: Token,
    retention: Duration,
) -> Result<WriteOutcome, StoreError> {
    let set = format!(
        "state = 3, token = NULL, owner = NULL, lease_until = NULL, updated_at = {NOW_MS}, \
         expires_at = {NOW_MS} + {}",
        millis(retention)
    );
    fenced(ctx, conn, "release", key, token, &set)
        .await
        .map(outcome)
}

pub(crate) async fn extend(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    key: &Key,
    token: Token,
    lease: Duration,
) -> Result<WriteOutcome, StoreError> {
    // expires_at first: it keeps the old gap between lease end and expiry, and MySQL assigns
    // left to right (MariaDB too, unless SIMULTANEOUS_ASSIGNMENT is set: then all read the old
    // values, which gives the same result in this order).
    let lease = millis(lease);
    let set = format!(
        "expires_at = {NOW_MS} + {lease} + GREATEST(expires_at - COALESCE(lease_until, {NOW_MS}), 0), \
         lease_until = {NOW_MS} + {lease}, updated_at = {NOW_MS}"
    );
    fenced(ctx, conn, "extend", key, token, &set)
        .await
        .map(outcome)
}

pub(crate) async fn fail(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    key: &Key,
    token: Token,
    reason: &str,
    retention: Duration,
) -> Result<WriteOutcome, StoreError> {
    let mut set = String::from("state = 4, lease_until = NULL, owner = NULL, result = ");
    hex(&mut set, reason.as_bytes());
    let _ = write!(
        set,
        ", updated_at = {NOW_MS}, expires_at = {NOW_MS} + {}",
        millis(retention)
    );
    if fenced(ctx, conn, "fail", key, token, &set).await? {
        return Ok(WriteOutcome::Applied);
    }
    let states = current_states(ctx, conn, &[key]).await?;
    Ok(outcome(
        states.get(key) == Some(&(State::Failed, Some(token))),
    ))
}

pub(crate) async fn get(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    key: &Key,
) -> Result<Option<Record>, StoreError> {
    let mut sql = String::new();
    select_rows(&mut sql, ctx.table, &[key], false);
    let mut done = ctx.run(conn, "get", &sql).await?;
    let rows = done
        .first_mut()
        .map(|d| std::mem::take(&mut d.rows))
        .unwrap_or_default();
    let keys = Keys::of(std::iter::once(key));
    Ok(keys.slots(rows)?.pop().and_then(|s| s.rec))
}

pub(crate) async fn evict(ctx: &Ctx<'_>, conn: &mut Conn, key: &Key) -> Result<bool, StoreError> {
    let mut sql = format!("DELETE FROM {} WHERE ", ctx.table.q());
    key_eq(&mut sql, key);
    let done = ctx.run(conn, "evict", &sql).await?;
    Ok(done.first().is_some_and(|d| d.affected > 0))
}

/// Deletes up to `limit` expired rows, oldest first, through the `expires_at` index.
pub(crate) async fn purge(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    limit: usize,
) -> Result<usize, StoreError> {
    if limit == 0 {
        return Ok(0);
    }
    let sql = format!(
        "DELETE FROM {} WHERE expires_at <= {NOW_MS} ORDER BY expires_at LIMIT {limit}",
        ctx.table.q()
    );
    let done = ctx.run(conn, "purge", &sql).await?;
    Ok(done
        .first()
        .map_or(0, |d| usize::try_from(d.affected).unwrap_or(usize::MAX)))
}

pub(crate) async fn now(ctx: &Ctx<'_>, conn: &mut Conn) -> Result<Timestamp, StoreError> {
    let mut done = ctx.run(conn, "clock", &format!("SELECT {NOW_MS}")).await?;
    exec::scalar_i64(done.first_mut(), "clock").map(Timestamp::from_millis)
}

pub(crate) async fn count_by_state(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
) -> Result<Vec<(State, u64)>, StoreError> {
    let sql = format!(
        "SELECT state, COUNT(*) FROM {} GROUP BY state ORDER BY state",
        ctx.table.q()
    );
    let mut done = ctx.run(conn, "count", &sql).await?;
    let rows = done
        .first_mut()
        .map(|d| std::mem::take(&mut d.rows))
        .unwrap_or_default();
    rows.into_iter()
        .map(|mut row| {
            let code = row.take_opt::<i64, usize>(0).and_then(Result::ok);
            let n = row.take_opt::<u64, usize>(1).and_then(Result::ok);
            match (code.and_then(State::from_code), n) {
                (Some(state), Some(n)) => Ok((state, n)),
                _ => Err(StoreError::corrupt(format!(
                    "a record has an unknown state {code:?}"
                ))),
            }
        })
        .collect()
}

pub(crate) async fn in_progress(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    limit: usize,
) -> Result<Vec<Record>, StoreError> {
    let sql = format!(
        "SELECT namespace, id, {RECORD_COLUMNS} FROM {} WHERE state = 1 ORDER BY lease_until, updated_at \
         LIMIT {limit}",
        ctx.table.q()
    );
    let mut done = ctx.run(conn, "list", &sql).await?;
    let rows = done
        .first_mut()
        .map(|d| std::mem::take(&mut d.rows))
        .unwrap_or_default();
    rows.into_iter()
        .map(|mut row| {
            let key = exec::stored_key(&row)?;
            decode(&key, &mut row, 2)
        })
        .collect()
}
