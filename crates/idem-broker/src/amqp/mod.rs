//! RabbitMQ (AMQP 0-9-1) with `lapin`: [`AmqpSource`] consumes a queue with manual acks,
//! [`AmqpProducer`] publishes with confirms.
//!
//! ## At-least-once settings
//!
//! - **Manual acks** (`no_ack = false`) and a bounded **prefetch** (`basic.qos`, default 256):
//!   the broker holds every delivery until idem acks it, and never sends more than the prefetch
//!   unacked at once.
//! - **Quorum queues** by default (`x-queue-type = quorum`): replicated, and they count
//!   redeliveries in the `x-delivery-count` header, which becomes
//!   [`Message::delivery_count`](crate::Message::delivery_count) (classic queues only flag
//!   `redelivered`, reported as 2).
//! - **Acks are batched**: acked deliveries older than every delivery still being processed go
//!   out as one `basic.ack(multiple = true)`; acks of a younger batch that finished first wait
//!   (unsent, still counted against the prefetch) for the older batch's decision and then go out
//!   with it. A delivery held for a delayed nack is never covered: acks behind it go one by one.
//!   Until its frame is sent an ack can be lost with the connection; the delivery then comes
//!   back and the store replays it.
//! - **Delayed nack**: RabbitMQ has no delayed requeue, so a delivery to retry later is held
//!   (still unacked, still counted against the prefetch) for the delay and then
//!   `basic.nack(requeue = true)`. If the consumer dies meanwhile, the broker requeues it anyway.
//! - **Dead letters**: a `direct` exchange `<queue>.dlx` bound to a queue `<queue>.dlq` is
//!   declared, and the main queue points its `x-dead-letter-exchange` at it (so messages the
//!   broker itself dead-letters, e.g. past a quorum queue's `x-delivery-limit`, land there too).
//!   idem publishes dead letters there itself, with the `idem-dead-letter-reason` header,
//!   **mandatory** and with **publisher confirms**, and acks the original only after the broker
//!   confirmed and did not return it.
//! - **Long handlers**: RabbitMQ closes the channel of a consumer that keeps a delivery unacked
//!   longer than its `consumer_timeout` (30 minutes by default), which requeues everything the
//!   channel held; raise it on the broker for handlers that run longer.
//! - **Reconnects**: a lost connection poisons its deliveries (acks on them fail and the broker
//!   requeues them); the source reconnects with backoff, re-declares the topology and consumes
//!   again. Nothing is acked twice: delivery tags never cross connections.
//!
//! Producers: [`AmqpProducer`] sets `message_id` once (from [`Outgoing`](crate::Outgoing)),
//! publishes persistent messages with mandatory and confirms, and retries with the same id.
//! RabbitMQ has no publish dedup, so a retry after a lost confirm is a duplicate the consumer
//! replays.

mod producer;
mod source;

pub use self::producer::AmqpProducer;
pub use self::source::{AmqpAcker, AmqpDelivery, AmqpSource};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::error::{BrokerError, BrokerErrorKind};

/// The kind of queue to declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// A quorum queue (the default): replicated, with delivery counts.
    #[default]
    Quorum,
    /// A classic durable queue.
    Classic,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// What [`AmqpSource`] consumes and declares.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The queue to consume.
    pub queue: String,
    /// Most unacked deliveries at once (`basic.qos`, default 256).
    pub prefetch: u16,
    /// The queue type to declare (default quorum).
    pub queue_type: QueueType,
    /// Declare the queue, the dead-letter exchange and queue on connect (default true). With
    /// false, they must exist.
    pub declare: bool,
    /// The dead-letter exchange (default `<queue>.dlx`).
    pub dead_letter_exchange: String,
    /// The dead-letter queue bound to it (default `<queue>.dlq`).
    pub dead_letter_queue: String,
    /// The consumer tag (default `idem-<pid>`).
    pub consumer_tag: String,
}

impl AmqpConfig {
    /// Consume `queue`, with dead letters to `<queue>.dlx` / `<queue>.dlq`.
    pub fn new(queue: impl Into<String>) -> Self {
        let queue = queue.into();
        Self {
            dead_letter_exchange: format!("{queue}.dlx"),
            dead_letter_queue: format!("{queue}.dlq"),
            queue,
            prefetch: 256,
            queue_type: QueueType::default(),
            declare: true,
            consumer_tag: format!("idem-{}", std::process::id()),
        }
    }

    /// Sets the prefetch.
    #[must_use]
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets the queue type.
    #[must_use]
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }
}

/// Declares the dead-letter exchange and queue, then the queue pointing at them.
async fn declare(channel: &lapin::Channel, config: &AmqpConfig) -> Result<(), BrokerError> {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    let queue = short(&config.queue)?;
    let dlx = short(&config.dead_letter_exchange)?;
    let dlq = short(&config.dead_letter_queue)?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut typed = FieldTable::default();
    typed.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(config.queue_type.as_str().into()),
    );
    channel
        .exchange_declare(
            dlx.clone(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("declaring the dead-letter exchange", e))?;
    channel
        .queue_declare(dlq.clone(), durable, typed.clone())
        .await
        .map_err(|e| amqp_error("declaring the dead-letter queue", e))?;
    channel
        .queue_bind(
            dlq,
            dlx.clone(),
            queue.clone(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("binding the dead-letter queue", e))?;
    let mut args = typed;
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(config.dead_letter_exchange.as_bytes())),
    );
    channel
        .queue_declare(queue, durable, args)
        .await
        .map_err(|e| amqp_error("declaring the queue", e))?;
    Ok(())
}

fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|_| {
        BrokerError::config(format!(
            "{} bytes is over AMQP's 255-byte limit for names and ids",
            s.len()
        ))
    })
}

/// Maps a lapin error: protocol-level refusals (unknown queue, argument mismatch, access) are
/// configuration errors; the rest are connection errors, which reconnecting may fix.
fn amqp_error(what: &str, e: lapin::Error) -> BrokerError {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let kind = match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => match err.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::NOTFOUND
                | AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::PRECONDITIONFAILED,
            ) => BrokerErrorKind::Config,
            // A hard error closes the connection (an operator forcing it closed, the broker
            // shutting down): reconnecting may fix it.
            _ => BrokerErrorKind::Connection,
        },
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::SerialisationError(_) => {
            BrokerErrorKind::Protocol
        }
        _ => BrokerErrorKind::Connection,
    };
    BrokerError::new(kind, format!("{what}: {e}")).with_source(e)
}
