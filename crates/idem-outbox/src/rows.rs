//! Rows as the relay and the operator API see them, whatever the database.

use serde::{Deserialize, Serialize};

// Row states, stored in `state` as a small integer: 0 pending, 1 sent, 2 dead.

/// A row the relay claimed: leased until the lease runs out, fenced by `token`.
#[derive(Clone, Debug)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) token: i64,
    pub(crate) message_id: String,
    pub(crate) destination: String,
    pub(crate) key: Option<String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Option<String>,
    pub(crate) attempts: i32,
}

/// A claimed row whose publish failed: what to write back, fenced by its token.
#[derive(Clone, Debug)]
pub(crate) struct Failed {
    pub(crate) id: i64,
    pub(crate) token: i64,
    /// Whether the failure counts as an attempt (a lost broker connection does not).
    pub(crate) counts: bool,
    /// Whether the row goes dead (the attempt cap is reached).
    pub(crate) dead: bool,
    /// When it may be claimed again, from now.
    pub(crate) delay_ms: i64,
    pub(crate) error: String,
}

/// What the outbox table holds, for dashboards and `idem relay stats --json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Rows not yet published (waiting, leased to a relay, or waiting for a retry).
    pub pending: u64,
    /// Pending rows that failed at least once and wait for their next attempt.
    pub retrying: u64,
    /// Dead rows: attempts exhausted, kept until requeued or deleted.
    pub dead: u64,
    /// Rows published and not yet removed by retention.
    pub sent: u64,
    /// Age of the oldest pending row in milliseconds (database clock), `None` when none is
    /// pending: the relay's lag.
    pub oldest_pending_age_ms: Option<u64>,
}

/// A dead row: attempts exhausted. It stays in the table, at its position, until requeued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadRow {
    /// The row id: its position in the outbox (order of enqueueing within a key).
    pub id: i64,
    /// The message id it is published with.
    pub message_id: String,
    /// Where it goes.
    pub destination: String,
    /// Its ordering key.
    pub key: Option<String>,
    /// Publish attempts made.
    pub attempts: i32,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When it was enqueued (Unix milliseconds, database clock).
    pub created_ms: i64,
}

/// Which dead rows [`OutboxDb::requeue`](crate::OutboxDb::requeue) sends back to pending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Requeue {
    /// Every dead row.
    AllDead,
    /// The dead row with this row id.
    Id(i64),
    /// The dead row with this message id.
    MessageId(String),
}
