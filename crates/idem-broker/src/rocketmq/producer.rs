//! [`RocketMqProducer`]: publishes an [`Outgoing`] with its id in the `message-id` property and
//! in `KEYS`, set once, so every retry carries the same id.

use std::sync::Arc;

use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::result::{SendResult, SendStatus};

use super::source::start_producer;
use super::{Domain, client_error};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::header;
use crate::producer::{Outgoing, RetryPolicy};

/// Publishes to RocketMQ topics, waiting for the broker's `SEND_OK` for each message.
///
/// RocketMQ has no publish dedup: a retried publish whose first attempt did land is stored
/// twice, with the same `message-id` (and `KEYS`), and the consumer's store recognises the copy.
/// The client's own send retries are off (this producer's [`RetryPolicy`] retries instead).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::{Outgoing, rocketmq::RocketMqProducer};
/// let producer = RocketMqProducer::connect("rocketmq://127.0.0.1:9876").await?;
/// producer.publish("orders", &Outgoing::new(&b"{\"order\": 7}"[..])).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RocketMqProducer {
    producer: Arc<DefaultMQProducer>,
    domain: Arc<Domain>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for RocketMqProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocketMqProducer").finish_non_exhaustive()
    }
}

/// Checks a send result: anything but `SEND_OK` (a flush or replica timeout) is not confirmed.
pub(super) fn check_sent(result: Option<SendResult>, what: &str) -> Result<(), BrokerError> {
    match result {
        Some(r) if r.send_status == SendStatus::SendOk => Ok(()),
        Some(r) => Err(BrokerError::new(
            BrokerErrorKind::Timeout,
            format!("publishing {what}: the broker answered {:?}", r.send_status),
        )),
        None => Err(BrokerError::new(
            BrokerErrorKind::Protocol,
            format!("publishing {what}: no send result"),
        )),
    }
}

impl RocketMqProducer {
    /// Starts a client runtime of its own and a producer (group `idem-producer`) on the name
    /// servers of `url`.
    ///
    /// # Errors
    /// A [`BrokerError`] when the URL is wrong or the client cannot start.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let domain = Domain::new("producer", 1, std::time::Duration::from_secs(30))?;
        let producer = start_producer(&domain, url, "idem-producer").await?;
        Ok(Self {
            producer: Arc::new(producer),
            domain,
            retry: RetryPolicy::default(),
        })
    }

    /// Sets how unconfirmed publishes are retried.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Publishes `message` to `topic` and waits for `SEND_OK`; retries (same id) when it does
    /// not come.
    ///
    /// # Errors
    /// A [`BrokerError`] when every attempt failed (a topic the broker will not create, say).
    pub async fn publish(&self, topic: &str, message: &Outgoing) -> Result<(), BrokerError> {
        self.retry.run(|| self.publish_once(topic, message)).await
    }

    /// One publish attempt, without retries. The id goes into the `message-id` property and
    /// into `KEYS` (the broker indexes it: the message can be queried by it); an empty id (which
    /// RocketMQ cannot carry in a property) is marked with `message-id-empty`, so that the
    /// consumer sees an unusable id rather than the client's `UNIQ_KEY`. Headers become user
    /// properties.
    ///
    /// # Errors
    /// As [`publish`](RocketMqProducer::publish), for this one attempt.
    pub async fn publish_once(&self, topic: &str, message: &Outgoing) -> Result<(), BrokerError> {
        let mut out = super::new_message(topic, message.payload().clone())?;
        for (name, value) in message.headers() {
            out.put_property(name.as_str().into(), value.as_str().into());
        }
        if message.id().is_empty() {
            // RocketMQ drops empty property values: mark the empty id instead.
            out.put_property(super::EMPTY_ID_PROPERTY.into(), "true".into());
        } else {
            out.put_property(header::MESSAGE_ID.into(), message.id().into());
            out.set_keys(message.id().into());
        }
        let producer = Arc::clone(&self.producer);
        let result = self
            .domain
            .run(async move { producer.send_with_timeout(out, 5000).await })
            .await?
            .map_err(|e| client_error("publishing", e))?;
        check_sent(result, "a message")
    }
}
