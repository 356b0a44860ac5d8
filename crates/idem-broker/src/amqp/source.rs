//! [`AmqpSource`]: one consumer on one queue, reconnecting with backoff; [`AmqpAcker`]: batched
//! acks, held-then-requeued nacks, confirmed dead letters.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{
    AmqpConfig, CONTENT_TYPE_HEADER, amqp_error, connect_error, declare, declare_dead_letter, short,
};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};
use crate::source::{Acker, Incoming, Source};

/// Consumes one RabbitMQ queue with manual acks. See the [module docs](super).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::amqp::{AmqpConfig, AmqpSource};
/// let source = AmqpSource::connect("amqp://guest:guest@127.0.0.1:5672/%2f", AmqpConfig::new("orders")).await?;
/// # let _ = source; Ok(()) }
/// ```
pub struct AmqpSource {
    url: String,
    config: Arc<AmqpConfig>,
    origin: Arc<str>,
    live: Option<Live>,
    publisher: Arc<Mutex<Option<DeadLetterChannel>>>,
    redeliveries: Redeliveries,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSource")
            .field("url", &redact(&self.url))
            .field("queue", &self.config.queue)
            .field("connected", &self.live.is_some())
            .finish()
    }
}

struct Live {
    connection: Arc<Connection>,
    consumer: lapin::Consumer,
    channel: Arc<ChannelAcks>,
}

/// The channel dead letters are published on (confirm mode), on the consuming connection.
struct DeadLetterChannel {
    connection: Arc<Connection>,
    channel: Channel,
    /// The broker returned a dead letter unroutable: declare the dead-letter topology again
    /// before the next one.
    redeclare: bool,
}

/// How many redeliveries of each message this source has seen, for queues that only flag
/// `redelivered` (classic queues): bounded, two generations of at most [`REDELIVERIES_KEPT`]
/// messages each (the older is forgotten when the younger fills up), so a message that keeps
/// coming back keeps counting up while the least recently redelivered are forgotten.
#[derive(Default)]
struct Redeliveries {
    young: HashMap<idem::Fingerprint, u32>,
    old: HashMap<idem::Fingerprint, u32>,
}

const REDELIVERIES_KEPT: usize = 8192;

impl Redeliveries {
    /// The delivery count of a redelivery of the message identified by `id`.
    fn next(&mut self, id: idem::Fingerprint) -> u32 {
        let seen = self
            .young
            .remove(&id)
            .or_else(|| self.old.remove(&id))
            .unwrap_or(1);
        let count = seen.saturating_add(1);
        if self.young.len() >= REDELIVERIES_KEPT {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, count);
        count
    }
}

/// A consuming channel and the state of every delivery tag on it not settled at the broker
/// yet, so that one `multiple` ack can cover many tags without covering one still in hand.
#[derive(Debug)]
struct ChannelAcks {
    channel: Channel,
    // Held across the frames it decides, so that frames go out in the order of the decisions.
    tags: Mutex<Tags>,
}

/// Unsettled delivery tags of a channel, by state.
#[derive(Debug, Default)]
struct Tags {
    /// Handed to the runtime, no decision yet.
    processing: BTreeSet<u64>,
    /// Waiting for a delayed nack.
    held: BTreeSet<u64>,
    /// Acked by the runtime, frame not sent yet: waiting for an older tag's decision so that one
    /// `multiple` ack covers them all.
    done: BTreeSet<u64>,
}

/// One RabbitMQ delivery: its tag on its channel.
#[derive(Debug)]
pub struct AmqpDelivery {
    tag: u64,
    channel: Arc<ChannelAcks>,
}

/// Settles [`AmqpSource`] deliveries.
#[derive(Clone)]
pub struct AmqpAcker {
    config: Arc<AmqpConfig>,
    publisher: Arc<Mutex<Option<DeadLetterChannel>>>,
}

impl std::fmt::Debug for AmqpAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpAcker")
            .field("queue", &self.config.queue)
            .field("dead_letter_exchange", &self.config.dead_letter_exchange)
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// Connects, declares the queue and its dead-letter exchange and queue (unless
    /// `config.declare` is false), and starts consuming.
    ///
    /// # Errors
    /// A [`BrokerError`] when the broker is unreachable, refuses the credentials, or the queue
    /// exists with other arguments.
    pub async fn connect(url: &str, config: AmqpConfig) -> Result<Self, BrokerError> {
        let mut source = Self {
            url: url.to_owned(),
            origin: config.queue.as_str().into(),
            config: Arc::new(config),
            live: None,
            publisher: Arc::new(Mutex::new(None)),
            redeliveries: Redeliveries::default(),
        };
        source.reconnect().await?;
        Ok(source)
    }

    async fn reconnect(&mut self) -> Result<(), BrokerError> {
        if let Some(old) = self.live.take() {
            // Whatever it held is requeued by the broker when the connection goes.
            let _ = old.connection.close(320, "idem reconnecting".into()).await;
        }
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| connect_error(&self.url, e))?;
        let connection = Arc::new(connection);
        let mut channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("opening a channel", e))?;
        if self.config.declare {
            channel = declare(&connection, channel, &self.config).await?;
        }
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("setting the prefetch", e))?;
        let consumer = channel
            .basic_consume(
                short(&self.config.queue)?,
                short(&self.config.consumer_tag)?,
                BasicConsumeOptions::default(), // no_ack = false: manual acks
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("starting to consume", e))?;
        let publisher = confirm_channel(&connection).await?;
        *self.publisher.lock().await = Some(DeadLetterChannel {
            connection: Arc::clone(&connection),
            channel: publisher,
            redeclare: false,
        });
        self.live = Some(Live {
            connection,
            consumer,
            channel: Arc::new(ChannelAcks {
                channel,
                tags: Mutex::new(Tags::default()),
            }),
        });
        tracing::info!(queue = %self.config.queue, url = %redact(&self.url), "consuming");
        Ok(())
    }

    fn convert(
        &mut self,
        d: lapin::message::Delivery,
        channel: &Arc<ChannelAcks>,
    ) -> Incoming<AmqpDelivery> {
        let props = &d.properties;
        let mut counted = None;
        let mut message = Message::new(Arc::clone(&self.origin), Bytes::from(d.data));
        if let Some(id) = props.message_id() {
            message = message.with_message_id(id.as_str());
        }
        if let Some(content_type) = props.content_type() {
            message = message.with_header(
                CONTENT_TYPE_HEADER,
                Bytes::copy_from_slice(content_type.as_str().as_bytes()),
            );
        }
        if let Some(headers) = props.headers() {
            for (name, value) in headers {
                if name.as_str() == "x-delivery-count" {
                    // Quorum queues count earlier deliveries; this one is the next.
                    if let Some(n) = as_u32(value) {
                        counted = Some(n.saturating_add(1));
                    }
                }
                if let Some(v) = as_bytes(value) {
                    message = message.with_header(name.as_str(), v);
                }
            }
        }
        let count = match counted {
            Some(n) => n,
            // Only flagged (classic queues): count the redeliveries seen here.
            None if d.redelivered => {
                let id = match message.message_id() {
                    Some(id) => idem::Fingerprint::of(id.as_bytes()),
                    None => idem::Fingerprint::of(message.payload()),
                };
                self.redeliveries.next(id)
            }
            None => 1,
        };
        Incoming::new(
            message.with_delivery_count(count),
            AmqpDelivery {
                tag: d.delivery_tag,
                channel: Arc::clone(channel),
            },
        )
    }
}

pub(super) fn as_u32(v: &AMQPValue) -> Option<u32> {
    let n: i128 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        _ => return None,
    };
    u32::try_from(n).ok()
}

pub(super) fn as_bytes(v: &AMQPValue) -> Option<Bytes> {
    Some(match v {
        AMQPValue::LongString(s) => Bytes::copy_from_slice(s.as_bytes()),
        AMQPValue::ShortString(s) => Bytes::copy_from_slice(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Bytes::copy_from_slice(b.as_slice()),
        other => Bytes::from(as_u32(other)?.to_string()),
    })
}

impl Source for AmqpSource {
    type Delivery = AmqpDelivery;
    type Acker = AmqpAcker;

    fn acker(&self) -> AmqpAcker {
        AmqpAcker {
            config: Arc::clone(&self.config),
            publisher: Arc::clone(&self.publisher),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<AmqpDelivery>>, BrokerError> {
        if self.live.is_none() {
            self.reconnect().await?;
        }
        let Some(live) = self.live.as_mut() else {
            return Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "not connected",
            ));
        };
        let first = match live.consumer.next().await {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.live = None;
                return Err(amqp_error("consuming", e));
            }
            None => {
                self.live = None;
                return Err(BrokerError::new(
                    BrokerErrorKind::Connection,
                    "the broker cancelled the consumer",
                ));
            }
        };
        let mut raw = vec![first];
        // Whatever else has arrived, without waiting for more.
        while raw.len() < max {
            match live.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => raw.push(d),
                _ => break,
            }
        }
        let channel = Arc::clone(&live.channel);
        channel
            .tags
            .lock()
            .await
            .processing
            .extend(raw.iter().map(|d| d.delivery_tag));
        Ok(raw.into_iter().map(|d| self.convert(d, &channel)).collect())
    }

    async fn close(mut self) {
        if let Some(live) = self.live.take() {
            // Unacked deliveries are requeued by the broker.
            let _ = live
                .connection
                .close(200, "idem consumer stopping".into())
                .await;
        }
    }
}

impl ChannelAcks {
    /// Marks `tags` acked and sends what can be sent.
    async fn ack(&self, tags: &[u64]) -> Result<(), BrokerError> {
        let mut st = self.tags.lock().await;
        for t in tags {
            st.processing.remove(t);
            st.done.insert(*t);
        }
        self.flush(&mut st).await
    }

    /// Sends acks for the done tags older than every tag still in processing: one `multiple`
    /// ack for the run before the first held tag, single acks past it (a held tag may wait a
    /// whole lease; the tags behind it should not). Done tags younger than a tag in processing
    /// wait for its decision, which calls this again.
    async fn flush(&self, st: &mut Tags) -> Result<(), BrokerError> {
        let first_processing = st.processing.first().copied().unwrap_or(u64::MAX);
        let ready: Vec<u64> = st.done.range(..first_processing).copied().collect();
        if ready.is_empty() {
            return Ok(());
        }
        for t in &ready {
            st.done.remove(t);
        }
        let first_held = st.held.first().copied().unwrap_or(u64::MAX);
        let run = ready.partition_point(|t| *t < first_held);
        let send = |tag, multiple| async move {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .await
                .map_err(|e| amqp_error("acking", e))
        };
        if run > 0 {
            send(ready[run - 1], run > 1).await?;
        }
        for &tag in &ready[run..] {
            send(tag, false).await?;
        }
        Ok(())
    }

    /// Takes `tag` out of processing to hold it for a delayed nack.
    async fn hold(&self, tag: u64) -> Result<(), BrokerError> {
        let mut st = self.tags.lock().await;
        st.processing.remove(&tag);
        st.held.insert(tag);
        self.flush(&mut st).await
    }

    /// Requeues `tag` now.
    async fn nack(&self, tag: u64) -> Result<(), BrokerError> {
        let mut st = self.tags.lock().await;
        st.processing.remove(&tag);
        st.held.remove(&tag);
        self.channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await
            .map_err(|e| amqp_error("nacking", e))?;
        self.flush(&mut st).await
    }

    /// Holds `tag` and requeues it after `delay`.
    async fn nack_later(self: Arc<Self>, tag: u64, delay: Duration) -> Result<(), BrokerError> {
        if delay.is_zero() {
            return self.nack(tag).await;
        }
        // No delayed requeue in AMQP 0-9-1: the delivery stays unacked for the delay.
        let held = self.hold(tag).await;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Err(e) = self.nack(tag).await {
                tracing::debug!(error = %e, "delayed nack failed; the broker requeues on close");
            }
        });
        held
    }
}

/// How long a delivery whose dead-letter publish failed is held before it is requeued to try
/// again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

impl Acker for AmqpAcker {
    type Delivery = AmqpDelivery;

    async fn ack(&self, deliveries: Vec<AmqpDelivery>) -> Result<(), BrokerError> {
        // Deliveries of one batch share a channel, unless a reconnect happened in between.
        let mut groups: Vec<(Arc<ChannelAcks>, Vec<u64>)> = Vec::new();
        for d in deliveries {
            match groups.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &d.channel)) {
                Some((_, tags)) => tags.push(d.tag),
                None => groups.push((d.channel, vec![d.tag])),
            }
        }
        let mut result = Ok(());
        for (channel, tags) in groups {
            if let Err(e) = channel.ack(&tags).await {
                result = Err(e);
            }
        }
        result
    }

    async fn nack(&self, delivery: AmqpDelivery, delay: Duration) -> Result<(), BrokerError> {
        delivery.channel.nack_later(delivery.tag, delay).await
    }

    async fn dead_letter(
        &self,
        delivery: AmqpDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        match self.publish_dead_letter(message, reason).await {
            Ok(()) => delivery.channel.ack(&[delivery.tag]).await,
            Err(e) => {
                // Not acked; requeued a little later to be dead-lettered again.
                let _ = delivery
                    .channel
                    .nack_later(delivery.tag, DEAD_LETTER_RETRY)
                    .await;
                Err(e)
            }
        }
    }
}

/// Opens a channel in confirm mode.
pub(super) async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("opening the dead-letter channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_error("enabling publisher confirms", e))?;
    Ok(channel)
}

impl AmqpAcker {
    /// The dead-letter channel, opened again if a channel-level error closed it (publishing to
    /// a deleted exchange, say: AMQP closes the channel for good), with the dead-letter
    /// topology declared again then (with `declare`) or after an unroutable return.
    async fn dead_letter_channel(&self) -> Result<Channel, BrokerError> {
        let mut guard = self.publisher.lock().await;
        let dl = guard.as_mut().ok_or_else(|| {
            BrokerError::new(BrokerErrorKind::Connection, "no dead-letter channel")
        })?;
        let closed = !dl.channel.status().connected();
        if !closed && !dl.redeclare {
            return Ok(dl.channel.clone());
        }
        if !dl.connection.status().connected() {
            // The source reconnects, and brings a new channel.
            return Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "the connection is lost; no dead-letter channel until the source reconnects",
            ));
        }
        let mut channel = if closed {
            tracing::warn!(
                exchange = %self.config.dead_letter_exchange,
                "the dead-letter channel was closed by an error; opening it again"
            );
            confirm_channel(&dl.connection).await?
        } else {
            dl.channel.clone()
        };
        if self.config.declare {
            channel = declare_dead_letter(&dl.connection, channel, &self.config).await?;
            if !channel.status().confirm() {
                // A refused declaration replaced the channel by one without confirms.
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| amqp_error("enabling publisher confirms", e))?;
            }
        }
        dl.channel = channel.clone();
        dl.redeclare = false;
        Ok(channel)
    }

    /// Publishes a dead letter, mandatory, and waits for the broker's confirm.
    async fn publish_dead_letter(
        &self,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = FieldTable::default();
        for (name, value) in message.headers() {
            if let Ok(name) = lapin::types::ShortString::try_new(name) {
                headers.insert(name, AMQPValue::LongString(LongString::from(value)));
            }
        }
        headers.insert(
            header::DEAD_LETTER_REASON.into(),
            AMQPValue::LongString(reason.as_bytes().into()),
        );
        headers.insert(
            header::DEAD_LETTER_ORIGIN.into(),
            AMQPValue::LongString(message.origin().as_bytes().into()),
        );
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = message.message_id().and_then(|id| short(id).ok()) {
            props = props.with_message_id(id);
        }
        if let Some(content_type) = message
            .header(CONTENT_TYPE_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| short(v).ok())
        {
            props = props.with_content_type(content_type);
        }
        let channel = self.dead_letter_channel().await?;
        let confirm = channel
            .basic_publish(
                short(&self.config.dead_letter_exchange)?,
                short(&self.config.queue)?,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                message.payload(),
                props,
            )
            .await
            .map_err(|e| amqp_error("publishing a dead letter", e))?
            .await
            .map_err(|e| amqp_error("confirming a dead letter", e))?;
        match confirm {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(_)) => {
                if let Some(dl) = self.publisher.lock().await.as_mut() {
                    dl.redeclare = true;
                }
                return Err(BrokerError::new(
                    BrokerErrorKind::Rejected,
                    format!(
                        "dead letter returned unroutable by exchange {:?}: is the dead-letter \
                         queue bound?",
                        self.config.dead_letter_exchange
                    ),
                ));
            }
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                return Err(BrokerError::new(
                    BrokerErrorKind::Rejected,
                    "the broker did not confirm the dead letter",
                ));
            }
        }
        Ok(())
    }
}
