//! [`NewMessage`]: what an application enqueues, with its message id fixed at creation.

use bytes::Bytes;

use crate::error::{OutboxError, OutboxErrorKind, err};

/// The longest message id, destination or ordering key the outbox stores (bytes): AMQP carries
/// the message id in a short string (255 bytes), MySQL indexes the key as `VARCHAR(255)`.
pub const MAX_NAME_LEN: usize = 255;

/// A message to enqueue in the caller's transaction.
///
/// Its id is a fresh UUIDv7 ([`idem_broker::new_message_id`]) unless set with
/// [`with_id`](NewMessage::with_id); the relay publishes it with that id on every attempt, so
/// the broker's own dedup (`Nats-Msg-Id`) and idem consumers recognise a re-publish.
///
/// ```
/// use idem_outbox::NewMessage;
/// let msg = NewMessage::new("orders", &b"{\"order\": 7}"[..])
///     .with_key("order-7") // messages of one key are published one at a time, in order
///     .with_header("tenant", "acme");
/// assert_eq!(msg.id().len(), 36);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub(crate) id: String,
    pub(crate) destination: String,
    pub(crate) payload: Bytes,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) key: Option<String>,
}

impl NewMessage {
    /// A message for `destination` (a RabbitMQ queue, a NATS subject, an MQTT topic, a Redis
    /// stream: what [`idem_broker::AnyProducer::publish`] takes), with a fresh UUIDv7 id, no
    /// headers and no ordering key.
    pub fn new(destination: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: idem_broker::new_message_id(),
            destination: destination.into(),
            payload: payload.into(),
            headers: Vec::new(),
            key: None,
        }
    }

    /// Sets the message id (a business id, say). It must be unique in the outbox table: a
    /// second enqueue of the same id fails with a database error (the unique index), which
    /// makes enqueueing itself idempotent when the id comes from the business operation.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the ordering key (an aggregate id): the relay never has two messages of one key in
    /// flight, and publishes them in the order they were enqueued. Messages without a key are
    /// published concurrently, in no promised order.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header, published as an AMQP header, a NATS header, an MQTT 5 user property or a
    /// Redis Streams field.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The ordering key, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    pub(crate) fn check(&self) -> Result<(), OutboxError> {
        for (what, value) in [
            ("message id", Some(self.id.as_str())),
            ("destination", Some(self.destination.as_str())),
            ("ordering key", self.key.as_deref()),
        ] {
            let Some(value) = value else { continue };
            if value.is_empty() {
                return Err(err(OutboxErrorKind::Invalid, format!("empty {what}")));
            }
            if value.len() > MAX_NAME_LEN {
                return Err(err(
                    OutboxErrorKind::Invalid,
                    format!("{what} of {} bytes (at most {MAX_NAME_LEN})", value.len()),
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn headers_json(&self) -> Option<String> {
        if self.headers.is_empty() {
            None
        } else {
            serde_json::to_string(&self.headers).ok()
        }
    }
}

pub(crate) fn parse_headers(json: Option<&str>) -> Vec<(String, String)> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_and_encodes() {
        let m = NewMessage::new("q", &b"x"[..]).with_header("a", "b");
        assert!(m.check().is_ok());
        let back = parse_headers(m.headers_json().as_deref());
        assert_eq!(back, vec![("a".to_owned(), "b".to_owned())]);
        assert!(NewMessage::new("", &b"x"[..]).check().is_err());
        assert!(
            NewMessage::new("q", &b"x"[..])
                .with_key("k".repeat(256))
                .check()
                .is_err()
        );
        assert_ne!(
            NewMessage::new("q", &b""[..]).id(),
            NewMessage::new("q", &b""[..]).id()
        );
    }
}
