//! [`RocketMqSource`]: a push consumer in a consumer group, bridged to the pull-style
//! [`Source::receive`]; [`RocketMqAcker`]: settlement of the listener's messages, send-back with
//! a delay level, confirmed dead letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultMQProducer,
    DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::message::MessageConst;
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;
use tokio::sync::{mpsc, oneshot};

use super::{Domain, RocketMqConfig, client_error};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};
use crate::source::{Acker, Incoming, Source};

/// Properties the client or the broker set for themselves: not headers of the message.
const SYSTEM_PROPERTIES: &[&str] = &[
    "UNIQ_KEY",
    "KEYS",
    "TAGS",
    "WAIT",
    "DELAY",
    "RETRY_TOPIC",
    "REAL_TOPIC",
    "REAL_QID",
    "ORIGIN_MESSAGE_ID",
    "RECONSUME_TIME",
    "MAX_RECONSUME_TIMES",
    "CONSUME_START_TIME",
    "MIN_OFFSET",
    "MAX_OFFSET",
    "PGROUP",
    "TRACE_ON",
    "MSG_REGION",
    "CLUSTER",
    "__BORNHOST",
    "BORN_TIMESTAMP",
    "DLQ_ORIGIN_TOPIC",
    "DLQ_ORIGIN_MESSAGE_ID",
];

/// Whether a property is RocketMQ's own, not a header of the message.
pub(super) fn is_system_property(name: &str) -> bool {
    SYSTEM_PROPERTIES.contains(&name)
        || name.starts_with("__")
        || name.starts_with("TIMER_")
        || name.starts_with("INNER_")
        || name.starts_with("POP_")
}

/// The message id of a RocketMQ message: the `message-id` property (empty when
/// `message-id-empty` is set), else `KEYS`, else the client's `UNIQ_KEY`. Never the broker's
/// `msg_id()`.
pub(super) fn message_id_of(properties: &HashMap<String, String>) -> Option<String> {
    if properties.contains_key(super::EMPTY_ID_PROPERTY) {
        return Some(String::new());
    }
    properties
        .get(header::MESSAGE_ID)
        .or_else(|| properties.get(MessageConst::PROPERTY_KEYS))
        .or_else(|| properties.get(MessageConst::PROPERTY_UNIQ_CLIENT_MESSAGE_ID_KEYIDX))
        .cloned()
}

/// The properties of a received message as text.
pub(super) fn properties_of(ext: &MessageExt) -> HashMap<String, String> {
    ext.properties()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
        .collect()
}

/// How a listener's message was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Consumed: acked, sent back for a later redelivery, or dead-lettered.
    Done,
    /// Not settled: the whole listener call returns `ReconsumeLater` and the client sends its
    /// messages back.
    Again,
}

/// Set when the source closes: listener calls still waiting for dropped deliveries return.
#[derive(Default)]
struct Closed {
    closed: Mutex<bool>,
    cond: Condvar,
}

impl Closed {
    fn close(&self) {
        *self.closed.lock() = true;
        self.cond.notify_all();
    }

    fn wait(&self) {
        let mut closed = self.closed.lock();
        while !*closed {
            self.cond.wait(&mut closed);
        }
    }
}

/// How long a listener call waits for the calls of lower offsets of its queue to hand their
/// messages over first.
const ORDER_WAIT: Duration = Duration::from_millis(50);

/// Where each queue is in handing messages over.
#[derive(Default)]
struct QueueOrder {
    /// The offset after the last one handed over.
    next: Option<i64>,
    /// Offsets of listener calls waiting for their turn.
    waiting: std::collections::BTreeSet<i64>,
}

/// Keeps the hand-over of each queue in offset order: the client runs a queue's listener calls
/// on several threads at once, which would otherwise hand messages over in any order (and the
/// queue's offset is committed up to its oldest unsettled message, so acking out of order holds
/// the commit back). A call waits (at most [`ORDER_WAIT`]) until the calls of lower offsets
/// have handed theirs over. Only with the subscription `*`, whose offsets have no gaps.
#[derive(Default)]
struct Order {
    queues: Mutex<HashMap<(String, String, i32), QueueOrder>>,
    cond: Condvar,
}

/// The listener: hands each message to the source and waits for its settlement.
struct Bridge {
    tx: mpsc::UnboundedSender<Incoming<RocketMqDelivery>>,
    origin: Arc<str>,
    closed: Arc<Closed>,
    order: Option<Order>,
}

impl MessageListenerConcurrently for Bridge {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let (Some(first), Some(last)) = (msgs.first(), msgs.last()) else {
            return Ok(ConsumeConcurrentlyStatus::ConsumeSuccess);
        };
        let queue = context.get_message_queue();
        let key = (
            queue.topic_str().to_owned(),
            queue.broker_name().to_string(),
            queue.queue_id(),
        );
        let (offset, end) = (first.queue_offset(), last.queue_offset() + 1);
        // Held while handing over, so that the channel gets the queue's messages in order.
        let mut turn = self.order.as_ref().map(|order| {
            let mut queues = order.queues.lock();
            queues
                .entry(key.clone())
                .or_default()
                .waiting
                .insert(offset);
            let deadline = std::time::Instant::now() + ORDER_WAIT;
            loop {
                let q = queues.entry(key.clone()).or_default();
                let first_waiting = q.waiting.first() == Some(&offset);
                let after_previous = q.next.is_none_or(|n| n >= offset);
                if (first_waiting && after_previous)
                    || order.cond.wait_until(&mut queues, deadline).timed_out()
                {
                    break;
                }
            }
            (order, queues)
        });
        let mut waits = Vec::with_capacity(msgs.len());
        for ext in msgs {
            let (settle, settled) = oneshot::channel();
            let properties = properties_of(ext);
            let mut message =
                Message::new(Arc::clone(&self.origin), ext.body().unwrap_or_default());
            if let Some(id) = message_id_of(&properties) {
                message = message.with_message_id(id);
            }
            let mut headers: Vec<_> = properties
                .into_iter()
                .filter(|(k, _)| {
                    !is_system_property(k)
                        && k != header::MESSAGE_ID
                        && k != super::EMPTY_ID_PROPERTY
                })
                .collect();
            headers.sort();
            for (name, value) in headers {
                message = message.with_header(name, value.into_bytes());
            }
            let count = u32::try_from(ext.reconsume_times().max(0))
                .unwrap_or(u32::MAX - 1)
                .saturating_add(1);
            let delivery = RocketMqDelivery {
                settle: Some(settle),
                ext: (*ext).clone(),
                queue: context.get_message_queue().clone(),
            };
            if self
                .tx
                .send(Incoming::new(message.with_delivery_count(count), delivery))
                .is_err()
            {
                // The source is gone: leave the messages unconsumed until the consumer stops.
                drop(turn);
                self.closed.wait();
                return Ok(ConsumeConcurrentlyStatus::ReconsumeLater);
            }
            waits.push(settled);
        }
        if let Some((order, mut queues)) = turn.take() {
            let q = queues.entry(key).or_default();
            q.waiting.remove(&offset);
            q.next = Some(q.next.map_or(end, |n| n.max(end)));
            order.cond.notify_all();
        }
        let mut all_done = true;
        for settled in waits {
            match settled.blocking_recv() {
                Ok(Settled::Done) => {}
                Ok(Settled::Again) => all_done = false,
                Err(_) => {
                    // Dropped unsettled: held until the source closes (its consumer stops
                    // first, so the offset stays before it and the next consumer gets it).
                    self.closed.wait();
                    return Ok(ConsumeConcurrentlyStatus::ReconsumeLater);
                }
            }
        }
        Ok(if all_done {
            ConsumeConcurrentlyStatus::ConsumeSuccess
        } else {
            ConsumeConcurrentlyStatus::ReconsumeLater
        })
    }
}

/// What the acker needs: the consumer (for send-back), a producer for dead letters.
struct Inner {
    config: Arc<RocketMqConfig>,
    domain: Arc<Domain>,
    consumer: Mutex<Option<DefaultMQPushConsumer>>,
    producer: Arc<DefaultMQProducer>,
    closed: Arc<Closed>,
    closing: AtomicBool,
}

impl Inner {
    /// Stops the consumer (the client persists offsets before unsettled messages and leaves
    /// the group), then releases the listener calls still waiting, then stops the client's
    /// runtime.
    async fn shutdown(&self) {
        if self.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let consumer = self.consumer.lock().take();
        let _ = self
            .domain
            .run(async move {
                if let Some(mut consumer) = consumer {
                    consumer.shutdown().await;
                }
            })
            .await;
        self.closed.close();
        // The consumer has persisted its offsets and left its group: the rest (the dead-letter
        // producer, the client's own tasks) ends with the runtime. The client's graceful
        // shutdown would wait out its 5 s timeout for the producer's tasks.
        self.domain.kill();
    }
}

/// Consumes a RocketMQ topic as a push consumer in a consumer group. See the
/// [module docs](super).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::rocketmq::{RocketMqConfig, RocketMqSource};
/// let source = RocketMqSource::connect("rocketmq://127.0.0.1:9876", RocketMqConfig::new("orders", "billing")).await?;
/// # let _ = source; Ok(()) }
/// ```
pub struct RocketMqSource {
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Incoming<RocketMqDelivery>>,
}

impl std::fmt::Debug for RocketMqSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocketMqSource")
            .field("topic", &self.inner.config.topic)
            .field("group", &self.inner.config.group)
            .finish_non_exhaustive()
    }
}

/// One message handed out by a listener call: settled once, by the acker.
pub struct RocketMqDelivery {
    settle: Option<oneshot::Sender<Settled>>,
    ext: MessageExt,
    queue: MessageQueue,
}

impl std::fmt::Debug for RocketMqDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocketMqDelivery")
            .field("queue_id", &self.ext.queue_id())
            .field("queue_offset", &self.ext.queue_offset())
            .finish_non_exhaustive()
    }
}

impl RocketMqDelivery {
    fn settle(mut self, how: Settled) {
        if let Some(tx) = self.settle.take() {
            let _ = tx.send(how);
        }
    }
}

/// Settles [`RocketMqSource`] deliveries.
#[derive(Clone)]
pub struct RocketMqAcker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RocketMqAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocketMqAcker")
            .field("dead_letter_topic", &self.inner.config.dead_letter_topic)
            .finish_non_exhaustive()
    }
}

/// Starts a producer in `domain` for `url`.
pub(super) async fn start_producer(
    domain: &Arc<Domain>,
    url: &str,
    group: &str,
) -> Result<DefaultMQProducer, BrokerError> {
    let config = Domain::client_config(url, group, Duration::from_secs(30))?;
    let client = Arc::clone(&domain.client);
    let group = group.to_owned();
    let what = format!("starting a producer on {}", redact(url));
    domain
        .run(async move {
            let mut producer = DefaultMQProducer::builder(client)
                .client_config(config)
                .producer_group(group)
                .retry_times_when_send_failed(0)
                .build();
            producer.start().await.map(|()| producer)
        })
        .await?
        .map_err(|e| client_error(&what, e))
}

impl RocketMqSource {
    /// Starts the client's runtime, creates the topic and the dead-letter topic when
    /// `config.declare` is on, and starts a push consumer of `config.topic` in `config.group`.
    ///
    /// # Errors
    /// A [`BrokerError`] when the URL is wrong, or the name server or broker cannot be reached.
    pub async fn connect(url: &str, config: RocketMqConfig) -> Result<Self, BrokerError> {
        let threads = config.consume_threads.max(1);
        let domain = Domain::new(
            &config.group,
            threads as usize,
            config.max_handling + Duration::from_secs(60),
        )?;
        let mut producer =
            start_producer(&domain, url, &format!("{}-idem-dlq", config.group)).await?;
        let client_config = Domain::client_config(url, &config.group, config.route_poll)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = Arc::new(Closed::default());
        let bridge = Bridge {
            tx,
            origin: config.topic.as_str().into(),
            closed: Arc::clone(&closed),
            order: (config.tags == "*").then(Order::default),
        };
        let minutes = config.max_handling.as_secs().div_ceil(60).max(1);
        let mut consumer = DefaultMQPushConsumer::builder(Arc::clone(&domain.client))
            .client_config(client_config)
            .consumer_group(config.group.clone())
            .consume_thread_min(threads)
            .consume_thread_max(threads)
            .consume_message_batch_max_size(config.batch.max(1))
            .pull_batch_size(32)
            .max_reconsume_times(config.max_reconsume_times)
            .consume_timeout(minutes)
            .await_termination_millis_when_shutdown(500)
            .build();
        let (topic, tags, declare, queues, dlq) = (
            config.topic.clone(),
            config.tags.clone(),
            config.declare,
            i32::try_from(config.queues.max(1)).unwrap_or(4),
            config.dead_letter_topic.clone(),
        );
        let what = format!(
            "starting a push consumer of topic {:?} in group {:?} on {}",
            config.topic,
            config.group,
            redact(url)
        );
        let started = domain
            .run(async move {
                if declare {
                    // Before the consumer starts, so that its first route lookup finds it.
                    for t in [&topic, &dlq] {
                        producer
                            .create_topic("TBW102", t, queues, HashMap::new())
                            .await
                            .map_err(|e| ("creating the topic", e))?;
                    }
                }
                consumer
                    .subscribe(topic, tags)
                    .await
                    .map_err(|e| ("subscribing", e))?;
                consumer.register_message_listener_concurrently(bridge);
                consumer.start().await.map_err(|e| ("starting", e))?;
                Ok::<_, (&str, rocketmq_client_rust::ClientError)>((consumer, producer))
            })
            .await?;
        let (consumer, producer) = match started {
            Ok(c) => c,
            Err((step, e)) => {
                domain.kill();
                return Err(client_error(&format!("{what} ({step})"), e));
            }
        };
        tracing::info!(topic = %config.topic, group = %config.group, url = %redact(url), "consuming");
        Ok(Self {
            inner: Arc::new(Inner {
                config: Arc::new(config),
                domain,
                consumer: Mutex::new(Some(consumer)),
                producer: Arc::new(producer),
                closed,
                closing: AtomicBool::new(false),
            }),
            rx,
        })
    }
}

impl Drop for RocketMqSource {
    fn drop(&mut self) {
        if !self.inner.closing.swap(true, Ordering::SeqCst) {
            // Dropped without close (the process is going down): stop the client at once, as
            // a crash would, then free the listener calls.
            self.inner.domain.kill();
            self.inner.closed.close();
        }
    }
}

impl Source for RocketMqSource {
    type Delivery = RocketMqDelivery;
    type Acker = RocketMqAcker;

    fn acker(&self) -> RocketMqAcker {
        RocketMqAcker {
            inner: Arc::clone(&self.inner),
        }
    }

    async fn receive(
        &mut self,
        max: usize,
    ) -> Result<Vec<Incoming<RocketMqDelivery>>, BrokerError> {
        let Some(first) = self.rx.recv().await else {
            return Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "the RocketMQ consumer stopped",
            ));
        };
        let mut out = vec![first];
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(d) => out.push(d),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn close(self) {
        self.inner.shutdown().await;
    }
}

impl RocketMqAcker {
    async fn send_back(&self, delivery: &RocketMqDelivery, level: i32) -> Result<(), BrokerError> {
        let consumer_impl = self
            .inner
            .consumer
            .lock()
            .as_ref()
            .and_then(|c| c.default_mq_push_consumer_impl().cloned())
            .ok_or_else(|| {
                BrokerError::new(
                    BrokerErrorKind::Connection,
                    "the RocketMQ consumer is closed",
                )
            })?;
        let mut ext = delivery.ext.clone();
        let queue = delivery.queue.clone();
        self.inner
            .domain
            .run(async move {
                consumer_impl
                    .send_message_back(&mut ext, level, &queue)
                    .await
            })
            .await?
            .map_err(|e| client_error("sending a message back for redelivery", e))
    }
}

impl Acker for RocketMqAcker {
    type Delivery = RocketMqDelivery;

    async fn ack(&self, deliveries: Vec<RocketMqDelivery>) -> Result<(), BrokerError> {
        for d in deliveries {
            d.settle(Settled::Done);
        }
        Ok(())
    }

    async fn nack(&self, delivery: RocketMqDelivery, delay: Duration) -> Result<(), BrokerError> {
        let level = self.inner.config.delay_level(delay);
        match self.send_back(&delivery, level).await {
            Ok(()) => {
                delivery.settle(Settled::Done);
                Ok(())
            }
            Err(e) => {
                // The listener call returns ReconsumeLater: the client sends it back itself.
                delivery.settle(Settled::Again);
                Err(e)
            }
        }
    }

    async fn dead_letter(
        &self,
        delivery: RocketMqDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut out = match super::new_message(
            &self.inner.config.dead_letter_topic,
            message.payload().clone(),
        ) {
            Ok(out) => out,
            Err(e) => {
                let _ = self.nack(delivery, Duration::from_secs(1)).await;
                return Err(e);
            }
        };
        for (name, value) in message.headers() {
            if let Ok(v) = std::str::from_utf8(value) {
                out.put_property(name.into(), v.into());
            }
        }
        match message.message_id() {
            Some("") => out.put_property(super::EMPTY_ID_PROPERTY.into(), "true".into()),
            Some(id) => {
                out.put_property(header::MESSAGE_ID.into(), id.into());
                out.set_keys(id.into());
            }
            None => {}
        }
        out.put_property(header::DEAD_LETTER_REASON.into(), reason.into());
        out.put_property(header::DEAD_LETTER_ORIGIN.into(), message.origin().into());
        let producer = Arc::clone(&self.inner.producer);
        let sent = self
            .inner
            .domain
            .run(async move { producer.send_with_timeout(out, 5000).await })
            .await
            .and_then(|r| r.map_err(|e| client_error("publishing a dead letter", e)))
            .and_then(|r| super::producer::check_sent(r, "a dead letter"));
        match sent {
            Ok(()) => {
                delivery.settle(Settled::Done);
                Ok(())
            }
            Err(e) => {
                // Not consumed: redelivered a little later to be dead-lettered again.
                let _ = self.nack(delivery, Duration::from_secs(1)).await;
                Err(e)
            }
        }
    }
}
