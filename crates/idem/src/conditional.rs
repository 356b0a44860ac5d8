//! Conditional updates: the two other ways to make an effect idempotent, as outcomes.
//!
//! Besides the dedup record, an update can carry its own guard:
//! - a **precondition or version**: `UPDATE accounts SET balance = balance + 100, version =
//!   version + 1 WHERE id = ? AND version = ?` applies once; a replay finds the version moved;
//! - a **state machine**: `UPDATE orders SET state = 'paid' WHERE id = ? AND state =
//!   'pending'` applies once; only a pending order can become paid.
//!
//! When such an update matches no row, that is not an error to retry: either the change is
//! already there (an earlier delivery, or another path, made it) or the message is stale (the
//! row moved on: a newer version, a cancelled order). Retrying would never succeed, and the
//! dead-letter queue is for bugs, not for this. [`guard`] turns "rows matched, and what the row
//! holds now" into a [`Guarded`] outcome that the handler returns as its result: the message is
//! acked, and duplicates replay the same answer.
//!
//! Inside a transactional handler the guard and idem's record commit together, so the guard is
//! a second line of defence (records purged after retention, a producer that re-sends under a
//! new id), and the version check is what makes a *stale* message harmless.
//!
//! ```
//! use idem::conditional::{Guarded, guard};
//! // UPDATE orders SET state = 'paid' WHERE id = 7 AND state = 'pending'  -> 0 rows
//! // SELECT state FROM orders WHERE id = 7                                 -> 'paid'
//! let outcome = guard(0, Some("paid"), |state| *state == "paid");
//! assert_eq!(outcome, Guarded::AlreadyApplied);
//! // ... or 'cancelled': the payment message is stale.
//! let outcome = guard(0, Some("cancelled"), |state| *state == "paid");
//! assert_eq!(outcome, Guarded::Stale { found: "cancelled".into() });
//! ```

use std::fmt;

use bytes::Bytes;

use crate::error::CodecError;
use crate::stored::Stored;

/// What a guarded update did; a handler returns it as its result (it is [`Stored`]).
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Guarded {
    /// The guard held and the row was changed.
    Applied,
    /// The guard did not hold because the row is already in the state the update produces.
    AlreadyApplied,
    /// The guard did not hold and the row is elsewhere: the message is stale. `found` says what
    /// the row holds now (a version, a state), for the record and the logs.
    Stale {
        /// What the row holds now.
        found: String,
    },
    /// There is no row to update.
    Missing,
}

/// Decides what a guarded update did from the rows it matched and, when it matched none, what
/// the row holds now (`None`: there is no row). `done` says whether that value is the state the
/// update would have produced.
pub fn guard<S: fmt::Display>(
    rows_matched: u64,
    current: Option<S>,
    done: impl FnOnce(&S) -> bool,
) -> Guarded {
    if rows_matched > 0 {
        return Guarded::Applied;
    }
    match current {
        None => Guarded::Missing,
        Some(now) if done(&now) => Guarded::AlreadyApplied,
        Some(now) => Guarded::Stale {
            found: now.to_string(),
        },
    }
}

impl Guarded {
    /// Whether this delivery changed the row.
    pub fn is_applied(&self) -> bool {
        matches!(self, Guarded::Applied)
    }
}

impl fmt::Display for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Guarded::Applied => f.write_str("applied"),
            Guarded::AlreadyApplied => f.write_str("already applied"),
            Guarded::Stale { found } => write!(f, "stale (found {found})"),
            Guarded::Missing => f.write_str("missing"),
        }
    }
}

impl Stored for Guarded {
    fn encode(&self) -> Result<Bytes, CodecError> {
        Ok(Bytes::from(match self {
            Guarded::Applied => "applied".to_owned(),
            Guarded::AlreadyApplied => "already".to_owned(),
            Guarded::Stale { found } => format!("stale:{found}"),
            Guarded::Missing => "missing".to_owned(),
        }))
    }

    fn decode(bytes: Bytes) -> Result<Self, CodecError> {
        let text = String::decode(bytes)?;
        Ok(match text.as_str() {
            "applied" => Guarded::Applied,
            "already" => Guarded::AlreadyApplied,
            "missing" => Guarded::Missing,
            other => match other.strip_prefix("stale:") {
                Some(found) => Guarded::Stale {
                    found: found.to_owned(),
                },
                None => {
                    return Err(CodecError::new(
                        "stored result is not a guarded-update outcome",
                        None,
                    ));
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_round_trips() {
        for g in [
            Guarded::Applied,
            Guarded::AlreadyApplied,
            Guarded::Stale {
                found: "version 9".into(),
            },
            Guarded::Missing,
        ] {
            assert_eq!(Guarded::decode(g.encode().unwrap()).unwrap(), g);
        }
        assert!(Guarded::decode(Bytes::from_static(b"nonsense")).is_err());
    }

    #[test]
    fn guard_reads_rows_then_the_row() {
        assert_eq!(guard(1, None::<i64>, |_| false), Guarded::Applied);
        assert_eq!(guard(0, None::<i64>, |_| false), Guarded::Missing);
        // Versioned: the message expected version 3 and would have made it 4.
        assert_eq!(guard(0, Some(4), |v| *v == 4), Guarded::AlreadyApplied);
        assert_eq!(
            guard(0, Some(7), |v| *v == 4),
            Guarded::Stale { found: "7".into() }
        );
    }
}
