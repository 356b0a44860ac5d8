//! # idem: exactly-once effects on top of at-least-once message brokers
//!
//! Every broker delivers at least once: producer retries, lost acks, consumers killed before
//! they ack, rebalances and replays all produce duplicates. idem is the consumer-side layer that
//! makes the *effect* of each message happen once:
//!
//! - a [`Key`] names the message (namespace + producer-set id, business key or content hash);
//! - a [`Store`] keeps one [`Record`] per key and moves it through the contract's state machine
//!   atomically: claim with a lease and a fencing [`Token`], complete with a stored result,
//!   release, extend, fail, evict, purge;
//! - the [`Executor`] runs a handler only under an acquired claim, heartbeats the lease, records
//!   the result before anything may be acked, replays stored results to duplicates, and fails
//!   closed when the store is down.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem::{Executor, MemoryStore, Namespace, Outcome};
//!
//! let exec = Executor::new(MemoryStore::new());
//! let ns = Namespace::new("ledger")?;
//! let mut applied = 0;
//! for _ in 0..3 {
//!     // The same message delivered three times.
//!     let outcome = exec
//!         .run(ns.key("transfer-7")?, b"{\"amount\":10}", |_| async {
//!             applied += 1;
//!             Ok::<_, std::convert::Infallible>(())
//!         })
//!         .await?;
//!     assert!(matches!(outcome, Outcome::Executed(()) | Outcome::Replayed(())));
//! }
//! assert_eq!(applied, 1);
//! # Ok(()) }
//! ```
//!
//! Stores: [`MemoryStore`] here; SQLite (`idem-sqlite`, the embedded default, with a
//! transactional mode), and networked stores in their own crates. Every store passes the
//! `idem-conformance` suite. See `docs/design.md` for the invariants and the failure model.

mod any;
pub mod conditional;
mod error;
mod executor;
mod key;
mod memory;
pub mod metrics;
pub mod policy;
mod record;
mod redact;
mod store;
mod stored;
mod transactional;
pub mod transition;

pub use crate::any::AnyStore;
pub use crate::error::{
    BoxError, CodecError, Error, ErrorKind, KindError, StoreError, StoreErrorKind,
};
pub use crate::executor::{
    Attempt, Backoff, Config, Disposition, Executor, Heartbeat, OnInProgress, Outcome,
};
pub use crate::key::{Fingerprint, Key, KeyError, MAX_ID_LEN, MAX_NAMESPACE_LEN, Namespace};
pub use crate::memory::MemoryStore;
pub use crate::record::{
    Clock, ManualClock, Owner, Record, State, SystemClock, Timestamp, Token, duration_millis,
};
pub use crate::redact::redact_url;
pub use crate::store::{
    Acquisition, Claim, ClaimRequest, Completion, DEFAULT_LEASE, DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_RETENTION, Inspect, Lease, Store, StoreLayer, StoreOp, WriteOutcome, check_result_size,
    default_owner,
};
#[cfg(feature = "json")]
pub use crate::stored::Json;
pub use crate::stored::Stored;
pub use crate::transactional::{Transactional, TxFuture, tx_handler};
