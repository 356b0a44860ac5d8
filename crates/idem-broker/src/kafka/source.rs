//! [`KafkaSource`]: a group consumer polled by a thread of its own, which fills the
//! [`State`](super::state::State) the runtime takes deliveries from; [`KafkaAcker`] settles them
//! in that state (acks), parks them for a local redelivery (nacks), or produces them to the
//! dead-letter topic. Offsets are stored and committed by the polling thread only.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::state::{Fetched, Lane, Spot, State};
use super::{
    DEAD_LETTER_OFFSET, DEAD_LETTER_PARTITION, KafkaConfig, OFFSET_HEADER, Offsets, Order,
    PARTITION_HEADER, RECORD_KEY_HEADER, client_config, create_topics, kafka_error, millis,
    producer_config,
};
use crate::admin::is_dead_letter_header;
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};
use crate::source::{Acker, Incoming, Source};

/// How long after it was dropped unsettled a delivery is handed out again.
const DROPPED_REDELIVERY: Duration = Duration::from_secs(1);
/// How long after a dead-letter produce failed the message is handed out again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);
/// How long `connect` waits for the group to assign partitions.
const JOIN_WAIT: Duration = Duration::from_secs(30);
/// Messages the polling thread takes from librdkafka before it hands them over.
const POLL_BATCH: usize = 512;

/// What the source, its ackers, its deliveries and the polling thread share.
struct Core {
    topic: String,
    dead_letter_topic: String,
    order: Order,
    commit_interval: Duration,
    origin: Arc<str>,
    state: Mutex<State>,
    /// Wakes `receive`: a message became ready, or a timer changed.
    notify: Notify,
    /// `close` asks the polling thread to stop.
    stop: AtomicBool,
    /// The polling thread has ended.
    gone: AtomicBool,
    /// Set at the first assignment: the consumer has joined the group.
    joined: tokio::sync::watch::Sender<bool>,
    /// Pass partitions and offsets as headers.
    position_headers: bool,
    /// Offsets kept with the handler's effects, loaded at assignment.
    offsets: Option<Offsets>,
}

/// Offsets a consumer keeps outside the group, written by the handler in the transaction of
/// its effects (see [`KafkaConfig::stored_offsets`]). Implemented for closures
/// `Fn(&str, &[i32]) -> Result<Vec<(i32, i64)>, String>`.
pub trait OffsetStore: Send + Sync + 'static {
    /// For the `partitions` of `topic` that have one: the next offset to consume (the stored
    /// message offset + 1).
    ///
    /// # Errors
    /// Why they cannot be read: the consumer then starts from the group's committed offsets
    /// (and the store replays what was done), and logs the error.
    fn load(&self, topic: &str, partitions: &[i32]) -> Result<Vec<(i32, i64)>, String>;
}

impl<F> OffsetStore for F
where
    F: Fn(&str, &[i32]) -> Result<Vec<(i32, i64)>, String> + Send + Sync + 'static,
{
    fn load(&self, topic: &str, partitions: &[i32]) -> Result<Vec<(i32, i64)>, String> {
        self(topic, partitions)
    }
}

/// The partition and offset of a message consumed with
/// [`KafkaConfig::position_headers`] (or [`stored_offsets`](KafkaConfig::stored_offsets)).
pub fn position(message: &Message) -> Option<(i32, i64)> {
    let text = |name: &str| std::str::from_utf8(message.header(name)?).ok();
    Some((
        text(PARTITION_HEADER)?.parse().ok()?,
        text(OFFSET_HEADER)?.parse().ok()?,
    ))
}

/// Held by the source and its ackers: the polling thread stops when none is left (a dropped
/// source, a killed runtime), closing the consumer.
#[derive(Debug)]
struct Link;

/// Consumes a Kafka topic in a consumer group. See the [module docs](super).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::kafka::{KafkaConfig, KafkaSource};
/// let source = KafkaSource::connect("kafka://127.0.0.1:9092", KafkaConfig::new("orders", "billing")).await?;
/// # let _ = source; Ok(()) }
/// ```
pub struct KafkaSource {
    core: Arc<Core>,
    link: Arc<Link>,
    dead_letters: Arc<FutureProducer>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("topic", &self.core.topic)
            .finish_non_exhaustive()
    }
}

/// One message handed out by a [`KafkaSource`]: its partition, offset and assignment. Dropped
/// without being settled, it is handed out again after 1 s.
pub struct KafkaDelivery {
    spot: Spot,
    core: Arc<Core>,
    settled: bool,
}

impl KafkaDelivery {
    /// The partition the message was consumed from.
    pub fn partition(&self) -> i32 {
        self.spot.partition
    }

    /// The message's offset in its partition.
    pub fn offset(&self) -> i64 {
        self.spot.offset
    }

    /// Marks it settled (no redelivery on drop) and returns where it is.
    fn take(mut self) -> Spot {
        self.settled = true;
        self.spot
    }
}

impl std::fmt::Debug for KafkaDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDelivery")
            .field("partition", &self.spot.partition)
            .field("offset", &self.spot.offset)
            .finish_non_exhaustive()
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        if !self.settled {
            self.core
                .state
                .lock()
                .park(self.spot, Instant::now() + DROPPED_REDELIVERY);
            self.core.notify.notify_one();
        }
    }
}

/// Settles [`KafkaSource`] deliveries.
#[derive(Clone)]
pub struct KafkaAcker {
    core: Arc<Core>,
    dead_letters: Arc<FutureProducer>,
    _link: Arc<Link>,
}

impl std::fmt::Debug for KafkaAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAcker")
            .field("topic", &self.core.topic)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Creates the topic and the dead-letter topic if they are missing (unless
    /// [`declare`](KafkaConfig::declare) is false: then the topic must exist), joins the
    /// consumer group and starts fetching.
    ///
    /// # Errors
    /// A [`BrokerError`]: a bad URL or setting, the broker unreachable, the topic missing.
    pub async fn connect(url: &str, config: KafkaConfig) -> Result<Self, BrokerError> {
        config.check()?;
        if config.declare {
            create_topics(
                url,
                &[&config.topic, &config.dead_letter_topic],
                config.partitions,
            )
            .await?;
        }
        let session = config.session_timeout.max(Duration::from_secs(1));
        let heartbeat = (session / 10).clamp(Duration::from_millis(100), Duration::from_secs(3));
        let mut cc = client_config(url)?;
        cc.set("group.id", &config.group)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // A resumed partition waits for the fetch in flight: keep fetches short.
            .set("fetch.wait.max.ms", "100")
            .set("session.timeout.ms", millis(session).to_string())
            .set("heartbeat.interval.ms", millis(heartbeat).to_string());
        for (name, value) in &config.properties {
            cc.set(name, value);
        }
        let core = Arc::new(Core {
            origin: config.topic.as_str().into(),
            topic: config.topic.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            order: config.order,
            commit_interval: config.commit_interval,
            state: Mutex::new(State::new(config.max_held)),
            notify: Notify::new(),
            stop: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            joined: tokio::sync::watch::Sender::new(false),
            position_headers: config.position_headers,
            offsets: config.offsets.clone(),
        });
        let consumer: BaseConsumer<Ctx> = cc
            .create_with_context(Ctx {
                core: Arc::clone(&core),
            })
            .map_err(|e| kafka_error("creating the Kafka consumer", e))?;
        let dead_letters: FutureProducer = producer_config(url, Duration::from_secs(30))?
            .create()
            .map_err(|e| kafka_error("creating the dead-letter producer", e))?;
        let topic = config.topic.clone();
        let consumer = tokio::task::spawn_blocking(move || {
            check_topic(&consumer, &topic)?;
            consumer
                .subscribe(&[&topic])
                .map_err(|e| kafka_error(&format!("subscribing to {topic:?}"), e))?;
            Ok::<_, BrokerError>(consumer)
        })
        .await
        .map_err(|e| BrokerError::new(BrokerErrorKind::Protocol, format!("connecting: {e}")))??;
        let link = Arc::new(Link);
        let weak = Arc::downgrade(&link);
        let poll_core = Arc::clone(&core);
        let poller = std::thread::Builder::new()
            .name(format!("idem-kafka-{}", config.topic))
            .spawn(move || poll_loop(consumer, &poll_core, &weak))
            .map_err(|e| {
                BrokerError::new(
                    BrokerErrorKind::Protocol,
                    format!("starting the Kafka polling thread: {e}"),
                )
            })?;
        // Until the group assigned partitions: a consumer that leaves while its join is under
        // way can leave some brokers' groups stuck (tansu keeps it as the group's leader).
        let mut joined = core.joined.subscribe();
        if tokio::time::timeout(JOIN_WAIT, joined.wait_for(|j| *j))
            .await
            .is_err()
        {
            tracing::warn!(topic = %config.topic, group = %config.group, "no partitions assigned within {JOIN_WAIT:?}; consuming once the group assigns some");
        }
        tracing::info!(topic = %config.topic, group = %config.group, order = %config.order, url = %redact(url), "consuming");
        Ok(Self {
            core,
            link,
            dead_letters: Arc::new(dead_letters),
            poller: Some(poller),
        })
    }
}

/// Fails unless the broker knows `topic` (waiting up to 10 s for its metadata).
fn check_topic(consumer: &BaseConsumer<Ctx>, topic: &str) -> Result<(), BrokerError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| kafka_error("reading the topic's metadata", e))?;
    let missing = || {
        BrokerError::new(
            BrokerErrorKind::Config,
            format!("the Kafka topic {topic:?} does not exist"),
        )
    };
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(missing)?;
    match t.error() {
        None if !t.partitions().is_empty() => Ok(()),
        None => Err(missing()),
        Some(e) => {
            let code = RDKafkaErrorCode::from(e);
            if matches!(
                code,
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
            ) {
                Err(missing())
            } else {
                Err(BrokerError::new(
                    super::classify(code),
                    format!("the Kafka topic {topic:?}: {code}"),
                ))
            }
        }
    }
}

/// The polling thread: fetches into the state, pauses and resumes partitions, commits; on
/// stop (or when the source and its ackers are gone) commits what is settled and closes the
/// consumer, which leaves the group.
fn poll_loop(consumer: BaseConsumer<Ctx>, core: &Core, link: &Weak<Link>) {
    let mut batch = Vec::with_capacity(POLL_BATCH);
    let mut next_commit = std::time::Instant::now() + core.commit_interval;
    let mut errors = ErrorLog::default();
    while !core.stop.load(AtomicOrdering::Acquire) && link.strong_count() > 0 {
        // A paused partition is resumed from here: look again soon.
        let wait = if core.state.lock().any_paused() {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(100)
        };
        let mut next = consumer.poll(wait);
        while let Some(polled) = next {
            match polled {
                Ok(m) => batch.push(fetched(core, &m)),
                Err(e) => errors.log(&e),
            }
            if batch.len() >= POLL_BATCH {
                break;
            }
            next = consumer.poll(Duration::ZERO);
        }
        let flow = {
            let mut state = core.state.lock();
            if !batch.is_empty() && state.insert(batch.drain(..)) {
                core.notify.notify_one();
            }
            state.flow()
        };
        set_flow(&consumer, &core.topic, &flow.pause, true);
        set_flow(&consumer, &core.topic, &flow.resume, false);
        let now = std::time::Instant::now();
        if now >= next_commit {
            let points = core.state.lock().commit_points();
            commit(&consumer, core, &points, CommitMode::Async);
            next_commit = now + core.commit_interval;
        }
    }
    let points = core.state.lock().commit_points();
    commit(&consumer, core, &points, CommitMode::Sync);
    // Dropping the consumer closes it: the partitions are revoked (the context commits them
    // again if they moved) and the consumer leaves the group.
    drop(consumer);
    core.gone.store(true, AtomicOrdering::Release);
    core.notify.notify_one();
    tracing::debug!(topic = %core.topic, "Kafka consumer closed");
}

/// Pauses (or resumes) `partitions`.
fn set_flow(consumer: &BaseConsumer<Ctx>, topic: &str, partitions: &[i32], pause: bool) {
    if partitions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let done = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    match done {
        Ok(()) => tracing::debug!(topic, ?partitions, pause, "partition flow"),
        Err(e) => {
            tracing::warn!(topic, ?partitions, pause, error = %e, "could not pause or resume")
        }
    }
}

/// Logs consumer errors, each kind at most once every 10 s (librdkafka repeats them while a
/// broker is down).
#[derive(Default)]
struct ErrorLog {
    last: Option<(String, std::time::Instant)>,
}

impl ErrorLog {
    fn log(&mut self, e: &KafkaError) {
        let text = e.to_string();
        let now = std::time::Instant::now();
        if let Some((last, at)) = &self.last
            && *last == text
            && now.duration_since(*at) < Duration::from_secs(10)
        {
            tracing::debug!(error = %text, "Kafka consumer error");
            return;
        }
        tracing::warn!(error = %text, "Kafka consumer error; librdkafka retries by itself");
        self.last = Some((text, now));
    }
}

/// A fetched record as the runtime sees it: payload, the `message-id` header as the message
/// id, the record key as the first header ([`RECORD_KEY_HEADER`]), the other headers.
fn fetched(core: &Core, m: &BorrowedMessage<'_>) -> Fetched {
    let key = m.key().map(Bytes::copy_from_slice);
    let mut message = Message::new(
        Arc::clone(&core.origin),
        Bytes::copy_from_slice(m.payload().unwrap_or_default()),
    );
    if let Some(k) = &key {
        message = message.with_header(RECORD_KEY_HEADER, k.clone());
    }
    if core.position_headers {
        message = message
            .with_header(PARTITION_HEADER, Bytes::from(m.partition().to_string()))
            .with_header(OFFSET_HEADER, Bytes::from(m.offset().to_string()));
    }
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            if h.key == RECORD_KEY_HEADER
                || (core.position_headers && (h.key == PARTITION_HEADER || h.key == OFFSET_HEADER))
            {
                continue;
            }
            let value = h.value.unwrap_or_default();
            if h.key == header::MESSAGE_ID
                && message.message_id().is_none()
                && let Ok(id) = std::str::from_utf8(value)
            {
                message = message.with_message_id(id);
            }
            message = message.with_header(h.key, Bytes::copy_from_slice(value));
        }
    }
    let lane = match (core.order, key) {
        (Order::Partition, _) => Lane::Partition,
        (Order::PerKey, Some(k)) => Lane::Key(k),
        (Order::PerKey, None) => Lane::Free,
    };
    Fetched {
        partition: m.partition(),
        offset: m.offset(),
        lane,
        message,
    }
}

/// Stores and commits `points` (partition, next offset to consume).
fn commit<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    core: &Core,
    points: &[(i32, i64)],
    mode: CommitMode,
) {
    if points.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::with_capacity(points.len());
    for (p, o) in points {
        // `rd_kafka_offsets_store` stores offsets as given, the next one to consume (unlike
        // `store_offset`, which adds 1), and so does a commit of an explicit list.
        if let Err(e) = tpl.add_partition_offset(&core.topic, *p, Offset::Offset(*o)) {
            tracing::warn!(partition = p, offset = o, error = %e, "bad offset");
        }
    }
    match consumer.store_offsets(&tpl) {
        Ok(()) => {}
        // A partition of the list is no longer assigned: its new owner consumes from the last
        // commit, and the store replays what this consumer completed.
        Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => {
            tracing::debug!(topic = %core.topic, ?points, "offsets of partitions no longer assigned not stored");
        }
        Err(e) => tracing::warn!(topic = %core.topic, error = %e, "storing offsets"),
    }
    // The explicit list, not the consumer's stored offsets: those of a partition revoked and
    // assigned again may be stale, and committing them would move the group back.
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            if matches!(mode, CommitMode::Sync) {
                tracing::debug!(topic = %core.topic, ?points, "committed");
            }
        }
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            tracing::warn!(topic = %core.topic, ?points, error = %e, "commit failed; trying again at the next commit");
            core.state.lock().uncommit(points.iter().map(|(p, _)| *p));
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
        .collect()
}

/// The consumer's callbacks: rebalances, commit results, librdkafka's logs.
struct Ctx {
    core: Arc<Core>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{log_message}"),
            _ => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", error = %error, reason, "client error");
    }
}

impl Ctx {
    /// Starts each of the assigned partitions at its stored offset where that is later than
    /// the group's committed one.
    fn seek_to_stored(
        &self,
        consumer: &BaseConsumer<Self>,
        offsets: &Offsets,
        tpl: &mut TopicPartitionList,
    ) {
        let topic = &self.core.topic;
        let partitions = partitions_of(tpl, topic);
        let stored = match offsets.0.load(topic, &partitions) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "could not load the stored offsets; starting from the group's");
                return;
            }
        };
        let committed = consumer
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .ok();
        tracing::debug!(topic = %topic, ?stored, ?committed, "stored offsets loaded");
        for (p, next) in stored {
            let group = committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, p))
                .and_then(|e| e.offset().to_raw());
            if group.is_some_and(|g| g >= next) || !partitions.contains(&p) {
                continue;
            }
            match tpl.set_partition_offset(topic, p, Offset::Offset(next)) {
                Ok(()) => {
                    tracing::info!(topic = %topic, partition = p, offset = next, "starting at the stored offset")
                }
                Err(e) => {
                    tracing::warn!(topic = %topic, partition = p, error = %e, "could not start at the stored offset")
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr as E;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let done = match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(offsets) = &self.core.offsets {
                    self.seek_to_stored(consumer, offsets, tpl);
                }
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                let done = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
                done
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                let done = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
                done
            }
            other => {
                let e = KafkaError::Rebalance(other.into());
                tracing::warn!(error = %e, "rebalance failed");
                Ok(())
            }
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "applying a rebalance");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let core = &self.core;
        let partitions = partitions_of(tpl, &core.topic);
        if consumer.assignment_lost() {
            core.state.lock().lose(partitions.iter().copied());
            tracing::warn!(topic = %core.topic, ?partitions, "partitions lost: their unsettled messages go to the new owner from the last commit");
        } else {
            let points = core.state.lock().revoke(partitions.iter().copied());
            commit(consumer, core, &points, CommitMode::Sync);
            tracing::info!(topic = %core.topic, ?partitions, ?points, "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let core = &self.core;
                let partitions = partitions_of(tpl, &core.topic);
                core.state.lock().assign(partitions.iter().copied());
                // A pause survives a rebalance in librdkafka: a partition paused in an earlier
                // assignment would stay paused.
                if let Err(e) = consumer.resume(tpl) {
                    tracing::debug!(error = %e, "resuming assigned partitions");
                }
                core.joined.send_replace(true);
                tracing::info!(topic = %core.topic, ?partitions, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                let partitions = partitions_of(offsets, &self.core.topic);
                tracing::warn!(topic = %self.core.topic, ?partitions, error = %e, "commit failed; trying again at the next commit");
                self.core.state.lock().uncommit(partitions);
            }
        }
    }
}

impl Source for KafkaSource {
    type Delivery = KafkaDelivery;
    type Acker = KafkaAcker;

    fn acker(&self) -> KafkaAcker {
        KafkaAcker {
            core: Arc::clone(&self.core),
            dead_letters: Arc::clone(&self.dead_letters),
            _link: Arc::clone(&self.link),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<KafkaDelivery>>, BrokerError> {
        let max = max.max(1);
        loop {
            let (got, due) = {
                let mut state = self.core.state.lock();
                let got = state.take(max, Instant::now());
                (got, state.next_due())
            };
            if !got.is_empty() {
                return Ok(got
                    .into_iter()
                    .map(|(message, spot)| {
                        Incoming::new(
                            message,
                            KafkaDelivery {
                                spot,
                                core: Arc::clone(&self.core),
                                settled: false,
                            },
                        )
                    })
                    .collect());
            }
            if self.core.gone.load(AtomicOrdering::Acquire) {
                return Err(BrokerError::new(
                    BrokerErrorKind::Protocol,
                    format!(
                        "the Kafka consumer of {:?} stopped polling",
                        self.core.topic
                    ),
                ));
            }
            let notified = self.core.notify.notified();
            match due {
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    async fn close(mut self) {
        self.core.stop.store(true, AtomicOrdering::Release);
        if let Some(poller) = self.poller.take()
            && let Ok(Err(_)) = tokio::task::spawn_blocking(move || poller.join()).await
        {
            tracing::error!(topic = %self.core.topic, "the Kafka polling thread panicked");
        }
    }
}

impl KafkaAcker {
    fn settle(&self, spots: impl IntoIterator<Item = Spot>) {
        let mut woke = false;
        {
            let mut state = self.core.state.lock();
            for spot in spots {
                woke |= state.settle(spot);
            }
        }
        if woke {
            self.core.notify.notify_one();
        }
    }

    fn park(&self, spot: Spot, delay: Duration) {
        self.core.state.lock().park(spot, Instant::now() + delay);
        // `receive` may be sleeping until a later time.
        self.core.notify.notify_one();
    }
}

impl Acker for KafkaAcker {
    type Delivery = KafkaDelivery;

    async fn ack(&self, deliveries: Vec<KafkaDelivery>) -> Result<(), BrokerError> {
        self.settle(deliveries.into_iter().map(KafkaDelivery::take));
        Ok(())
    }

    async fn nack(&self, delivery: KafkaDelivery, delay: Duration) -> Result<(), BrokerError> {
        self.park(delivery.take(), delay);
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: KafkaDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let spot = delivery.take();
        let mut key: Option<&[u8]> = None;
        let mut headers = OwnedHeaders::new_with_capacity(message.headers().count() + 4);
        for (name, value) in message.headers() {
            if name == RECORD_KEY_HEADER {
                key = key.or(Some(value));
                continue;
            }
            if is_dead_letter_header(name)
                || name == DEAD_LETTER_PARTITION
                || name == DEAD_LETTER_OFFSET
            {
                continue;
            }
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        if message.header(header::MESSAGE_ID).is_none()
            && let Some(id) = message.message_id()
        {
            headers = headers.insert(Header {
                key: header::MESSAGE_ID,
                value: Some(id),
            });
        }
        let (partition, offset) = (spot.partition.to_string(), spot.offset.to_string());
        for (name, value) in [
            (header::DEAD_LETTER_REASON, reason),
            (header::DEAD_LETTER_ORIGIN, message.origin()),
            (DEAD_LETTER_PARTITION, partition.as_str()),
            (DEAD_LETTER_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.core.dead_letter_topic)
            .payload(&message.payload()[..])
            .headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        match self.dead_letters.send(record, Duration::from_secs(5)).await {
            Ok(_) => {
                self.settle([spot]);
                Ok(())
            }
            Err((e, _)) => {
                // Not settled: handed out again, and dead-lettered again.
                self.park(spot, DEAD_LETTER_RETRY);
                Err(kafka_error(
                    &format!(
                        "producing a dead letter to {:?}",
                        self.core.dead_letter_topic
                    ),
                    e,
                ))
            }
        }
    }
}
