//! [`MqttProducer`]: QoS 1 publishes carrying the message id as the `message-id` user property,
//! each confirmed by its `PUBACK`.

use rumqttc::v5::mqttbytes::v5::PublishProperties;

use super::publisher::ConfirmedPublisher;
use crate::error::BrokerError;
use crate::message::header;
use crate::producer::{Outgoing, RetryPolicy};

/// Publishes to an MQTT 5 broker at QoS 1, waiting for each `PUBACK`, one at a time.
///
/// A `PUBACK` saying "no matching subscribers" is an error: MQTT would drop the message. Start
/// the consumer (its persistent session) before publishing.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::{Outgoing, mqtt::MqttProducer};
/// let producer = MqttProducer::connect("mqtt://127.0.0.1:1883").await?;
/// producer.publish("orders/created", &Outgoing::new(&b"{\"order\": 7}"[..])).await?;
/// # Ok(()) }
/// ```
pub struct MqttProducer {
    publisher: ConfirmedPublisher,
    retry: RetryPolicy,
}

impl std::fmt::Debug for MqttProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttProducer").finish_non_exhaustive()
    }
}

impl MqttProducer {
    /// Connects a clean session.
    ///
    /// # Errors
    /// A [`BrokerError`] when the broker is unreachable or the URL is wrong.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        Ok(Self {
            publisher: ConfirmedPublisher::connect(url).await?,
            retry: RetryPolicy::default(),
        })
    }

    /// Sets how unconfirmed publishes are retried.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Publishes `message` to `topic` at QoS 1 and waits for the `PUBACK`; retries (same
    /// message id) when it does not come.
    ///
    /// # Errors
    /// A [`BrokerError`] when every attempt failed, or the broker refused the message.
    pub async fn publish(&self, topic: &str, message: &Outgoing) -> Result<(), BrokerError> {
        self.retry.run(|| self.publish_once(topic, message)).await
    }

    /// One publish attempt, without retries.
    ///
    /// # Errors
    /// As [`publish`](MqttProducer::publish).
    pub async fn publish_once(&self, topic: &str, message: &Outgoing) -> Result<(), BrokerError> {
        let mut props = PublishProperties::default();
        props
            .user_properties
            .push((header::MESSAGE_ID.to_owned(), message.id().to_owned()));
        props
            .user_properties
            .extend(message.headers().iter().cloned());
        self.publisher
            .publish(topic, message.payload().clone(), props)
            .await
    }
}
