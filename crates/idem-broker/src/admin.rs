//! [`Admin`]: what tools do to a broker besides consuming (what `idem verify --broker` does
//! around its runs, and what `idem redrive` needs): count the backlog, read the dead letters with
//! their reasons, republish a dead letter where it was consumed from with the same message id,
//! and remove a destination. Each adapter has its own in its `admin` module
//! (`amqp::admin::AmqpAdmin`, `nats::admin::NatsAdmin`, `mqtt::admin::MqttAdmin`,
//! `redis_streams::admin::RedisStreamAdmin`); [`SourceConfig::admin`](crate::SourceConfig::admin)
//! opens the one of a configuration as an [`AnyAdmin`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::{Message, header};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message read back from a dead-letter destination: the message as it was consumed (payload,
/// message id, headers, origin; idem's dead-letter headers removed) and why it was
/// dead-lettered. Only the [`Admin`] that read it can [`republish`](Admin::republish) it.
pub struct DeadLetter {
    message: Message,
    reason: Option<String>,
    pub(crate) locator: Locator,
    pub(crate) reader: u64,
    /// Where to republish when it is not the origin (NATS: the subject).
    pub(crate) target: Option<String>,
}

/// Where a dead letter is, for the admin that read it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(dead_code)] // Each adapter uses its own.
pub(crate) enum Locator {
    /// A delivery tag on the admin's channel (RabbitMQ).
    Tag(u64),
    /// A sequence in the dead-letter stream (NATS).
    Sequence(u64),
    /// A packet id in the dead-letter session (MQTT), and the session's connection number.
    Packet(u16, u64),
    /// An entry id in the dead-letter stream (Redis).
    Entry(String),
}

impl DeadLetter {
    #[allow(dead_code)] // Only the adapters build them.
    pub(crate) fn new(
        message: Message,
        reason: Option<String>,
        locator: Locator,
        reader: u64,
    ) -> Self {
        Self {
            message,
            reason,
            locator,
            reader,
            target: None,
        }
    }

    /// Sets where a republish goes, when it is not the origin.
    #[allow(dead_code)] // Only NATS needs it.
    pub(crate) fn with_target(mut self, target: Option<String>) -> Self {
        self.target = target;
        self
    }

    /// The message as it was consumed: its [`origin`](Message::origin) is the queue, stream or
    /// topic it came from.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Why it was dead-lettered (the `idem-dead-letter-reason` header), or the broker's own
    /// reason for what the broker dead-lettered itself (RabbitMQ: `rabbitmq: delivery_limit`);
    /// `None` when neither says.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The message.
    pub fn into_message(self) -> Message {
        self.message
    }
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("message_id", &self.message.message_id())
            .field("origin", &self.message.origin())
            .field("reason", &self.reason)
            .field("at", &self.locator)
            .finish()
    }
}

/// A number for each admin connection: a dead letter is republished only through the one that
/// read it.
#[allow(dead_code)] // Only the adapters use it.
pub(crate) fn next_reader() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Checks that `dead_letter` was read by the admin numbered `reader`.
#[allow(dead_code)] // Only the adapters use it.
pub(crate) fn check_reader(dead_letter: &DeadLetter, reader: u64) -> Result<(), BrokerError> {
    if dead_letter.reader == reader {
        return Ok(());
    }
    Err(BrokerError::new(
        BrokerErrorKind::Config,
        "this dead letter was read by another admin connection: republish it through that one",
    ))
}

/// Whether `name` is a header idem writes on dead letters (reason, origin, subject), which a
/// republished message does not carry.
#[allow(dead_code)] // Only the adapters use it.
pub(crate) fn is_dead_letter_header(name: &str) -> bool {
    [
        header::DEAD_LETTER_REASON,
        header::DEAD_LETTER_ORIGIN,
        header::DEAD_LETTER_SUBJECT,
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Operations on a broker around what one [`SourceConfig`](crate::SourceConfig) consumes: its
/// destination (queue, stream, topic) and its dead-letter destination. Each adapter has its own
/// in its `admin` module; [`SourceConfig::admin`](crate::SourceConfig::admin) opens it as an
/// [`AnyAdmin`].
///
/// | adapter | backlog | dead letters read from | republished to |
/// |---|---|---|---|
/// | RabbitMQ | ready messages of the queue | queue `<queue>.dlq` (`basic.get`, unacked until republished) | the queue, through the default exchange |
/// | NATS JetStream | pending + unacked of the durable consumer | stream `<stream>_DLQ`, by sequence | the subject it was published on (`Nats-Msg-Id` = the message id) |
/// | MQTT 5 | unknown (`None`): a session's queue is the broker's own | the dead-letter session `<client id>.dead-letter` (unacked until republished) | the topic it was published on |
/// | Redis Streams | pending + never delivered entries of the group | stream `<stream>:dead-letter`, by entry id | the stream (`XADD`, and `XDEL` of the dead letter, in one `MULTI`) |
/// | STOMP (ActiveMQ) | messages in the queue, browsed (ActiveMQ Classic, up to `browse_limit`; other brokers `None`) | queue `DLQ.<queue>` (unacked until republished) | the queue, persistent, `idem-message-id` = the message id |
pub trait Admin: Send + Sync + 'static {
    /// Messages the broker still holds for the consumers: published and not acked (what
    /// exactly each broker can count is in the table above). `None` when the broker
    /// cannot tell without taking over the consumers' sessions (MQTT: see
    /// [`leftover`](Admin::leftover)).
    ///
    /// # Errors
    /// The broker cannot be asked, or the destination does not exist.
    fn backlog(&self) -> impl Future<Output = Result<Option<u64>, BrokerError>> + Send;

    /// What the broker still holds for the consumers once none is connected: the
    /// [`backlog`](Admin::backlog) where the broker counts it, and for MQTT the messages each
    /// persistent session is sent within `wait` (connecting as the consumer, which takes its
    /// session over: call it only when the consumers are stopped; nothing is acked, so the
    /// messages stay).
    ///
    /// # Errors
    /// The broker cannot be asked.
    fn leftover(&self, wait: Duration) -> impl Future<Output = Result<u64, BrokerError>> + Send {
        let _ = wait;
        async {
            self.backlog().await?.ok_or_else(|| {
                BrokerError::new(
                    BrokerErrorKind::Protocol,
                    "this broker cannot tell what it holds",
                )
            })
        }
    }

    /// Reads up to `max` dead letters, oldest first, with their reasons. They stay in the
    /// dead-letter destination until [`republish`](Admin::republish)ed: a later call on the same
    /// admin returns the next ones, and the ones not republished are there for the next admin
    /// (RabbitMQ and MQTT hold them unacked until this admin is closed; MQTT brokers hand out
    /// only as many as their in-flight window allows, Mosquitto 20 by default).
    ///
    /// # Errors
    /// The broker cannot be asked.
    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, BrokerError>> + Send;

    /// Publishes a dead letter's message back to where it was consumed from, with the same
    /// message id (so the consumer's store recognises it), waits for the broker to confirm it,
    /// and only then removes the dead letter. A crash in between leaves both: republishing
    /// again is a duplicate the store recognises, never a loss.
    ///
    /// # Errors
    /// The publish was not confirmed (the dead letter stays), the dead letter was read by
    /// another admin, or NATS JetStream dropped the copy as a duplicate of the original within
    /// the stream's duplicate window ([`Rejected`](BrokerErrorKind::Rejected): try again once
    /// the window has passed).
    fn republish(
        &self,
        dead_letter: DeadLetter,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Deletes the destination and its dead-letter destination with everything they hold
    /// (RabbitMQ: the queue, `<queue>.dlq` and `<queue>.dlx`; NATS: both streams; MQTT: the
    /// consumer's and the dead-letter persistent sessions; Redis: both stream keys). What does
    /// not exist is not an error.
    ///
    /// # Errors
    /// The broker refused, or cannot be asked.
    fn cleanup(&self) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Closes the admin's connections; dead letters read and not republished go back to the
    /// dead-letter destination.
    fn close(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// The object-safe mirror of [`Admin`].
trait DynAdmin: Send + Sync + 'static {
    fn backlog(&self) -> BoxFuture<'_, Result<Option<u64>, BrokerError>>;
    fn leftover(&self, wait: Duration) -> BoxFuture<'_, Result<u64, BrokerError>>;
    fn dead_letters(&self, max: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, BrokerError>>;
    fn republish(&self, dead_letter: DeadLetter) -> BoxFuture<'_, Result<(), BrokerError>>;
    fn cleanup(&self) -> BoxFuture<'_, Result<(), BrokerError>>;
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
}

impl<A: Admin> DynAdmin for A {
    fn backlog(&self) -> BoxFuture<'_, Result<Option<u64>, BrokerError>> {
        Box::pin(Admin::backlog(self))
    }
    fn leftover(&self, wait: Duration) -> BoxFuture<'_, Result<u64, BrokerError>> {
        Box::pin(Admin::leftover(self, wait))
    }
    fn dead_letters(&self, max: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, BrokerError>> {
        Box::pin(Admin::dead_letters(self, max))
    }
    fn republish(&self, dead_letter: DeadLetter) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(Admin::republish(self, dead_letter))
    }
    fn cleanup(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(Admin::cleanup(self))
    }
    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(Admin::close(*self))
    }
}

/// Any adapter's [`Admin`] behind one type: what
/// [`SourceConfig::admin`](crate::SourceConfig::admin) returns.
pub struct AnyAdmin {
    inner: Box<dyn DynAdmin>,
    name: &'static str,
}

impl AnyAdmin {
    /// Erases the type of `admin`.
    pub fn new<A: Admin>(admin: A) -> Self {
        Self {
            inner: Box::new(admin),
            name: std::any::type_name::<A>()
                .rsplit("::")
                .next()
                .unwrap_or("admin"),
        }
    }

    /// The type name of the admin inside, for logs.
    pub fn type_name(&self) -> &str {
        self.name
    }
}

impl fmt::Debug for AnyAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnyAdmin").field(&self.name).finish()
    }
}

impl Admin for AnyAdmin {
    fn backlog(&self) -> impl Future<Output = Result<Option<u64>, BrokerError>> + Send {
        self.inner.backlog()
    }
    fn leftover(&self, wait: Duration) -> impl Future<Output = Result<u64, BrokerError>> + Send {
        self.inner.leftover(wait)
    }
    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, BrokerError>> + Send {
        self.inner.dead_letters(max)
    }
    fn republish(
        &self,
        dead_letter: DeadLetter,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        self.inner.republish(dead_letter)
    }
    fn cleanup(&self) -> impl Future<Output = Result<(), BrokerError>> + Send {
        self.inner.cleanup()
    }
    fn close(self) -> impl Future<Output = ()> + Send {
        self.inner.close()
    }
}
