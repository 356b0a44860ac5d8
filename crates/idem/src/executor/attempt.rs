//! [`Attempt`]: what a handler is told about the claim it runs under.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use crate::key::Key;
use crate::record::Token;
use crate::store::Acquisition;

/// Shared between a running handler and its heartbeat: set once the lease is known lost.
#[derive(Debug, Default)]
pub(crate) struct LeaseSignal {
    lost: AtomicBool,
    notify: Notify,
}

impl LeaseSignal {
    pub(crate) fn set_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// The claim a handler runs under.
///
/// Pass [`idempotency_key`](Attempt::idempotency_key) to downstream services that honour one
/// (payment APIs, `Idempotency-Key` HTTP headers): that closes store mode's window, where a
/// crash after the effect and before `complete` makes the redelivery run the effect again.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub(crate) key: Key,
    pub(crate) token: Token,
    pub(crate) number: u32,
    pub(crate) acquisition: Acquisition,
    pub(crate) signal: Arc<LeaseSignal>,
}

impl Attempt {
    /// The key being processed.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The key as one string (`namespace:id`), to pass downstream as an idempotency key.
    pub fn idempotency_key(&self) -> String {
        self.key.to_string()
    }

    /// The fencing token of this claim.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Which attempt this is, from 1.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// How the claim was acquired; [`Acquisition::Takeover`] means a previous owner may have
    /// produced the effect already.
    pub fn acquisition(&self) -> Acquisition {
        self.acquisition
    }

    /// Whether the heartbeat found the lease lost. A long handler should check it and stop: its
    /// result will not be recorded.
    pub fn is_lease_lost(&self) -> bool {
        self.signal.is_lost()
    }

    /// Resolves when the lease is lost; use it in a `select!` to abandon work early.
    pub async fn lease_lost(&self) {
        loop {
            let notified = self.signal.notify.notified();
            if self.signal.is_lost() {
                return;
            }
            notified.await;
        }
    }
}
