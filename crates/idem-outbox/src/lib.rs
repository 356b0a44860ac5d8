//! # idem-outbox: the transactional outbox
//!
//! The producer side of exactly-once: a message is **inserted in the same transaction as the
//! business writes**, with a message id fixed once (UUIDv7); a **relay** publishes it and marks
//! it sent; consumers de-duplicate on that id (idem's [`Consumer`](idem_broker::Consumer),
//! and the broker's own publish dedup where it has one, `Nats-Msg-Id`). With idem on both ends
//! a pipeline is exactly-once from one database to another.
//!
//! ```no_run
//! # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use idem_outbox::{NewMessage, Table, postgres};
//! let table = Table::default(); // idem_outbox
//! postgres::migrate(client, &table).await?; // once, at deploy time
//! let tx = client.transaction().await?;
//! tx.execute("UPDATE orders SET state = 'paid' WHERE id = 7", &[]).await?;
//! postgres::enqueue(&tx, &table, &NewMessage::new("orders.paid", &b"{\"order\": 7}"[..]).with_key("order-7")).await?;
//! tx.commit().await?; // the message exists if and only if the order is paid
//! # Ok(()) }
//! ```
//!
//! and a relay (`idem relay --from postgres://... --to amqp://...` is the same thing):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem_outbox::{DbUrl, RelayConfig, run};
//! let config = RelayConfig::new(
//!     DbUrl::parse("postgres://app@127.0.0.1/app")?,
//!     idem_broker::BrokerUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f")?,
//! );
//! let stats = run(config, idem_broker::shutdown_signal()).await?;
//! println!("{stats:?}");
//! # Ok(()) }
//! ```
//!
//! ## The relay's guarantees
//!
//! - **Claims are safe across relays.** A claim is atomic (PostgreSQL: one `FOR UPDATE
//!   SKIP LOCKED` CTE; MySQL 8 / MariaDB 10.6+: a short transaction with `SKIP LOCKED`; SQLite:
//!   one `UPDATE ... RETURNING` under the write lock); it **leases** the rows (`available_ms`)
//!   and bumps their **fencing token**. No lock is held while publishing. Marking sent (or
//!   failed) is fenced by the token: a relay that lost its lease cannot overwrite the new
//!   owner's outcome.
//! - **Per-key order.** A row is claimable only when no earlier (lower id) unfinished row has
//!   its ordering key, so two messages of one key are never in flight together and a key's
//!   committed messages are published in id order. Two transactions that enqueue for one key at
//!   the same time can commit in the other order than their ids, and the later id may then go
//!   first: enqueue a key's messages from one writer at a time (the aggregate's own row lock
//!   does it) when their order matters. Rows are never read through a cursor over ids (a
//!   transaction that commits late with a lower id is never skipped): each row has its own
//!   state.
//! - **At-least-once on the wire, once in effect.** A relay that dies between the broker's
//!   confirmation and the mark loses its lease; the row is published again with the **same
//!   message id**, which consumers (and JetStream) de-duplicate.
//! - **Failures.** A failed publish is retried with backoff up to an attempt cap, then the row
//!   goes **dead** (visible with [`OutboxDb::dead`], requeued with [`OutboxDb::requeue`]). By
//!   default later messages of its key go ahead ([`DeadPolicy::SkipDead`]); [`DeadPolicy::StopKey`]
//!   stops the key instead. One bad message never stalls other keys. A lost broker connection
//!   is not the message's fault: it does not count as an attempt, the relay pauses.
//! - **Wake on commit.** PostgreSQL: an `AFTER INSERT` trigger sends `NOTIFY`, which the relay
//!   `LISTEN`s to; in process: a [`Notifier`]; polling ([`RelayConfig::poll_interval`]) as the
//!   fallback.
//! - **Retention.** Sent rows older than [`RelayConfig::retention`] are deleted in bounded
//!   batches.
//!
//! See `docs/outbox.md` for the table, the tuning and the measured numbers.

mod db;
mod error;
mod message;
pub mod mysql;
pub mod postgres;
mod relay;
mod rows;
pub mod sqlite;
mod table;

pub use crate::db::{DbKind, DbUrl, OutboxDb};
pub use crate::error::{OutboxError, OutboxErrorKind};
pub use crate::message::{MAX_NAME_LEN, NewMessage};
pub use crate::relay::{
    DeadPolicy, Notifier, ORDERING_KEY_HEADER, Relay, RelayConfig, RelayEvent, RelayStats,
    StatsHandle, run,
};
pub use crate::rows::{DeadRow, OutboxStats, Requeue};
pub use crate::table::{DEFAULT_TABLE, Table};
