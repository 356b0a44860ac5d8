//! The contract's state machine (section 3) as pure functions over one key's slot.
//!
//! A store that can read a record, decide and write it back atomically (a single writer, or a
//! row lock) implements [`Store`](crate::Store) by loading the slot, calling one of these
//! functions with its clock's `now`, and writing the slot back when the function says it
//! changed. `MemoryStore` and the SQLite store do exactly that, so the table lives in one place.
//!
//! Conventions, shared by every store:
//! - a lease has ended when `now >= lease_until`; a record's retention has ended when
//!   `now >= expires_at`, and such a record is treated as absent;
//! - an in-progress record expires `retention` after its lease ends (an abandoned claim does not
//!   stay forever); completed, released and failed records expire `retention` after the write;
//! - a claim that would start attempt `max_attempts + 1` (after a release or a takeover) fails
//!   the record instead and returns [`Claim::Exhausted`], so a message that kills its consumer
//!   every time still ends in the dead-letter destination;
//! - completing (or failing) again with the token that completed (or failed) the record is
//!   applied without change, so a retried write after a lost response is safe.

use std::time::Duration;

use bytes::Bytes;

use crate::record::{Record, State, Timestamp, Token};
use crate::store::{Acquisition, Claim, ClaimRequest, Completion, Lease, WriteOutcome};

/// Whether a transition changed the slot (the store must write it back).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Change {
    /// Nothing to write.
    None,
    /// The slot was absent (or treated as absent) and now holds a new record.
    Created,
    /// The record changed.
    Updated,
}

impl Change {
    /// Whether there is anything to write.
    pub fn is_write(self) -> bool {
        self != Change::None
    }
}

/// A fresh in-progress record for `req`, attempt 1.
pub fn new_record(req: &ClaimRequest, now: Timestamp) -> (Record, Lease) {
    let until = now.plus(req.lease);
    let record = Record {
        key: req.key.clone(),
        state: State::InProgress,
        fingerprint: req.fingerprint,
        token: Some(req.token),
        owner: Some(req.owner.clone()),
        lease_until: Some(until),
        attempts: 1,
        result: None,
        created_at: now,
        updated_at: now,
        expires_at: until.plus(req.retention),
    };
    (record, Lease::new(req.token, 1, until, Acquisition::New))
}

/// Applies a claim to the slot.
pub fn claim(slot: &mut Option<Record>, req: &ClaimRequest, now: Timestamp) -> (Claim, Change) {
    let Some(rec) = slot.as_mut() else {
        let (record, lease) = new_record(req, now);
        *slot = Some(record);
        return (Claim::Acquired(lease), Change::Created);
    };
    if rec.is_expired(now) {
        let (record, mut lease) = new_record(req, now);
        lease.acquisition = Acquisition::Reprocess;
        *rec = record;
        return (Claim::Acquired(lease), Change::Created);
    }
    if rec.fingerprint != req.fingerprint {
        return (
            Claim::Mismatch {
                stored: rec.fingerprint,
            },
            Change::None,
        );
    }
    let acquisition = match rec.state {
        State::Completed => {
            let result = rec.result.clone().unwrap_or_default();
            return (Claim::Completed { result }, Change::None);
        }
        State::Failed => {
            let reason = rec
                .result
                .as_deref()
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .unwrap_or_default();
            return (
                Claim::Exhausted {
                    attempts: rec.attempts,
                    reason,
                },
                Change::None,
            );
        }
        State::InProgress => match rec.lease_until {
            Some(until) if now < until => {
                return (
                    Claim::InProgress {
                        retry_after: until.since(now).max(Duration::from_millis(1)),
                    },
                    Change::None,
                );
            }
            _ => Acquisition::Takeover,
        },
        State::Released => Acquisition::Retry,
    };
    if let Some(max) = req.max_attempts.filter(|max| rec.attempts >= max.get()) {
        rec.state = State::Failed;
        rec.lease_until = None;
        rec.owner = None;
        let reason = format!(
            "attempts exhausted: {} of at most {max}, the last one never completed",
            rec.attempts
        );
        rec.result = Some(Bytes::from(reason.clone()));
        rec.updated_at = now;
        rec.expires_at = now.plus(req.retention);
        return (
            Claim::Exhausted {
                attempts: rec.attempts,
                reason,
            },
            Change::Updated,
        );
    }
    let until = now.plus(req.lease);
    rec.state = State::InProgress;
    rec.token = Some(req.token);
    rec.owner = Some(req.owner.clone());
    rec.lease_until = Some(until);
    rec.attempts = rec.attempts.saturating_add(1);
    rec.result = None;
    rec.updated_at = now;
    rec.expires_at = until.plus(req.retention);
    (
        Claim::Acquired(Lease::new(req.token, rec.attempts, until, acquisition)),
        Change::Updated,
    )
}

/// The record held by `token`, if any: the fence of every write.
fn held(slot: &mut Option<Record>, token: Token) -> Option<&mut Record> {
    slot.as_mut()
        .filter(|r| r.state == State::InProgress && r.token == Some(token))
}

/// Applies a completion to the slot (the caller has checked the result size).
pub fn complete(
    slot: &mut Option<Record>,
    c: &Completion,
    now: Timestamp,
) -> (WriteOutcome, Change) {
    if let Some(rec) = held(slot, c.token) {
        rec.state = State::Completed;
        rec.lease_until = None;
        rec.result = Some(c.result.clone());
        rec.updated_at = now;
        rec.expires_at = now.plus(c.retention);
        return (WriteOutcome::Applied, Change::Updated);
    }
    (already(slot, State::Completed, c.token), Change::None)
}

/// A repeated completion or failure by the token that made it is applied without change.
fn already(slot: &Option<Record>, state: State, token: Token) -> WriteOutcome {
    match slot {
        Some(r) if r.state == state && r.token == Some(token) => WriteOutcome::Applied,
        _ => WriteOutcome::LeaseLost,
    }
}

/// Applies a release to the slot.
pub fn release(
    slot: &mut Option<Record>,
    token: Token,
    retention: Duration,
    now: Timestamp,
) -> (WriteOutcome, Change) {
    let Some(rec) = held(slot, token) else {
        return (WriteOutcome::LeaseLost, Change::None);
    };
    rec.state = State::Released;
    rec.token = None;
    rec.owner = None;
    rec.lease_until = None;
    rec.updated_at = now;
    rec.expires_at = now.plus(retention);
    (WriteOutcome::Applied, Change::Updated)
}

/// Applies a lease extension to the slot.
pub fn extend(
    slot: &mut Option<Record>,
    token: Token,
    lease: Duration,
    now: Timestamp,
) -> (WriteOutcome, Change) {
    let Some(rec) = held(slot, token) else {
        return (WriteOutcome::LeaseLost, Change::None);
    };
    let until = now.plus(lease);
    // Keep the retention an abandoned claim gets after its lease.
    let old_until = rec.lease_until.unwrap_or(now);
    let keep = rec.expires_at.since(old_until);
    rec.lease_until = Some(until);
    rec.updated_at = now;
    rec.expires_at = until.plus(keep);
    (WriteOutcome::Applied, Change::Updated)
}

/// Applies a failure to the slot.
pub fn fail(
    slot: &mut Option<Record>,
    token: Token,
    reason: &str,
    retention: Duration,
    now: Timestamp,
) -> (WriteOutcome, Change) {
    let Some(rec) = held(slot, token) else {
        return (already(slot, State::Failed, token), Change::None);
    };
    rec.state = State::Failed;
    rec.lease_until = None;
    rec.owner = None;
    rec.result = Some(Bytes::copy_from_slice(reason.as_bytes()));
    rec.updated_at = now;
    rec.expires_at = now.plus(retention);
    (WriteOutcome::Applied, Change::Updated)
}

/// Whether a slot's record should be purged at `now`.
pub fn is_purgeable(rec: &Record, now: Timestamp) -> bool {
    rec.is_expired(now)
}
