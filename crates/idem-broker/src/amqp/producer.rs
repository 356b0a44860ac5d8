//! [`AmqpProducer`]: persistent, mandatory publishes with publisher confirms; the message id is
//! set once by [`Outgoing`] and reused on every retry.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{amqp_error, connect_error, short};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::producer::{Outgoing, RetryPolicy};

/// Publishes to RabbitMQ with confirms, reconnecting when the connection is lost.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::{Outgoing, amqp::AmqpProducer};
/// let producer = AmqpProducer::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// // To a queue through the default exchange; retried with the same message id.
/// producer.publish("", "orders", &Outgoing::new(&b"{\"order\": 7}"[..])).await?;
/// # Ok(()) }
/// ```
pub struct AmqpProducer {
    url: String,
    conn: Mutex<Option<(Connection, Channel)>>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for AmqpProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpProducer")
            .field("url", &redact(&self.url))
            .finish_non_exhaustive()
    }
}

impl AmqpProducer {
    /// Connects and enables publisher confirms.
    ///
    /// # Errors
    /// A [`BrokerError`] when the broker is unreachable.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let producer = Self {
            url: url.to_owned(),
            conn: Mutex::new(None),
            retry: RetryPolicy::default(),
        };
        let channel = producer.open().await?;
        *producer.conn.lock().await = Some(channel);
        Ok(producer)
    }

    /// Sets how unconfirmed publishes are retried.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    async fn open(&self) -> Result<(Connection, Channel), BrokerError> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| connect_error(&self.url, e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_error("enabling publisher confirms", e))?;
        Ok((connection, channel))
    }

    /// Publishes `message` to `exchange` with `routing_key`, persistent and mandatory, and waits
    /// for the broker's confirm; retries (same message id) when it does not come.
    ///
    /// # Errors
    /// A [`BrokerError`] when every attempt failed; [`Rejected`](BrokerErrorKind::Rejected)
    /// when the message is unroutable (no queue bound) or nacked.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Outgoing,
    ) -> Result<(), BrokerError> {
        self.retry
            .run(|| self.publish_once(exchange, routing_key, message))
            .await
    }

    /// One publish attempt, without retries: for tests that need to publish a duplicate
    /// themselves.
    ///
    /// # Errors
    /// As [`publish`](AmqpProducer::publish).
    pub async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Outgoing,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        for (name, value) in message.headers() {
            headers.insert(
                short(name)?,
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        }
        let props = BasicProperties::default()
            .with_message_id(short(message.id())?)
            .with_delivery_mode(2)
            .with_headers(headers);
        let mut guard = self.conn.lock().await;
        let channel = match guard.as_ref() {
            Some((conn, ch)) if conn.status().connected() && ch.status().connected() => ch.clone(),
            _ => {
                *guard = None;
                let fresh = self.open().await?;
                let ch = fresh.1.clone();
                *guard = Some(fresh);
                ch
            }
        };
        drop(guard);
        let outcome = async {
            channel
                .basic_publish(
                    short(exchange)?,
                    short(routing_key)?,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    message.payload(),
                    props,
                )
                .await
                .map_err(|e| amqp_error("publishing", e))?
                .await
                .map_err(|e| amqp_error("waiting for the publish confirm", e))
        }
        .await;
        match outcome? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::new(
                BrokerErrorKind::Config,
                format!(
                    "unroutable: no queue bound to exchange {exchange:?} with key {routing_key:?}"
                ),
            )),
            Confirmation::Nack(_) | Confirmation::NotRequested => Err(BrokerError::new(
                BrokerErrorKind::Rejected,
                "the broker nacked the publish",
            )),
        }
    }
}
