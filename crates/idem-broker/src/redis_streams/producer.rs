//! [`RedisStreamProducer`]: `XADD` with the message id in the `message-id` field.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{PAYLOAD_FIELD, redis_error};
use crate::error::BrokerError;
use crate::message::header;
use crate::producer::{Outgoing, RetryPolicy};

/// Appends messages to Redis streams.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::{Outgoing, redis_streams::RedisStreamProducer};
/// let producer = RedisStreamProducer::connect("redis://127.0.0.1:6379").await?;
/// let entry_id = producer.publish("orders", &Outgoing::new(&b"{\"order\": 7}"[..])).await?;
/// # let _ = entry_id; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStreamProducer {
    commands: ConnectionManager,
    retry: RetryPolicy,
}

impl std::fmt::Debug for RedisStreamProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamProducer")
            .finish_non_exhaustive()
    }
}

impl RedisStreamProducer {
    /// Connects.
    ///
    /// # Errors
    /// A [`BrokerError`] when Redis is unreachable or the URL is wrong.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        Ok(Self {
            commands: super::source::manager(url, Duration::from_secs(5)).await?,
            retry: RetryPolicy::default(),
        })
    }

    /// Sets how failed appends are retried.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Appends `message` to `stream` and returns the entry id. A retry after a lost reply
    /// appends a second entry with the same `message-id` (Redis has no publish dedup); the
    /// consumer's store recognises it.
    ///
    /// # Errors
    /// A [`BrokerError`] when every attempt failed.
    pub async fn publish(&self, stream: &str, message: &Outgoing) -> Result<String, BrokerError> {
        self.retry.run(|| self.publish_once(stream, message)).await
    }

    /// One append, without retries.
    ///
    /// # Errors
    /// As [`publish`](RedisStreamProducer::publish).
    pub async fn publish_once(
        &self,
        stream: &str,
        message: &Outgoing,
    ) -> Result<String, BrokerError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream)
            .arg("*")
            .arg(header::MESSAGE_ID)
            .arg(message.id())
            .arg(PAYLOAD_FIELD)
            .arg(&message.payload()[..]);
        for (name, value) in message.headers() {
            cmd.arg(name).arg(value);
        }
        cmd.query_async(&mut self.commands.clone())
            .await
            .map_err(|e| redis_error("appending", e))
    }
}
