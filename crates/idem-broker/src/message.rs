//! [`Message`]: one delivery as the runtime and the handler see it, whatever the broker: the
//! payload, the producer's message id, headers (or properties), and how many times the broker
//! has delivered it. Cheap to clone (reference-counted), so the handler gets its own copy.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// Header names idem writes on dead-lettered messages, the same on every broker.
pub mod header {
    /// Why the message was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "idem-dead-letter-reason";
    /// The queue, subject, topic or stream the message was consumed from.
    pub const DEAD_LETTER_ORIGIN: &str = "idem-dead-letter-origin";
    /// The subject a NATS message was published on (its origin is the stream): where a
    /// republished dead letter goes.
    pub const DEAD_LETTER_SUBJECT: &str = "idem-dead-letter-subject";
    /// Where brokers without a message-id property (MQTT 5, Redis Streams) carry the producer's
    /// message id.
    pub const MESSAGE_ID: &str = "message-id";
}

/// One delivery of a message.
///
/// ```
/// use idem_broker::Message;
/// let msg = Message::new("orders", &b"{\"id\": 7}"[..])
///     .with_message_id("0192b7c4-5e9a")
///     .with_header("tenant", &b"acme"[..])
///     .with_delivery_count(2);
/// assert_eq!(msg.message_id(), Some("0192b7c4-5e9a"));
/// assert_eq!(msg.header("Tenant"), Some(&b"acme"[..]));
/// assert!(msg.is_redelivery());
/// ```
#[derive(Clone)]
pub struct Message {
    payload: Bytes,
    message_id: Option<Arc<str>>,
    headers: Headers,
    delivery_count: u32,
    origin: Arc<str>,
}

/// Headers or properties of a message, in arrival order; `None` when there are none, so a
/// message without headers allocates nothing for them.
#[derive(Clone, Default)]
struct Headers(Option<Arc<Vec<Header>>>);

type Header = (Box<str>, Bytes);

impl Message {
    /// A first delivery of `payload` consumed from `origin` (a queue, subject, topic or stream
    /// name: dead-lettered messages record it).
    pub fn new(origin: impl Into<Arc<str>>, payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            message_id: None,
            headers: Headers::default(),
            delivery_count: 1,
            origin: origin.into(),
        }
    }

    /// Sets the message id the producer set at the origin.
    #[must_use]
    pub fn with_message_id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<Box<str>>, value: impl Into<Bytes>) -> Self {
        let headers = self.headers.0.get_or_insert_with(Default::default);
        Arc::make_mut(headers).push((name.into(), value.into()));
        self
    }

    /// Sets how many times the broker has delivered this message, this delivery included.
    #[must_use]
    pub fn with_delivery_count(mut self, count: u32) -> Self {
        self.delivery_count = count.max(1);
        self
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The message id the producer set (AMQP `message_id`, `Nats-Msg-Id`, the `message-id`
    /// MQTT 5 user property or Redis Streams field), if any.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Every header, in arrival order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .0
            .iter()
            .flat_map(|h| h.iter())
            .map(|(n, v)| (&**n, &v[..]))
    }

    /// How many times the broker has delivered this message, this delivery included (1 for the
    /// first). Brokers that only flag redeliveries report 2 for any redelivery.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// Whether the broker delivered this message before.
    pub fn is_redelivery(&self) -> bool {
        self.delivery_count > 1
    }

    /// The queue, subject, topic or stream this delivery came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("origin", &self.origin)
            .field("message_id", &self.message_id)
            .field("delivery_count", &self.delivery_count)
            .field("payload_len", &self.payload.len())
            .field(
                "headers",
                &self.headers().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}
