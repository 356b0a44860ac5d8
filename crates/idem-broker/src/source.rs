//! The two traits an adapter implements: a [`Source`] receives batches of deliveries, an
//! [`Acker`] settles them (ack, delayed nack, dead-letter). The [`Consumer`](crate::Consumer)
//! drives both and decides, from the store's outcome, which settlement each delivery gets.
//!
//! Rules every adapter keeps (docs/design.md, section 6): nothing is acked unless the runtime asks;
//! a delivery that is never settled (the process died, the future was dropped) stays unacked at
//! the broker and is redelivered; [`Acker::dead_letter`] acks only after the dead-letter publish
//! is confirmed.

use std::future::Future;
use std::time::Duration;

use crate::error::BrokerError;
use crate::message::Message;

/// A delivery: the [`Message`] and the adapter's handle to settle it.
#[derive(Debug)]
pub struct Incoming<D> {
    /// What the handler sees.
    pub message: Message,
    /// What the [`Acker`] needs to settle it (a delivery tag, a reply subject, an entry id).
    pub delivery: D,
}

impl<D> Incoming<D> {
    /// A delivery.
    pub fn new(message: Message, delivery: D) -> Self {
        Self { message, delivery }
    }
}

/// Where deliveries come from: one consumer on one queue, subject, topic or stream.
///
/// `receive` should be cancel-safe: if its future is dropped (at shutdown), no delivery may be
/// lost; at worst it stays unacked at the broker and is redelivered.
pub trait Source: Send + 'static {
    /// The adapter's handle to settle one delivery.
    type Delivery: Send + Sync + 'static;
    /// Settles deliveries; shared by the runtime's concurrent batches.
    type Acker: Acker<Delivery = Self::Delivery>;

    /// A handle that settles this source's deliveries.
    fn acker(&self) -> Self::Acker;

    /// Waits for at least one delivery and returns up to `max` of them (those ready now:
    /// a source does not wait to fill a batch). Reconnects with backoff by itself when the
    /// connection is lost.
    ///
    /// # Errors
    /// A [`BrokerError`] when the broker cannot be reached for now; the runtime backs off and
    /// calls again.
    fn receive(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Incoming<Self::Delivery>>, BrokerError>> + Send;

    /// Stops consuming and closes the connection. Unsettled deliveries go back to the broker
    /// (requeued, redelivered after the ack wait, or left pending for a claim).
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Settles deliveries. Clones share the connection.
pub trait Acker: Clone + Send + Sync + 'static {
    /// The adapter's handle to settle one delivery.
    type Delivery: Send + Sync + 'static;

    /// Acks deliveries whose record is durable (completed, or replayed). Adapters ack many at
    /// once where the broker allows it.
    ///
    /// # Errors
    /// A [`BrokerError`] when an ack could not be sent: the message is redelivered, and the
    /// store replays its result then.
    fn ack(
        &self,
        deliveries: Vec<Self::Delivery>,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Has the broker deliver again after `delay`, without acking: in-progress duplicates,
    /// released handlers, store failures.
    ///
    /// # Errors
    /// A [`BrokerError`] when the nack could not be sent; the broker redelivers anyway (after
    /// its ack wait, or when the connection closes).
    fn nack(
        &self,
        delivery: Self::Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Publishes `message` to the dead-letter destination with `reason`, waits for the broker
    /// to confirm it, then acks the delivery.
    ///
    /// # Errors
    /// A [`BrokerError`] when the publish was not confirmed: the delivery is then not acked.
    fn dead_letter(
        &self,
        delivery: Self::Delivery,
        message: &Message,
        reason: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Tells the broker these deliveries are still being worked on, so that it does not
    /// redeliver them while a handler runs (JetStream `+WPI`, Redis `XCLAIM` to self). The
    /// default does nothing: brokers whose deliveries do not time out need nothing.
    ///
    /// # Errors
    /// A [`BrokerError`] when the broker cannot be told; the runtime keeps going.
    fn progress(
        &self,
        deliveries: &[&Self::Delivery],
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        let _ = deliveries;
        async { Ok(()) }
    }

    /// How often [`progress`](Acker::progress) should be called while handlers run, if at all.
    fn progress_interval(&self) -> Option<Duration> {
        None
    }
}
