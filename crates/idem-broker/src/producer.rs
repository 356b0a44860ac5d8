//! The producer side: [`Outgoing`] fixes a message's id once, at the origin, so that every
//! retry of a publish carries the same id and the consumer (and the broker's own publish dedup,
//! where there is one) sees a duplicate rather than a new message. Each adapter's producer
//! publishes an [`Outgoing`] with confirms and retries it with [`RetryPolicy`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idem::Backoff;

use crate::error::BrokerError;

/// A message to publish, with its id fixed at creation.
///
/// ```
/// use idem_broker::Outgoing;
/// let msg = Outgoing::new(&b"{\"amount\": 10}"[..]).with_header("tenant", "acme");
/// let retry = msg.clone(); // a retry reuses the same id
/// assert_eq!(msg.id(), retry.id());
/// assert_eq!(msg.id().len(), 36);
/// ```
#[derive(Clone, Debug)]
pub struct Outgoing {
    id: Arc<str>,
    payload: Bytes,
    headers: Vec<(String, String)>,
    key: Option<Arc<str>>,
}

impl Outgoing {
    /// A message with a fresh UUIDv7 id (time-ordered, so stores index it well).
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self::with_id(new_message_id(), payload)
    }

    /// A message with an id chosen by the caller (a business id, an outbox row id).
    pub fn with_id(id: impl Into<Arc<str>>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: id.into(),
            payload: payload.into(),
            headers: Vec::new(),
            key: None,
        }
    }

    /// Adds a header (AMQP header, NATS header, MQTT 5 user property, Redis Streams field).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the message's ordering key. Kafka sends it as the record key, which picks the
    /// partition: the messages of one key land in one partition, in the order they were
    /// produced, and a consumer with [`Order::PerKey`](crate::kafka::Order) runs them in
    /// that order. The other adapters do not send it (add a header if consumers need it).
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The ordering key, if any (see [`with_key`](Outgoing::with_key)).
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }
}

/// A new UUIDv7 (RFC 9562) as text: 48 bits of Unix milliseconds, then random bits.
pub fn new_message_id() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rand_a = fastrand::u16(..) & 0x0fff;
    let rand_b = fastrand::u64(..) & 0x3fff_ffff_ffff_ffff;
    let hi = (millis << 16) | 0x7000 | u64::from(rand_a);
    let lo = 0x8000_0000_0000_0000 | rand_b;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

/// How a producer retries a publish that was not confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 5).
    pub attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
        }
    }
}

impl RetryPolicy {
    /// `attempts` tries with the default backoff.
    pub fn attempts(attempts: u32) -> Self {
        Self {
            attempts: attempts.max(1),
            ..Self::default()
        }
    }

    /// Runs `op` until it succeeds, fails for good, or attempts run out. Every attempt
    /// publishes the same message (same id), so a publish that did land before its confirm was
    /// lost is a duplicate the consumer recognises.
    ///
    /// # Errors
    /// The last error.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, BrokerError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            match op().await {
                Err(e) if e.is_transient() && n < self.attempts => {
                    tracing::warn!(error = %e, attempt = n, "publish not confirmed; retrying with the same message id");
                    tokio::time::sleep(self.backoff.delay(n)).await;
                }
                out => return out,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_uuid_v7_and_ordered() {
        let a = new_message_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_message_id();
        assert!(a < b, "{a} then {b}");
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(Outgoing::new(&b"x"[..]).id(), Outgoing::new(&b"x"[..]).id());
    }

    #[tokio::test]
    async fn retries_reuse_the_message() {
        let msg = Outgoing::new(&b"x"[..]);
        let mut seen = Vec::new();
        let policy = RetryPolicy {
            attempts: 3,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(2)),
        };
        let out: Result<(), _> = policy
            .run(|| {
                seen.push(msg.id().to_owned());
                async { Err(BrokerError::new(crate::BrokerErrorKind::Connection, "down")) }
            })
            .await;
        assert!(out.is_err());
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|id| id == msg.id()));
    }
}
