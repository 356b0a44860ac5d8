//! [`KafkaProducer`]: an idempotent producer (`enable.idempotence=true`, `acks=all`) that writes
//! the message id in the `message-id` header, set once per [`Outgoing`] and the same on every
//! retry.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use super::{kafka_error, producer_config};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::header;
use crate::producer::{Outgoing, RetryPolicy};

/// Where a produced record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
}

/// Produces [`Outgoing`] messages to Kafka, waiting for every in-sync replica (`acks=all`).
///
/// librdkafka's idempotent producer retries lost requests itself without duplicates (within
/// one producer session); a publish that still fails (its 30 s delivery timeout passed, the
/// broker refused) is retried by [`publish`](KafkaProducer::publish) with the same message id,
/// and if the first attempt did land, the consumer's store recognises the copy.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::Outgoing;
/// use idem_broker::kafka::KafkaProducer;
/// let producer = KafkaProducer::connect("kafka://127.0.0.1:9092").await?;
/// producer.publish("orders", &Outgoing::new(&b"{\"amount\": 10}"[..])).await?;
/// producer.publish_keyed("orders", b"customer-7", &Outgoing::new(&b"{\"amount\": 5}"[..])).await?;
/// # Ok(()) }
/// ```
pub struct KafkaProducer {
    producer: FutureProducer,
    retry: RetryPolicy,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// Connects to the bootstrap servers of `url` and checks that a broker answers.
    ///
    /// # Errors
    /// A bad URL, or no broker answered within 10 s.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        let producer: FutureProducer = producer_config(url, Duration::from_secs(30))?
            .create()
            .map_err(|e| kafka_error("creating the Kafka producer", e))?;
        let checked = producer.clone();
        let what = format!("connecting to {}", redact(url));
        tokio::task::spawn_blocking(move || {
            checked
                .client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|_| ())
        })
        .await
        .map_err(|e| BrokerError::new(BrokerErrorKind::Protocol, format!("{what}: {e}")))?
        .map_err(|e| kafka_error(&what, e))?;
        Ok(Self {
            producer,
            retry: RetryPolicy::default(),
        })
    }

    /// Sets how failed publishes are retried (default: [`RetryPolicy::default`]).
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Produces `message` to `topic` with its [ordering key](Outgoing::with_key) as the record
    /// key; without one the partitioner spreads the records over the partitions. Retries with
    /// the same message id.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn publish(&self, topic: &str, message: &Outgoing) -> Result<Published, BrokerError> {
        self.retry.run(|| self.produce(topic, None, message)).await
    }

    /// Produces `message` to `topic` with the record key `key` (which picks the partition,
    /// and orders the records of one key for the consumer; it wins over the message's own
    /// ordering key), retrying with the same message id.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn publish_keyed(
        &self,
        topic: &str,
        key: &[u8],
        message: &Outgoing,
    ) -> Result<Published, BrokerError> {
        self.retry
            .run(|| self.produce(topic, Some(key), message))
            .await
    }

    /// One produce (record key: the message's [ordering key](Outgoing::with_key), if any),
    /// without retries of its own (librdkafka's idempotent retries within its delivery timeout
    /// still apply).
    ///
    /// # Errors
    /// As [`publish`](KafkaProducer::publish).
    pub async fn publish_once(
        &self,
        topic: &str,
        message: &Outgoing,
    ) -> Result<Published, BrokerError> {
        self.produce(topic, None, message).await
    }

    /// One produce with the record key `key`, without retries of its own.
    ///
    /// # Errors
    /// As [`publish`](KafkaProducer::publish).
    pub async fn publish_keyed_once(
        &self,
        topic: &str,
        key: &[u8],
        message: &Outgoing,
    ) -> Result<Published, BrokerError> {
        self.produce(topic, Some(key), message).await
    }

    async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        message: &Outgoing,
    ) -> Result<Published, BrokerError> {
        let mut headers =
            OwnedHeaders::new_with_capacity(message.headers().len() + 1).insert(Header {
                key: header::MESSAGE_ID,
                value: Some(message.id()),
            });
        for (name, value) in message.headers() {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&message.payload()[..])
            .headers(headers);
        if let Some(k) = key.or_else(|| message.key().map(str::as_bytes)) {
            record = record.key(k);
        }
        match self.producer.send(record, Duration::from_secs(5)).await {
            Ok(delivery) => Ok(Published {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((e, _)) => Err(kafka_error(&format!("producing to {topic:?}"), e)),
        }
    }
}
