//! The processing policy: the rules above the state machine, as pure functions.
//!
//! [`transition`](crate::transition) says what a store does to one record; this module says what
//! a processor does around the handler: what a claim means ([`on_claim`]), what a handler's
//! result must become ([`on_result`]), and what the caller is told once the store has answered
//! ([`Verdict::recorded`]). The [`Executor`](crate::Executor) (store mode) and every SQL store's
//! transactional mode call these functions and decide nothing themselves, so each rule and each
//! reason a dead letter carries is written once.
//!
//! ```
//! use std::time::Duration;
//! use idem::policy::{self, Mode, Verdict};
//! use idem::{Config, WriteOutcome};
//!
//! let config = Config::default().max_attempts(2);
//! // The second and last attempt failed: the key is failed with the reason.
//! let verdict = policy::on_result::<(), &str>(Err("timeout"), 2, &config, 1024, Mode::Store)?;
//! let Verdict::Fail { reason, .. } = &verdict else { unreachable!() };
//! assert_eq!(reason, "attempt 2 of 2 failed: timeout");
//! let outcome = verdict.recorded(2, WriteOutcome::Applied);
//! assert_eq!(outcome.kind(), "exhausted");
//! # Ok::<(), idem::CodecError>(())
//! ```

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;

use crate::error::CodecError;
use crate::executor::{Config, Outcome};
use crate::key::{Fingerprint, Key};
use crate::store::{Claim, ClaimRequest, Lease, WriteOutcome};
use crate::stored::Stored;

/// The claim request for one delivery of `key` under `config`: its lease, retention, attempt
/// limit and owner, with a fresh fencing token.
pub fn claim_request(key: Key, fingerprint: Fingerprint, config: &Config) -> ClaimRequest {
    ClaimRequest::new(key, fingerprint)
        .lease(config.lease)
        .retention(config.retention)
        .max_attempts(config.max_attempts)
        .owner(config.owner.clone())
}

/// Where the handler's effects live, which decides what an unrecordable result means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Mode {
    /// The effects live outside the store (store mode): once the handler returned, they have
    /// happened.
    Store,
    /// The effects are writes in the record's own transaction (transactional mode): they can
    /// still be undone.
    Transactional,
}

/// What to do after a claim.
#[derive(Debug)]
pub enum Step<T, E> {
    /// The key is ours: run the handler under this lease.
    Run(Lease),
    /// The handler must not run; this is the outcome.
    Done(Outcome<T, E>),
}

/// Turns a claim into a step: run the handler, or answer without it (`received` is the
/// fingerprint of the delivery, reported with a mismatch).
///
/// # Errors
/// A [`CodecError`] when a duplicate's stored result cannot be decoded as `T`.
pub fn on_claim<T: Stored, E>(
    claim: Claim,
    received: Fingerprint,
) -> Result<Step<T, E>, CodecError> {
    Ok(Step::Done(match claim {
        Claim::Acquired(lease) => return Ok(Step::Run(lease)),
        Claim::Completed { result } => Outcome::Replayed(T::decode(result)?),
        Claim::InProgress { retry_after } => Outcome::InProgress { retry_after },
        Claim::Mismatch { stored } => Outcome::Mismatch { stored, received },
        Claim::Exhausted { attempts, reason } => Outcome::Exhausted {
            attempts,
            reason,
            error: None,
        },
    }))
}

/// What a handler's result must become: the write the processor makes next.
#[derive(Debug)]
pub enum Verdict<T, E> {
    /// Complete the record with `result` (the encoded `value`). In transactional mode the
    /// handler's writes are kept.
    Complete {
        /// The handler's value.
        value: T,
        /// `value` encoded, to store and replay.
        result: Bytes,
    },
    /// Release the claim so that a redelivery retries after `retry_after`. In transactional
    /// mode the handler's writes are undone.
    Release {
        /// The handler's error.
        error: E,
        /// The backoff before the retry.
        retry_after: Duration,
    },
    /// Fail the key for good with `reason` (the message goes to the dead-letter destination).
    /// In transactional mode the handler's writes are undone.
    Fail {
        /// Why, stored with the record and sent with the dead letter.
        reason: String,
        /// The handler's error, when it failed.
        error: Option<E>,
    },
}

/// Decides what `result`, the handler's answer on attempt number `attempt`, becomes.
///
/// - `Ok` whose encoded value fits in `max_result_bytes`: complete.
/// - `Ok` over the limit: fail the key. In [`Mode::Store`] the effect has happened and a retry
///   would repeat it; in [`Mode::Transactional`] the writes are undone but the result would never
///   fit. Either way duplicates are dead-lettered, not run again.
/// - `Err` on the last attempt `config.max_attempts` allows: fail with the handler's error.
/// - Any other `Err`: release, with `config.retry_backoff`'s delay for this attempt.
///
/// # Errors
/// A [`CodecError`] when the value cannot be encoded (nothing is written; the caller fails
/// closed, as for a store error).
pub fn on_result<T: Stored, E: fmt::Display>(
    result: Result<T, E>,
    attempt: u32,
    config: &Config,
    max_result_bytes: usize,
    mode: Mode,
) -> Result<Verdict<T, E>, CodecError> {
    match result {
        Ok(value) => {
            let result = value.encode()?;
            if result.len() > max_result_bytes {
                return Ok(Verdict::Fail {
                    reason: too_large(result.len(), max_result_bytes, mode),
                    error: None,
                });
            }
            Ok(Verdict::Complete { value, result })
        }
        Err(error) => Ok(match config.max_attempts {
            Some(max) if attempt >= max.get() => Verdict::Fail {
                reason: last_attempt_failed(attempt, max, &error),
                error: Some(error),
            },
            _ => Verdict::Release {
                error,
                retry_after: config.retry_backoff.delay(attempt),
            },
        }),
    }
}

impl<T, E> Verdict<T, E> {
    /// Whether the handler's writes stand (transactional mode keeps them only on completion).
    pub fn keeps_writes(&self) -> bool {
        matches!(self, Verdict::Complete { .. })
    }

    /// The outcome once the store answered the verdict's write for attempt `attempt`: applied,
    /// or refused because the claim was lost (never reported as a success).
    pub fn recorded(self, attempt: u32, written: WriteOutcome) -> Outcome<T, E> {
        if written == WriteOutcome::LeaseLost {
            return lease_lost(attempt);
        }
        match self {
            Verdict::Complete { value, .. } => Outcome::Executed(value),
            Verdict::Release { error, retry_after } => Outcome::Released {
                error,
                attempt,
                retry_after,
            },
            Verdict::Fail { reason, error } => Outcome::Exhausted {
                attempts: attempt,
                reason,
                error,
            },
        }
    }
}

/// The outcome of attempt `attempt` whose claim was lost before its result could be recorded
/// (the heartbeat found it taken over or evicted): redeliver, never ack as a success.
pub fn lease_lost<T, E>(attempt: u32) -> Outcome<T, E> {
    Outcome::LeaseLost { attempt }
}

/// The dead-letter reason of a failed last attempt.
fn last_attempt_failed(attempt: u32, max: NonZeroU32, error: &impl fmt::Display) -> String {
    format!("attempt {attempt} of {max} failed: {error}")
}

/// The dead-letter reason of a result over the store's limit.
fn too_large(len: usize, limit: usize, mode: Mode) -> String {
    match mode {
        Mode::Store => format!(
            "the handler succeeded but its result is {len} bytes, over the store's limit of \
             {limit}; the key is failed so that it is not run again"
        ),
        Mode::Transactional => format!(
            "the handler's result is {len} bytes, over the store's limit of {limit}; its writes \
             were rolled back and the key is failed"
        ),
    }
}

/// An outcome of a processor whose handler can be called once, turned back into the caller's
/// error type: the single form of a batch API runs its batch of one with the handler wrapped in
/// [`Once`].
///
/// # Errors
/// An internal error if the handler was needed twice (a batch of one never asks twice).
pub fn single<T, E>(outcome: Outcome<T, Once<E>>) -> Result<Outcome<T, E>, crate::Error> {
    let twice = || {
        crate::Error::Store(crate::StoreError::new(
            crate::StoreErrorKind::Backend,
            "internal error: a single delivery's handler was needed twice",
        ))
    };
    Ok(match outcome {
        Outcome::Executed(v) => Outcome::Executed(v),
        Outcome::Replayed(v) => Outcome::Replayed(v),
        Outcome::InProgress { retry_after } => Outcome::InProgress { retry_after },
        Outcome::Mismatch { stored, received } => Outcome::Mismatch { stored, received },
        Outcome::LeaseLost { attempt } => Outcome::LeaseLost { attempt },
        Outcome::Released {
            error,
            attempt,
            retry_after,
        } => Outcome::Released {
            error: error.0.ok_or_else(twice)?,
            attempt,
            retry_after,
        },
        Outcome::Exhausted {
            attempts,
            reason,
            error,
        } => Outcome::Exhausted {
            attempts,
            reason,
            error: error.and_then(|e| e.0),
        },
    })
}

/// The error of a handler that may be called once, as a batch's `Fn` handler needs: `None` if
/// it was asked a second time. See [`single`].
#[derive(Debug)]
pub struct Once<E>(pub Option<E>);

impl<E: fmt::Display> fmt::Display for Once<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(e) => e.fmt(f),
            None => f.write_str("the handler was called twice"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Timestamp, Token};
    use crate::store::Acquisition;

    fn config(max: u32) -> Config {
        Config::default().max_attempts(max)
    }

    #[test]
    fn a_claim_becomes_a_step() {
        let lease = Lease::new(
            Token::random(),
            1,
            Timestamp::from_millis(5),
            Acquisition::New,
        );
        let fp = Fingerprint::of(b"x");
        assert!(matches!(
            on_claim::<(), ()>(Claim::Acquired(lease), fp),
            Ok(Step::Run(_))
        ));
        let done = on_claim::<String, ()>(
            Claim::Completed {
                result: Bytes::from_static(b"r"),
            },
            fp,
        );
        assert!(matches!(done, Ok(Step::Done(Outcome::Replayed(ref s))) if s == "r"));
        let other = Fingerprint::of(b"y");
        let done = on_claim::<(), ()>(Claim::Mismatch { stored: other }, fp);
        assert!(
            matches!(done, Ok(Step::Done(Outcome::Mismatch { stored, received })) if stored == other && received == fp)
        );
    }

    #[test]
    fn results_become_verdicts() {
        let c = config(3);
        let v = on_result::<String, &str>(Ok("ok".into()), 1, &c, 10, Mode::Store).unwrap();
        assert!(matches!(v, Verdict::Complete { ref result, .. } if &result[..] == b"ok"));
        let v = on_result::<(), &str>(Err("e"), 2, &c, 10, Mode::Store).unwrap();
        assert!(matches!(v, Verdict::Release { .. }));
        let v = on_result::<(), &str>(Err("e"), 3, &c, 10, Mode::Store).unwrap();
        assert!(
            matches!(v, Verdict::Fail { ref reason, error: Some("e") } if reason == "attempt 3 of 3 failed: e")
        );
        let v = on_result::<(), &str>(
            Err("e"),
            99,
            &Config::default().max_attempts(0),
            10,
            Mode::Store,
        )
        .unwrap();
        assert!(
            matches!(v, Verdict::Release { .. }),
            "no limit: always released"
        );
        for mode in [Mode::Store, Mode::Transactional] {
            let v = on_result::<String, &str>(Ok("x".repeat(11)), 1, &c, 10, mode).unwrap();
            assert!(
                matches!(v, Verdict::Fail { ref reason, error: None } if reason.contains("11 bytes")),
                "{mode:?}"
            );
        }
    }

    #[test]
    fn a_lost_write_is_never_a_success() {
        let v: Verdict<u8, ()> = Verdict::Complete {
            value: 1,
            result: Bytes::new(),
        };
        assert!(matches!(
            v.recorded(4, WriteOutcome::LeaseLost),
            Outcome::LeaseLost { attempt: 4 }
        ));
    }
}
