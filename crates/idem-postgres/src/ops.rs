//! The transitions over any [`Exec`] session: building the statements' arguments, running
//! batches in rounds (a key repeated in one batch goes to the next round, so a batch behaves
//! exactly like its single forms in order), re-running keys that raced, and decoding answers
//! into [`Claim`]s and [`WriteOutcome`]s.

use std::time::Duration;

use bytes::Bytes;
use idem::{
    Acquisition, Claim, ClaimRequest, Completion, Fingerprint, Key, Lease, State, StoreError,
    StoreErrorKind, Timestamp, Token, WriteOutcome, duration_millis,
};

use crate::exec::{ClaimArgs, ClaimRow, CompleteArgs, Exec, FencedArgs};
use crate::sql::{Statements, claim_kind, write_kind};

/// How often a key that raced with another session is tried again before giving up with
/// [`StoreErrorKind::Busy`]. Each try runs on a fresh snapshot, so a race resolves on the next
/// one unless the key is rewritten constantly (or the caller's transaction is REPEATABLE READ,
/// whose snapshot never moves).
const RACE_TRIES: usize = 8;

/// Durations are capped at 1000 years so that `now() + interval` stays within PostgreSQL's
/// timestamp range; idem treats both as "forever".
const MAX_MS: i64 = 1000 * 365 * 24 * 3600 * 1000;

pub(crate) fn ms(d: Duration) -> i64 {
    duration_millis(d).min(MAX_MS)
}

fn busy(what: &str) -> StoreError {
    StoreError::new(
        StoreErrorKind::Busy,
        format!(
            "postgres {what}: the key kept changing under this statement for {RACE_TRIES} tries \
             (a REPEATABLE READ or SERIALIZABLE transaction cannot see the change: retry it)"
        ),
    )
}

/// Splits positions into rounds: the n-th occurrence of a key goes to round n.
pub(crate) fn rounds<'k>(keys: impl Iterator<Item = &'k Key>) -> Vec<Vec<usize>> {
    let mut seen: foldhash::HashMap<&Key, usize> = foldhash::HashMap::default();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, key) in keys.enumerate() {
        let n = seen.entry(key).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(i);
        *n += 1;
    }
    rounds
}

/// Claims `reqs` in order with `sql`: `Statements::claim`, or `claim_completed` in
/// transactional mode.
pub(crate) async fn claim_many<X: Exec>(
    x: &mut X,
    sql: &str,
    reqs: &[ClaimRequest],
) -> Result<Vec<Claim>, StoreError> {
    let mut out: Vec<Option<Claim>> = vec![None; reqs.len()];
    for round in rounds(reqs.iter().map(|r| &r.key)) {
        let mut todo = round;
        for _ in 0..RACE_TRIES {
            if todo.is_empty() {
                break;
            }
            let args = claim_args(todo.iter().map(|&i| &reqs[i]));
            let rows = x.claim_rows(sql, &args).await?;
            if rows.len() != todo.len() {
                return Err(StoreError::new(
                    StoreErrorKind::Backend,
                    format!(
                        "postgres claim: {} rows for {} keys",
                        rows.len(),
                        todo.len()
                    ),
                ));
            }
            let mut raced = Vec::new();
            for (&i, row) in todo.iter().zip(rows) {
                match decode_claim(&reqs[i], row)? {
                    Some(claim) => out[i] = Some(claim),
                    None => raced.push(i),
                }
            }
            todo = raced;
        }
        if !todo.is_empty() {
            return Err(busy("claim"));
        }
    }
    out.into_iter()
        .map(|c| c.ok_or_else(|| busy("claim")))
        .collect()
}

/// Transactional mode's claim: inserts new keys as completed in one plain statement, and claims
/// the others with `claim_completed`. The keys of `reqs` are distinct (one round).
pub(crate) async fn claim_new_first<X: Exec>(
    x: &mut X,
    st: &Statements,
    reqs: &[ClaimRequest],
) -> Result<Vec<Claim>, StoreError> {
    let inserted = x
        .inserted_rows(&st.insert_completed, &claim_args(reqs.iter()))
        .await?;
    let now: foldhash::HashMap<(&str, i64), i64> = inserted
        .iter()
        .map(|(id, token, now)| ((id.as_str(), *token), *now))
        .collect();
    let mut out = Vec::with_capacity(reqs.len());
    let mut rest = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        match now.get(&(r.key.id(), r.token.as_i64())) {
            Some(&now) => out.push(Some(Claim::Acquired(Lease::new(
                r.token,
                1,
                Timestamp::from_millis(now).plus(r.lease),
                Acquisition::New,
            )))),
            None => {
                out.push(None);
                rest.push(i);
            }
        }
    }
    if !rest.is_empty() {
        let others: Vec<ClaimRequest> = rest.iter().map(|&i| reqs[i].clone()).collect();
        let claims = claim_many(x, &st.claim_completed, &others).await?;
        for (i, claim) in rest.into_iter().zip(claims) {
            out[i] = Some(claim);
        }
    }
    out.into_iter()
        .map(|c| c.ok_or_else(|| busy("claim")))
        .collect()
}

fn claim_args<'a>(reqs: impl Iterator<Item = &'a ClaimRequest>) -> ClaimArgs<'a> {
    let mut a = ClaimArgs::default();
    for r in reqs {
        a.namespaces.push(r.key.namespace().as_str());
        a.ids.push(r.key.id());
        a.fingerprints.push(r.fingerprint.to_bytes().to_vec());
        a.tokens.push(r.token.as_i64());
        a.owners.push(&r.owner);
        a.lease_ms.push(ms(r.lease));
        a.retention_ms.push(ms(r.retention));
        a.max_attempts
            .push(r.max_attempts.map_or(0, |m| i64::from(m.get())));
    }
    a
}

fn corrupt(key: &Key, what: &str) -> StoreError {
    StoreError::corrupt(format!("record {key}: {what}"))
}

fn state_of(key: &Key, code: Option<i16>) -> Result<State, StoreError> {
    let code = code.ok_or_else(|| corrupt(key, "no state"))?;
    State::from_code(i64::from(code)).ok_or_else(|| corrupt(key, &format!("unknown state {code}")))
}

fn attempts_of(key: &Key, n: Option<i32>) -> Result<u32, StoreError> {
    let n = n.ok_or_else(|| corrupt(key, "no attempt count"))?;
    u32::try_from(n).map_err(|_| corrupt(key, &format!("attempts {n}")))
}

pub(crate) fn fingerprint_of(key: &Key, fp: &[u8]) -> Result<Fingerprint, StoreError> {
    Fingerprint::from_slice(fp).ok_or_else(|| {
        corrupt(
            key,
            &format!("fingerprint of {} bytes, expected 16", fp.len()),
        )
    })
}

/// The claim for one key's row; `None` when the key raced and must be claimed again.
fn decode_claim(req: &ClaimRequest, row: ClaimRow) -> Result<Option<Claim>, StoreError> {
    let key = &req.key;
    let lease = |attempt: u32, acquisition| {
        let until = row
            .lease_until
            .ok_or_else(|| corrupt(key, "acquired without a lease"))?;
        Ok::<_, StoreError>(Claim::Acquired(Lease::new(
            req.token,
            attempt,
            Timestamp::from_millis(until),
            acquisition,
        )))
    };
    let reason = |result: Option<Vec<u8>>| {
        result
            .map(|r| String::from_utf8_lossy(&r).into_owned())
            .unwrap_or_default()
    };
    Ok(Some(match row.kind {
        claim_kind::INSERTED => lease(1, Acquisition::New)?,
        claim_kind::UPDATED => {
            let attempts = attempts_of(key, row.attempts)?;
            match state_of(key, row.state)? {
                State::Failed => Claim::Exhausted {
                    attempts,
                    reason: reason(row.result),
                },
                // Completed: transactional mode writes acquired keys completed.
                State::InProgress | State::Completed => {
                    let acquisition = if row.prev_expired == Some(true) {
                        Acquisition::Reprocess
                    } else if row.prev_state == Some(3) {
                        Acquisition::Retry
                    } else {
                        Acquisition::Takeover
                    };
                    lease(attempts, acquisition)?
                }
                other => return Err(corrupt(key, &format!("claim rewrote it to {other}"))),
            }
        }
        claim_kind::UNCHANGED => {
            let fp = row
                .fingerprint
                .as_deref()
                .ok_or_else(|| corrupt(key, "no fingerprint"))?;
            let stored = fingerprint_of(key, fp)?;
            if stored != req.fingerprint {
                return Ok(Some(Claim::Mismatch { stored }));
            }
            match state_of(key, row.state)? {
                State::Completed => Claim::Completed {
                    result: row.result.map(Bytes::from).unwrap_or_default(),
                },
                State::Failed => Claim::Exhausted {
                    attempts: attempts_of(key, row.attempts)?,
                    reason: reason(row.result),
                },
                State::InProgress => {
                    let until = row
                        .lease_until
                        .ok_or_else(|| corrupt(key, "in progress without a lease"))?;
                    let left = Timestamp::from_millis(until).since(Timestamp::from_millis(row.now));
                    Claim::InProgress {
                        retry_after: left.max(Duration::from_millis(1)),
                    }
                }
                // A released record with this payload is always rewritten: the row changed
                // between the snapshot and the statement's own check.
                _ => return Ok(None),
            }
        }
        claim_kind::RACE => return Ok(None),
        other => {
            return Err(StoreError::new(
                StoreErrorKind::Backend,
                format!("postgres claim: unknown answer {other}"),
            ));
        }
    }))
}

fn write_outcome(kind: i16) -> Result<Option<WriteOutcome>, StoreError> {
    match kind {
        write_kind::APPLIED => Ok(Some(WriteOutcome::Applied)),
        write_kind::LEASE_LOST => Ok(Some(WriteOutcome::LeaseLost)),
        write_kind::RACE => Ok(None),
        other => Err(StoreError::new(
            StoreErrorKind::Backend,
            format!("postgres write: unknown answer {other}"),
        )),
    }
}

/// Completes `cs` in order with `sql` (`Statements::complete_many`, or `set_result_many`);
/// result sizes are checked by the caller.
pub(crate) async fn complete_many<X: Exec>(
    x: &mut X,
    sql: &str,
    cs: &[Completion],
) -> Result<Vec<WriteOutcome>, StoreError> {
    let mut out: Vec<Option<WriteOutcome>> = vec![None; cs.len()];
    for round in rounds(cs.iter().map(|c| &c.key)) {
        let mut todo = round;
        for _ in 0..RACE_TRIES {
            if todo.is_empty() {
                break;
            }
            let mut a = CompleteArgs::default();
            for &i in &todo {
                let c = &cs[i];
                a.namespaces.push(c.key.namespace().as_str().to_owned());
                a.ids.push(c.key.id().to_owned());
                a.tokens.push(c.token.as_i64());
                a.results.push(c.result.to_vec());
                a.retention_ms.push(ms(c.retention));
            }
            let kinds = x.complete_rows(sql, &a).await?;
            if kinds.len() != todo.len() {
                return Err(StoreError::new(
                    StoreErrorKind::Backend,
                    format!(
                        "postgres complete: {} rows for {} keys",
                        kinds.len(),
                        todo.len()
                    ),
                ));
            }
            let mut raced = Vec::new();
            for (&i, kind) in todo.iter().zip(kinds) {
                match write_outcome(kind)? {
                    Some(w) => out[i] = Some(w),
                    None => raced.push(i),
                }
            }
            todo = raced;
        }
        if !todo.is_empty() {
            return Err(busy("complete"));
        }
    }
    out.into_iter()
        .map(|w| w.ok_or_else(|| busy("complete")))
        .collect()
}

/// Which fenced write.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fenced {
    Complete,
    Release,
    Extend,
    Fail,
}

/// Runs one fenced write, again while it races.
pub(crate) async fn fenced<X: Exec>(
    x: &mut X,
    st: &Statements,
    which: Fenced,
    key: &Key,
    token: Token,
    bytes: &[u8],
    d: Duration,
) -> Result<WriteOutcome, StoreError> {
    let sql = match which {
        Fenced::Complete => &st.complete,
        Fenced::Release => &st.release,
        Fenced::Extend => &st.extend,
        Fenced::Fail => &st.fail,
    };
    let args = FencedArgs {
        namespace: key.namespace().as_str(),
        id: key.id(),
        token: token.as_i64(),
        bytes,
        ms: ms(d),
    };
    for _ in 0..RACE_TRIES {
        if let Some(w) = write_outcome(x.fenced(sql, &args).await?)? {
            return Ok(w);
        }
    }
    Err(busy("write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_go_to_later_rounds() {
        let ns = idem::Namespace::new("n").expect("ns");
        let keys: Vec<Key> = ["a", "b", "a", "c", "a", "b"]
            .iter()
            .map(|id| ns.key(*id).expect("key"))
            .collect();
        assert_eq!(
            rounds(keys.iter()),
            vec![vec![0, 1, 3], vec![2, 5], vec![4]]
        );
        assert!(rounds(std::iter::empty()).is_empty());
    }

    #[test]
    fn durations_stay_in_timestamp_range() {
        assert_eq!(ms(Duration::from_millis(1500)), 1500);
        assert_eq!(ms(Duration::MAX), MAX_MS);
    }
}
