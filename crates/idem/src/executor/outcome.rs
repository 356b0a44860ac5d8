//! What [`Executor::run`](super::Executor::run) returns, and what the caller should do with the
//! message ([`Disposition`]).

use std::fmt;
use std::time::Duration;

use crate::key::Fingerprint;

/// The outcome of one delivery through the executor.
///
/// Only [`Executed`](Outcome::Executed) and [`Replayed`](Outcome::Replayed) may be acked as a
/// success; [`disposition`](Outcome::disposition) says what to do in every case.
#[must_use = "an outcome says whether the message may be acked"]
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome<T, E> {
    /// The handler ran and its completion is durable. Ack.
    Executed(T),
    /// A duplicate: the handler did not run; this is the result the first run stored. Ack.
    Replayed(T),
    /// Another consumer holds the key. Do not ack; redeliver after `retry_after`.
    InProgress {
        /// When to try again (the rest of the other consumer's lease, or the wait that timed out).
        retry_after: Duration,
    },
    /// The handler failed and the claim was released. Do not ack; redeliver after `retry_after`.
    Released {
        /// The handler's error.
        error: E,
        /// Which attempt failed.
        attempt: u32,
        /// Backoff before the retry.
        retry_after: Duration,
    },
    /// Attempts are exhausted (now or before); the record is failed. Dead-letter, then ack.
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// Why, for the dead-letter destination.
        reason: String,
        /// The handler's error, when this delivery's attempt was the last one.
        error: Option<E>,
    },
    /// The key is known with another payload: a bug upstream. Dead-letter, then ack.
    Mismatch {
        /// The fingerprint stored with the key.
        stored: Fingerprint,
        /// The fingerprint of this delivery.
        received: Fingerprint,
    },
    /// The lease was lost while the handler ran (it outlived its lease and another consumer
    /// took over, or an operator evicted the key). The result was not recorded. Do not ack as a
    /// success; redeliver, and the redelivery sees the other consumer's outcome.
    LeaseLost {
        /// The attempt whose lease was lost.
        attempt: u32,
    },
}

/// What to do with the message after an outcome.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Disposition {
    /// Ack (or commit the offset): the record is durable.
    Ack,
    /// Do not ack; have the broker redeliver after `after` (delayed nack / requeue).
    Retry {
        /// How long to wait.
        after: Duration,
    },
    /// Publish to the dead-letter destination with `reason`; ack only once that publish is
    /// confirmed.
    DeadLetter {
        /// Why, for operators.
        reason: String,
    },
}

/// Delay before a delivery whose lease was lost is retried: by then the new owner has usually
/// finished, and the redelivery replays its result.
const LEASE_LOST_RETRY: Duration = Duration::from_secs(1);

impl<T, E: fmt::Display> Outcome<T, E> {
    /// What to do with the message.
    pub fn disposition(&self) -> Disposition {
        match self {
            Outcome::Executed(_) | Outcome::Replayed(_) => Disposition::Ack,
            Outcome::InProgress { retry_after } | Outcome::Released { retry_after, .. } => {
                Disposition::Retry {
                    after: *retry_after,
                }
            }
            Outcome::LeaseLost { .. } => Disposition::Retry {
                after: LEASE_LOST_RETRY,
            },
            Outcome::Exhausted { reason, .. } => Disposition::DeadLetter {
                reason: reason.clone(),
            },
            Outcome::Mismatch { stored, received } => Disposition::DeadLetter {
                reason: format!(
                    "payload mismatch: this key was first seen with fingerprint {stored}, \
                     this delivery has {received}"
                ),
            },
        }
    }
}

impl<T, E> Outcome<T, E> {
    /// The handler's result, when it ran or was replayed.
    pub fn into_value(self) -> Option<T> {
        match self {
            Outcome::Executed(v) | Outcome::Replayed(v) => Some(v),
            _ => None,
        }
    }

    /// Whether this delivery ran the handler and recorded it.
    pub fn is_executed(&self) -> bool {
        matches!(self, Outcome::Executed(_))
    }

    /// Whether this delivery was a duplicate answered from the store.
    pub fn is_replayed(&self) -> bool {
        matches!(self, Outcome::Replayed(_))
    }

    /// A short stable name, for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Executed(_) => "executed",
            Outcome::Replayed(_) => "replayed",
            Outcome::InProgress { .. } => "in_progress",
            Outcome::Released { .. } => "released",
            Outcome::Exhausted { .. } => "exhausted",
            Outcome::Mismatch { .. } => "mismatch",
            Outcome::LeaseLost { .. } => "lease_lost",
        }
    }
}
