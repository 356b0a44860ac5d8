//! [`Transactional`]: one shape for transactional mode on every SQL store.
//!
//! In transactional mode the handler's effects are writes to the database that holds idem's
//! records, and the record is written in the **same transaction**: commit = effect + record, a
//! crash or a rollback = neither, and the redelivery runs the handler as if for the first time.
//! There is no window. `SqliteStore`, `PostgresStore` and `MysqlStore` implement this trait, so
//! one runtime (`idem_broker::Consumer::transactional`) drives them all, and one conformance
//! suite (`idem_conformance::transactional_tests!`) checks them.
//!
//! The handler gets `&mut Self::Tx`, the transaction's connection, and writes with it:
//!
//! ```no_run
//! # async fn demo<S: idem::Transactional>(store: S) -> Result<(), idem::Error> {
//! use idem::{Config, Fingerprint, Namespace, Transactional};
//! let key = Namespace::new("ledger")?.key("transfer-1")?;
//! let outcome = store
//!     .run_transactional(&key, Fingerprint::of(b"10"), &Config::default(), |_tx| {
//!         Box::pin(async move {
//!             // the business writes, on `_tx`
//!             Ok::<_, std::io::Error>(())
//!         })
//!     })
//!     .await?;
//! println!("{}", outcome.kind());
//! # Ok(()) }
//! ```
//!
//! What every implementation keeps (the transactional conformance suite checks each):
//! - the claim, the handler's writes and the final record commit together, or not at all;
//! - a handler's `Err` (or a panic) undoes its own writes, and the release or failure is
//!   recorded in their place, so attempts count;
//! - within a batch, one item's failure neither undoes nor blocks the other items' effects; a
//!   handler may be called again for an item whose first writes were undone with another
//!   item's, never for the item that failed;
//! - a concurrent duplicate waits for the transaction (a row lock, or SQLite's write lock) and
//!   then replays the committed result: no in-progress state is ever visible to it;
//! - outcomes come from [`policy`](crate::policy), as in store mode.

use std::fmt;
use std::future::Future;

use crate::error::Error;
use crate::executor::{Config, Outcome};
use crate::key::{Fingerprint, Key};
use crate::policy::{self, Once};
use crate::stored::Stored;

/// What a transactional handler returns: a boxed future borrowing the transaction, written
/// `|tx, i| Box::pin(async move { ... })`.
pub type TxFuture<'a, T, E> = futures_util::future::BoxFuture<'a, Result<T, E>>;

/// A store that can write its records in the same transaction as a handler's own writes.
///
/// The store begins the transaction, claims, runs the handler in it, records the outcome and
/// commits; the returned outcomes are durable together with the handler's writes.
pub trait Transactional: Send + Sync + 'static {
    /// What handlers write with: the open transaction's connection.
    type Tx: Send + 'static;

    /// Runs `handler(tx, i)` for every `items[i]` whose claim is acquired, in one transaction,
    /// and commits. Outcomes come back in the order of `items`; a key repeated in `items` runs
    /// once and is replayed after.
    ///
    /// # Errors
    /// A store error for the whole batch: nothing of it was committed (or, when the commit's
    /// answer was lost, [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable)
    /// says the outcome is unknown; the redelivery then replays or runs it). A
    /// [`Codec`](Error::Codec) error when a result cannot be encoded or a stored one decoded.
    fn run_batch_transactional<T, E, H>(
        &self,
        items: &[(Key, Fingerprint)],
        config: &Config,
        handler: H,
    ) -> impl Future<Output = Result<Vec<Outcome<T, E>>, Error>> + Send
    where
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
        H: for<'a> Fn(&'a mut Self::Tx, usize) -> TxFuture<'a, T, E> + Send + Sync + 'static;

    /// The single form of [`run_batch_transactional`](Transactional::run_batch_transactional).
    ///
    /// # Errors
    /// As [`run_batch_transactional`](Transactional::run_batch_transactional).
    fn run_transactional<T, E, H>(
        &self,
        key: &Key,
        fingerprint: Fingerprint,
        config: &Config,
        handler: H,
    ) -> impl Future<Output = Result<Outcome<T, E>, Error>> + Send
    where
        T: Stored + Send + 'static,
        E: fmt::Display + Send + 'static,
        H: for<'a> FnOnce(&'a mut Self::Tx) -> TxFuture<'a, T, E> + Send + 'static,
    {
        let once = parking_lot::Mutex::new(Some(handler));
        let handler =
            tx_handler::<Self::Tx, T, Once<E>, _>(move |tx, _| match once.lock().take() {
                Some(handler) => {
                    let fut = handler(tx);
                    Box::pin(async move { fut.await.map_err(|e| Once(Some(e))) })
                }
                None => Box::pin(std::future::ready(Err(Once(None)))),
            });
        async move {
            let items = [(key.clone(), fingerprint)];
            let outcome = self
                .run_batch_transactional(&items, config, handler)
                .await?
                .pop()
                .ok_or_else(|| {
                    Error::Store(crate::StoreError::new(
                        crate::StoreErrorKind::Backend,
                        "internal error: a transactional run gave no outcome",
                    ))
                })?;
            policy::single(outcome)
        }
    }
}

/// Gives a closure the higher-ranked signature of a batch handler (closures passed straight to
/// [`Transactional::run_batch_transactional`] get it from the bound; a closure stored first
/// needs this to be inferred right).
pub fn tx_handler<Tx, T, E, F>(f: F) -> F
where
    F: for<'a> Fn(&'a mut Tx, usize) -> TxFuture<'a, T, E>,
{
    f
}
