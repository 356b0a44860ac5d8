//! [`NatsProducer`]: JetStream publishes with `Nats-Msg-Id` = the message id, so the server
//! drops retries within the stream's duplicate window.

use async_nats::jetstream::{self, message::PublishMessage as Publish};

use super::nats_error;
use crate::error::BrokerError;
use crate::producer::{Outgoing, RetryPolicy};

/// What JetStream answered to a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// The stream sequence of the message.
    pub sequence: u64,
    /// The server recognised the `Nats-Msg-Id` and did not store the message again.
    pub duplicate: bool,
}

/// Publishes to JetStream, waiting for each `PubAck`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::{Outgoing, nats::NatsProducer};
/// let producer = NatsProducer::connect("nats://127.0.0.1:4222").await?;
/// let msg = Outgoing::new(&b"{\"order\": 7}"[..]);
/// producer.publish("orders.created", &msg).await?;
/// assert!(producer.publish("orders.created", &msg).await?.duplicate); // dropped by the server
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsProducer {
    js: jetstream::Context,
    retry: RetryPolicy,
}

impl std::fmt::Debug for NatsProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsProducer").finish_non_exhaustive()
    }
}

impl NatsProducer {
    /// Connects.
    ///
    /// # Errors
    /// A [`BrokerError`] when the server is unreachable.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        Ok(Self {
            js: jetstream::new(super::source::client(url).await?),
            retry: RetryPolicy::default(),
        })
    }

    /// Sets how unconfirmed publishes are retried.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Publishes `message` to `subject` and waits for the `PubAck`; retries (same
    /// `Nats-Msg-Id`) when it does not come.
    ///
    /// # Errors
    /// A [`BrokerError`] when every attempt failed (no stream captures the subject, say).
    pub async fn publish(
        &self,
        subject: &str,
        message: &Outgoing,
    ) -> Result<Published, BrokerError> {
        self.retry.run(|| self.publish_once(subject, message)).await
    }

    /// One publish attempt, without retries.
    ///
    /// # Errors
    /// As [`publish`](NatsProducer::publish).
    pub async fn publish_once(
        &self,
        subject: &str,
        message: &Outgoing,
    ) -> Result<Published, BrokerError> {
        let mut publish = Publish::build()
            .payload(message.payload().clone())
            .message_id(message.id());
        for (name, value) in message.headers() {
            publish = publish.header(name.as_str(), value.as_str());
        }
        let ack = self
            .js
            .send_publish(subject.to_owned(), publish)
            .await
            .map_err(|e| nats_error("publishing", e))?
            .await
            .map_err(|e| nats_error("waiting for the PubAck", e))?;
        Ok(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}
