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
//!   [`Message::delivery_count`](crate::Message::delivery_count). Classic queues only flag
//!   `redelivered`: the source counts the redeliveries it sees of each message itself (by
//!   message id, or payload when there is none; the last 8,192 to 16,384 messages redelivered),
//!   so that the count still grows (from 2) while a message keeps coming back, and the runtime's
//!   in-progress backoff, which doubles with it, still stretches out. The count restarts with
//!   the process, and each consumer counts only what it sees.
//! - **An explicit delivery limit on quorum queues** (`x-delivery-limit`, default
//!   [`DEFAULT_DELIVERY_LIMIT`] = 1,000,000): a quorum queue dead-letters a message (or drops
//!   it, with no dead-letter exchange) once it was returned that many times, nacks with requeue
//!   included. RabbitMQ 4.x applies a default limit of **20** when none is set, and idem
//!   requeues every in-progress duplicate and every message that met a store outage (fail
//!   closed, retried with backoff): a store outage of a few minutes would have the broker
//!   dead-letter messages behind idem's back, with no record and no reason. idem dead-letters
//!   itself (with the reason) when the executor's attempts run out, so the broker's limit is
//!   only a backstop and is declared high; RabbitMQ 3.x (no default limit) accepts the same
//!   argument. [`AmqpConfig::delivery_limit`] changes it, `None` declares none (the broker's
//!   default applies). A queue that already exists without the argument (or with another
//!   value) keeps its own setting: RabbitMQ refuses to change a queue's arguments, so the
//!   source declares it as it is and logs a warning; set the limit with a policy
//!   (`delivery-limit`) instead, or re-create the queue. The dead-letter queue gets the same
//!   limit, so that an operator requeueing dead letters does not lose them after 20 tries.
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
//!   confirmed and did not return it. The publisher channel is checked before each dead letter:
//!   a channel-level error closes an AMQP channel for good (publishing to a deleted exchange,
//!   say), so a closed one is opened again (with confirms) on the consuming connection, and the
//!   dead-letter exchange, queue and binding are declared again (with `declare`) when the
//!   channel was closed or the broker returned the message unroutable.
//! - **Content type**: a delivery's `content_type` property becomes the `content-type` header
//!   of its [`Message`](crate::Message) (ahead of the headers table, so it wins over a header of
//!   the same name), where handlers find it as for the other brokers; a dead letter carries it
//!   back as its `content_type` property.
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

pub mod admin;
mod producer;
mod source;

pub use self::producer::AmqpProducer;
pub use self::source::{AmqpAcker, AmqpDelivery, AmqpSource};
pub use crate::url::QueueType;

/// The [`Message`](crate::Message) header that carries a delivery's `content_type` property.
pub(crate) const CONTENT_TYPE_HEADER: &str = "content-type";

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection};

/// The `x-delivery-limit` idem declares on quorum queues: high enough that RabbitMQ never
/// dead-letters a message that idem still retries (a redelivery every 30 s for almost a year),
/// low enough to stay a backstop. See the [module docs](self).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 1_000_000;

use crate::error::{BrokerError, BrokerErrorKind};

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
    /// The `x-delivery-limit` declared on quorum queues (default [`DEFAULT_DELIVERY_LIMIT`]);
    /// `None` declares none, and the broker's default applies (20 on RabbitMQ 4.x). Ignored for
    /// classic queues.
    pub delivery_limit: Option<u32>,
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
            delivery_limit: Some(DEFAULT_DELIVERY_LIMIT),
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

    /// Sets the `x-delivery-limit` of quorum queues (`None`: declare none).
    #[must_use]
    pub fn delivery_limit(mut self, limit: Option<u32>) -> Self {
        self.delivery_limit = limit;
        self
    }

    /// The arguments of both queues: the type, and the delivery limit of quorum queues.
    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(self.queue_type.as_str().into()),
        );
        if let (QueueType::Quorum, Some(limit)) = (self.queue_type, self.delivery_limit) {
            args.insert(
                DELIVERY_LIMIT.into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
        args
    }
}

const DELIVERY_LIMIT: &str = "x-delivery-limit";

/// Declares the dead-letter exchange and queue, then the queue pointing at them. A refused
/// declaration closes the channel: the channel to go on with is returned.
async fn declare(
    connection: &Connection,
    channel: Channel,
    config: &AmqpConfig,
) -> Result<Channel, BrokerError> {
    let channel = declare_dead_letter(connection, channel, config).await?;
    let mut args = config.queue_args();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(config.dead_letter_exchange.as_bytes())),
    );
    declare_queue(connection, channel, &config.queue, args, "the queue").await
}

/// Declares the dead-letter exchange and queue, and binds them.
async fn declare_dead_letter(
    connection: &Connection,
    channel: Channel,
    config: &AmqpConfig,
) -> Result<Channel, BrokerError> {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
    let queue = short(&config.queue)?;
    let dlx = short(&config.dead_letter_exchange)?;
    let dlq = short(&config.dead_letter_queue)?;
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
        .map_err(|e| declare_error("the dead-letter exchange", &config.dead_letter_exchange, e))?;
    let channel = declare_queue(
        connection,
        channel,
        &config.dead_letter_queue,
        config.queue_args(),
        "the dead-letter queue",
    )
    .await?;
    channel
        .queue_bind(
            dlq,
            dlx,
            queue,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("binding the dead-letter queue", e))?;
    Ok(channel)
}

/// Declares a durable queue with `args`. A queue that exists with another `x-delivery-limit`
/// (declared before idem set one, or by hand) is declared again without it: RabbitMQ cannot
/// change it, and refusing to consume over it would help no one.
async fn declare_queue(
    connection: &Connection,
    channel: Channel,
    name: &str,
    args: FieldTable,
    what: &str,
) -> Result<Channel, BrokerError> {
    use lapin::options::QueueDeclareOptions;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(short(name)?, durable, args.clone())
        .await;
    let e = match declared {
        Ok(_) => return Ok(channel),
        Err(e) => e,
    };
    if !is_delivery_limit_mismatch(&e) || !args.inner().contains_key(DELIVERY_LIMIT) {
        return Err(declare_error(what, name, e));
    }
    tracing::warn!(
        queue = name,
        error = %e,
        "the queue exists with another x-delivery-limit, which RabbitMQ cannot change; \
         keeping it (set a `delivery-limit` policy, or re-create the queue: RabbitMQ 4.x \
         dead-letters a quorum queue's messages after 20 returns by default)"
    );
    // The refusal closed the channel.
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("opening a channel", e))?;
    let mut without = FieldTable::default();
    for (k, v) in args.inner() {
        if k.as_str() != DELIVERY_LIMIT {
            without.insert(k.clone(), v.clone());
        }
    }
    match channel.queue_declare(short(name)?, durable, without).await {
        Ok(_) => Ok(channel),
        // Another value than none: the queue's arguments are checked against nothing more here.
        Err(e) if is_delivery_limit_mismatch(&e) => {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| amqp_error("opening a channel", e))?;
            channel
                .queue_declare(
                    short(name)?,
                    QueueDeclareOptions {
                        passive: true,
                        ..durable
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(what, name, e))?;
            Ok(channel)
        }
        Err(e) => Err(declare_error(what, name, e)),
    }
}

fn is_delivery_limit_mismatch(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err)
        if err.get_message().as_str().contains(&format!("inequivalent arg '{DELIVERY_LIMIT}'")))
}

fn short(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s).map_err(|_| {
        BrokerError::new(
            BrokerErrorKind::Config,
            format!(
                "{} bytes is over AMQP's 255-byte limit for names and ids",
                s.len()
            ),
        )
    })
}

/// Maps a failed connection attempt to `url`, naming the problem: a host that cannot be
/// resolved or reached, a server that does not speak AMQP, a refused login, an unknown vhost.
/// The kind is [`amqp_error`]'s; the message starts with `connecting to <url>` (redacted).
fn connect_error(url: &str, e: lapin::Error) -> BrokerError {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let context = format!("connecting to {}", crate::error::redact(url));
    let uri: Option<lapin::uri::AMQPUri> = url.parse().ok();
    let (host, user, vhost) = match &uri {
        Some(u) => (
            format!("{}:{}", u.authority.host, u.authority.port),
            u.authority.userinfo.username.clone(),
            if u.vhost.is_empty() {
                "/".to_owned()
            } else {
                u.vhost.clone()
            },
        ),
        None => ("the server".to_owned(), String::new(), String::new()),
    };
    let problem = match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => {
            let said = err.get_message().as_str();
            match err.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some(format!(
                    "authentication failed for user {user:?} (RabbitMQ: {said})"
                )),
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) if said.contains("not found") => {
                    Some(format!("unknown vhost {vhost:?} (RabbitMQ: {said})"))
                }
                AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some(format!(
                    "user {user:?} may not use vhost {vhost:?} (RabbitMQ: {said})"
                )),
                _ => None,
            }
        }
        lapin::ErrorKind::IOError(io) => {
            let text = io.to_string();
            Some(if text.contains("failed to lookup address") {
                let name = uri.as_ref().map_or("", |u| u.authority.host.as_str());
                format!("cannot resolve host {name:?}: {text}")
            } else {
                format!("cannot connect to {host}: {text}")
            })
        }
        // What lapin reports when the peer closes the connection before or during the
        // handshake, or answers something that is not AMQP.
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::InvalidProtocolVersion(_) => {
            Some(format!(
                "cannot connect to {host}: the server closed the connection or does not speak \
                 AMQP 0-9-1 (is it RabbitMQ's AMQP port, reachable from here?)"
            ))
        }
        _ => None,
    };
    let mapped = amqp_error(&context, e.clone());
    match problem {
        Some(problem) => {
            BrokerError::new(mapped.kind(), format!("{context}: {problem}")).with_source(e)
        }
        None => mapped,
    }
}

/// Maps a refused declaration of `what` (`the queue`, …) named `name`: a queue or exchange that
/// exists with other arguments (type, dead-letter exchange) is named as such.
fn declare_error(what: &str, name: &str, e: lapin::Error) -> BrokerError {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    if let lapin::ErrorKind::ProtocolError(err) = e.kind()
        && matches!(
            err.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        )
    {
        let message = format!(
            "declaring {what}: {what} {name:?} exists, declared with other arguments \
             (RabbitMQ: {}); declare it as it exists, or use it without declaring",
            err.get_message()
        );
        return BrokerError::new(BrokerErrorKind::Config, message).with_source(e);
    }
    amqp_error(&format!("declaring {what}"), e)
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
