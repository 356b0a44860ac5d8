//! NATS JetStream with `async-nats`: [`NatsSource`] consumes a durable pull consumer with
//! explicit acks, [`NatsProducer`] publishes with `Nats-Msg-Id`.
//!
//! ## At-least-once settings
//!
//! - A **durable pull consumer** with **explicit acks** (`AckPolicy::Explicit`) and an **ack
//!   wait** (default 30 s): a delivery not acked within it is redelivered.
//! - **AckSync**: every ack is sent as a request and waits for the server to confirm it, so a
//!   success is never reported for an ack that was lost (a lost one is redelivered and
//!   replayed). The requests share the client's reply inbox, unlike async-nats's `double_ack`,
//!   which subscribes a new inbox per ack.
//! - **`Nak` with delay** for redeliveries the runtime asks for (in-progress duplicates,
//!   released handlers, store errors): JetStream redelivers after the delay, nothing is held.
//! - **`+WPI` progress**: while a batch's handlers run, every delivery of the batch is sent
//!   `AckKind::Progress` every third of the ack wait, so a long handler is not redelivered to
//!   another consumer under its feet (the store's lease protects the effect anyway; this saves
//!   the redelivery).
//! - **Dead letters** are published through JetStream to a subject (default
//!   `idem.dead-letter.<stream>`) captured by a stream (default `<stream>_DLQ`, declared), with
//!   the `idem-dead-letter-reason` header, the subject it was published on in
//!   `idem-dead-letter-subject` (where [`admin::NatsAdmin`] republishes it), and a
//!   `Nats-Msg-Id` derived from the original, so a retried dead-letter publish is deduplicated
//!   too; the original is acked only after the `PubAck`.
//! - **Delivery counts** come from the message's metadata (`delivered`).
//! - **Reconnects** are the client's: it reconnects with backoff on its own; the pull stream is
//!   recreated after an error. Unacked deliveries are redelivered by the server after the ack
//!   wait, never lost.
//!
//! Producers: [`NatsProducer`] sets `Nats-Msg-Id` to the message id, so JetStream drops a
//! retried publish within the stream's duplicate window (default 2 minutes) and reports it as a
//! duplicate; past the window the consumer's store deduplicates it.
//!
//! The ack wait must exceed the time a batch takes between progress reports, and the store's
//! retention (default 7 days) must exceed `ack_wait x max_deliver` and any replay horizon.

pub mod admin;
mod producer;
mod source;

use std::time::Duration;

pub use self::producer::{NatsProducer, Published};
pub use self::source::{NatsAcker, NatsDelivery, NatsSource};

use crate::error::{BrokerError, BrokerErrorKind};

/// What [`NatsSource`] consumes and declares.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The stream.
    pub stream: String,
    /// Subjects the stream captures, when it is declared (e.g. `orders.>`).
    pub subjects: Vec<String>,
    /// The durable consumer's name.
    pub consumer: String,
    /// Redeliver deliveries not acked within this (default 30 s).
    pub ack_wait: Duration,
    /// Most unacked deliveries the server hands out (default 1000).
    pub max_ack_pending: i64,
    /// Messages pulled per request (default 256).
    pub pull_batch: usize,
    /// The stream's duplicate window for `Nats-Msg-Id`, when it is declared (default 2 min).
    pub duplicate_window: Duration,
    /// Where dead letters are published (default `idem.dead-letter.<stream>`).
    pub dead_letter_subject: String,
    /// The stream capturing dead letters (default `<stream>_DLQ`).
    pub dead_letter_stream: String,
    /// Declare the streams and the consumer on connect (default true).
    pub declare: bool,
}

impl NatsConfig {
    /// Consume `stream` (capturing `subjects`) with the durable consumer `consumer`.
    pub fn new(
        stream: impl Into<String>,
        subjects: impl Into<String>,
        consumer: impl Into<String>,
    ) -> Self {
        let stream = stream.into();
        Self {
            subjects: vec![subjects.into()],
            consumer: consumer.into(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            pull_batch: 256,
            duplicate_window: Duration::from_secs(120),
            dead_letter_subject: format!("idem.dead-letter.{stream}"),
            dead_letter_stream: format!("{stream}_DLQ"),
            declare: true,
            stream,
        }
    }

    /// Sets the ack wait.
    #[must_use]
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Sets the duplicate window of a declared stream.
    #[must_use]
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }
}

/// Maps an async-nats error: timeouts are timeouts, everything else is a connection problem
/// the client's reconnect may fix, unless the caller says it is configuration.
fn nats_error<E>(what: &str, e: E) -> BrokerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let text = e.to_string();
    let kind = if text.contains("timed out") || text.contains("timeout") {
        BrokerErrorKind::Timeout
    } else {
        BrokerErrorKind::Connection
    };
    BrokerError::new(kind, format!("{what}: {text}")).with_source(e)
}

/// As [`nats_error`], for the boxed errors some async-nats calls return.
fn nats_boxed(what: &str, e: async_nats::Error) -> BrokerError {
    let text = e.to_string();
    let kind = if text.contains("timed out") || text.contains("timeout") {
        BrokerErrorKind::Timeout
    } else {
        BrokerErrorKind::Connection
    };
    BrokerError::new(kind, format!("{what}: {text}")).with_source(e)
}
