//! [`KafkaAdmin`]: the lag of a consumer group, its dead letters in `<topic>.dlq`, and its
//! clean-up. See [`Admin`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    DEAD_LETTER_OFFSET, DEAD_LETTER_PARTITION, KafkaConfig, RECORD_KEY_HEADER, client_config,
    kafka_error, producer_config,
};
use crate::admin::{Admin, DeadLetter, Locator, check_reader, is_dead_letter_header, next_reader};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::{Message, header};

/// How long one metadata, offsets or watermarks request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading a partition's tail waits after its last record.
const TAIL_QUIET: Duration = Duration::from_millis(300);

/// Operations on the topic and consumer group of a [`KafkaConfig`] and its dead-letter topic.
///
/// - **Backlog**: the group's lag, summed over the topic's partitions: the high watermark
///   minus the committed offset (minus the low watermark where the group has not committed).
///   It counts what a source holds and has not settled, since a source commits only settled
///   offsets.
/// - **Dead letters** are read from the dead-letter topic from where the group
///   `<group>.dlq` committed (the start, at first), oldest first in each partition. Kafka
///   cannot delete one record: a republished dead letter is marked done by committing that
///   group's offset past it, once every dead letter before it in its partition was
///   republished too. Those read and not republished are read again by the next admin.
/// - **Republish** produces to the topic the dead letter came from, with its record key,
///   payload, headers and message id, and waits for the broker's acknowledgement (`acks=all`).
/// - **Clean-up** deletes both topics and both groups.
pub struct KafkaAdmin {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    config: KafkaConfig,
    /// A consumer of the group (never subscribed): committed offsets and watermarks.
    group: BaseConsumer<DefaultConsumerContext>,
    /// A consumer that reads the tail of partitions (never subscribed, never commits).
    tail: Mutex<BaseConsumer<DefaultConsumerContext>>,
    producer: FutureProducer,
    dead: Mutex<Option<DeadReader>>,
    reader: u64,
}

/// The dead-letter topic's reader, assigned every partition.
struct DeadReader {
    consumer: BaseConsumer<DefaultConsumerContext>,
    /// Per partition: the next offset to read.
    next: BTreeMap<i32, i64>,
    /// Per partition: offsets read and not republished.
    open: BTreeMap<i32, BTreeSet<i64>>,
    /// Per partition: the offset committed last.
    committed: BTreeMap<i32, i64>,
}

impl std::fmt::Debug for KafkaAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAdmin")
            .field("topic", &self.inner.config.topic)
            .field("group", &self.inner.config.group)
            .finish_non_exhaustive()
    }
}

impl KafkaAdmin {
    /// Connects. Creates nothing.
    ///
    /// # Errors
    /// A bad URL or setting.
    pub async fn connect(url: &str, config: KafkaConfig) -> Result<Self, BrokerError> {
        config.check()?;
        let group = client_config(url)?
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .map_err(|e| kafka_error("creating a Kafka admin consumer", e))?;
        let tail = client_config(url)?
            .set("group.id", format!("{}.tail", config.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| kafka_error("creating a Kafka admin consumer", e))?;
        let producer = producer_config(url, Duration::from_secs(30))?
            .create()
            .map_err(|e| kafka_error("creating a Kafka producer", e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                config,
                group,
                tail: Mutex::new(tail),
                producer,
                dead: Mutex::new(None),
                reader: next_reader(),
            }),
        })
    }

    /// The dead-letter group: where the offsets of republished dead letters are committed.
    fn dead_letter_group(config: &KafkaConfig) -> String {
        format!("{}.dlq", config.group)
    }
}

/// Runs blocking librdkafka calls off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        BrokerError::new(
            BrokerErrorKind::Protocol,
            format!("a Kafka admin call failed: {e}"),
        )
    })?
}

/// The partitions of `topic`; `None` when it does not exist.
fn partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<Option<Vec<i32>>, BrokerError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| kafka_error(&format!("reading the metadata of {topic:?}"), e))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(None);
    }
    Ok(Some(t.partitions().iter().map(|p| p.id()).collect()))
}

impl Inner {
    fn backlog(&self) -> Result<u64, BrokerError> {
        let topic = &self.config.topic;
        let parts = partitions(&self.group, topic)?.ok_or_else(|| {
            BrokerError::new(
                BrokerErrorKind::Config,
                format!("the Kafka topic {topic:?} does not exist"),
            )
        })?;
        let mut tpl = TopicPartitionList::with_capacity(parts.len());
        for p in &parts {
            tpl.add_partition(topic, *p);
        }
        let committed = self
            .group
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| kafka_error("reading the group's committed offsets", e))?;
        let ends = self.ends(topic, &parts)?;
        let mut lag = 0u64;
        for (p, (low, end)) in ends {
            let from = match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(c)) => c.max(low),
                _ => low,
            };
            lag += u64::try_from(end - from).unwrap_or(0);
        }
        Ok(lag)
    }

    /// Per partition of `topic`: the low watermark and the offset after the last record.
    ///
    /// The high watermark should be that offset, but some Kafka-protocol brokers (tansu)
    /// answer the base offset of the last record batch plus one: the tail from the high
    /// watermark's previous offset on is read to find the real end.
    fn ends(&self, topic: &str, parts: &[i32]) -> Result<BTreeMap<i32, (i64, i64)>, BrokerError> {
        let tail = self.tail.lock();
        let mut ends = BTreeMap::new();
        let mut from = TopicPartitionList::with_capacity(parts.len());
        for p in parts {
            let (low, high) = tail
                .fetch_watermarks(topic, *p, REQUEST_TIMEOUT)
                .map_err(|e| kafka_error("reading the topic's watermarks", e))?;
            ends.insert(*p, (low, high));
            if high > low {
                from.add_partition_offset(topic, *p, Offset::Offset(high - 1))
                    .map_err(|e| kafka_error("reading the topic's tail", e))?;
            }
        }
        if from.count() == 0 {
            return Ok(ends);
        }
        tail.assign(&from)
            .map_err(|e| kafka_error("reading the topic's tail", e))?;
        let start = std::time::Instant::now();
        let mut waiting: BTreeSet<i32> = from.elements().iter().map(|e| e.partition()).collect();
        let mut quiet_from = None;
        loop {
            let now = std::time::Instant::now();
            // Every partition answered, and nothing came for a while: the end.
            if waiting.is_empty()
                && quiet_from.is_some_and(|q: std::time::Instant| now - q > TAIL_QUIET)
            {
                break;
            }
            if now - start > REQUEST_TIMEOUT {
                break;
            }
            match tail.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    waiting.remove(&m.partition());
                    if let Some((_, end)) = ends.get_mut(&m.partition()) {
                        *end = (*end).max(m.offset() + 1);
                    }
                    quiet_from = Some(std::time::Instant::now());
                }
                Some(Err(e)) => return Err(kafka_error("reading the topic's tail", e)),
                None => {
                    quiet_from.get_or_insert(now);
                }
            }
        }
        let _ = tail.unassign();
        Ok(ends)
    }

    fn open_reader(&self) -> Result<Option<DeadReader>, BrokerError> {
        let topic = &self.config.dead_letter_topic;
        let consumer: BaseConsumer<DefaultConsumerContext> = client_config(&self.url)?
            .set("group.id", KafkaAdmin::dead_letter_group(&self.config))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| kafka_error("creating the dead-letter reader", e))?;
        let Some(parts) = partitions(&consumer, topic)? else {
            return Ok(None);
        };
        let mut tpl = TopicPartitionList::with_capacity(parts.len());
        for p in &parts {
            tpl.add_partition(topic, *p);
        }
        let committed_tpl = consumer
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| kafka_error("reading the dead-letter group's offsets", e))?;
        let mut assign = TopicPartitionList::with_capacity(parts.len());
        let mut next = BTreeMap::new();
        let mut committed = BTreeMap::new();
        for p in parts {
            let (low, _) = consumer
                .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
                .map_err(|e| kafka_error("reading the dead-letter topic's watermarks", e))?;
            let start = match committed_tpl.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(c)) => {
                    committed.insert(p, c);
                    c.max(low)
                }
                _ => low,
            };
            next.insert(p, start);
            assign
                .add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(|e| kafka_error("assigning the dead-letter topic", e))?;
        }
        consumer
            .assign(&assign)
            .map_err(|e| kafka_error("assigning the dead-letter topic", e))?;
        Ok(Some(DeadReader {
            consumer,
            next,
            open: BTreeMap::new(),
            committed,
        }))
    }

    fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut guard = self.dead.lock();
        if guard.is_none() {
            *guard = self.open_reader()?;
        }
        let Some(reader) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let topic = &self.config.dead_letter_topic;
        // What is there now: read up to the end of every partition.
        let parts: Vec<i32> = reader.next.keys().copied().collect();
        let high: BTreeMap<i32, i64> = self
            .ends(topic, &parts)?
            .into_iter()
            .map(|(p, (_, end))| (p, end))
            .collect();
        let behind = |reader: &DeadReader| {
            reader
                .next
                .iter()
                .any(|(p, n)| high.get(p).is_some_and(|h| n < h))
        };
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        let mut out = Vec::new();
        while out.len() < max && behind(reader) {
            if std::time::Instant::now() >= deadline {
                return Err(BrokerError::new(
                    BrokerErrorKind::Timeout,
                    format!("reading the dead-letter topic {topic:?}: no record within 10 s"),
                ));
            }
            let Some(polled) = reader.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let record = polled.map_err(|e| kafka_error("reading the dead-letter topic", e))?;
            let (p, o) = (record.partition(), record.offset());
            reader.next.insert(p, o + 1);
            reader.open.entry(p).or_default().insert(o);
            out.push(self.dead_letter(&record, p, o));
        }
        Ok(out)
    }

    fn dead_letter(
        &self,
        record: &impl rdkafka::Message,
        partition: i32,
        offset: i64,
    ) -> DeadLetter {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        let mut reason = None;
        let mut origin = None;
        let mut message_id = None;
        let mut headers: Vec<(String, Bytes)> = Vec::new();
        if let Some(hs) = record.headers() {
            for h in hs.iter() {
                let value = h.value.unwrap_or_default();
                if h.key == header::DEAD_LETTER_REASON {
                    reason = Some(text(value));
                } else if h.key == header::DEAD_LETTER_ORIGIN {
                    origin = Some(text(value));
                } else if is_dead_letter_header(h.key)
                    || h.key == DEAD_LETTER_PARTITION
                    || h.key == DEAD_LETTER_OFFSET
                    || h.key == RECORD_KEY_HEADER
                {
                } else {
                    if h.key == header::MESSAGE_ID && message_id.is_none() {
                        message_id = Some(text(value));
                    }
                    headers.push((h.key.to_owned(), Bytes::copy_from_slice(value)));
                }
            }
        }
        let origin = origin.unwrap_or_else(|| self.config.topic.clone());
        let mut message = Message::new(
            origin,
            Bytes::copy_from_slice(record.payload().unwrap_or_default()),
        );
        if let Some(id) = message_id {
            message = message.with_message_id(id);
        }
        if let Some(k) = record.key() {
            message = message.with_header(RECORD_KEY_HEADER, Bytes::copy_from_slice(k));
        }
        for (name, value) in headers {
            message = message.with_header(name, value);
        }
        DeadLetter::new(
            message,
            reason,
            Locator::Entry(format!("{partition}:{offset}")),
            self.reader,
        )
    }

    /// Marks a republished dead letter done: commits the dead-letter group past every dead
    /// letter of its partition republished without a gap.
    fn done(&self, partition: i32, offset: i64) -> Result<(), BrokerError> {
        let mut guard = self.dead.lock();
        let Some(reader) = guard.as_mut() else {
            return Ok(());
        };
        let Some(open) = reader.open.get_mut(&partition) else {
            return Ok(());
        };
        open.remove(&offset);
        let point = open
            .first()
            .copied()
            .or_else(|| reader.next.get(&partition).copied());
        let Some(point) = point else {
            return Ok(());
        };
        if reader
            .committed
            .get(&partition)
            .is_some_and(|c| *c >= point)
        {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(
            &self.config.dead_letter_topic,
            partition,
            Offset::Offset(point),
        )
        .map_err(|e| kafka_error("marking a dead letter done", e))?;
        reader
            .consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| kafka_error("marking a dead letter done", e))?;
        reader.committed.insert(partition, point);
        Ok(())
    }
}

impl Admin for KafkaAdmin {
    async fn backlog(&self) -> Result<Option<u64>, BrokerError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.backlog().map(Some)).await
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.dead_letters(max)).await
    }

    async fn republish(&self, dead_letter: DeadLetter) -> Result<(), BrokerError> {
        check_reader(&dead_letter, self.inner.reader)?;
        let spot = match &dead_letter.locator {
            Locator::Entry(at) => at
                .split_once(':')
                .and_then(|(p, o)| Some((p.parse::<i32>().ok()?, o.parse::<i64>().ok()?))),
            _ => None,
        };
        let Some((partition, offset)) = spot else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a Kafka dead letter",
            ));
        };
        let message = dead_letter.message();
        let mut key = None;
        let mut headers = OwnedHeaders::new_with_capacity(message.headers().count() + 1);
        for (name, value) in message.headers() {
            if name == RECORD_KEY_HEADER {
                key = key.or(Some(value));
            } else {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
        }
        if message.header(header::MESSAGE_ID).is_none()
            && let Some(id) = message.message_id()
        {
            headers = headers.insert(Header {
                key: header::MESSAGE_ID,
                value: Some(id),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(message.origin())
            .payload(&message.payload()[..])
            .headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        self.inner
            .producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| {
                kafka_error(
                    &format!("republishing a dead letter to {:?}", message.origin()),
                    e,
                )
            })?;
        let inner = Arc::clone(&self.inner);
        if let Err(e) = blocking(move || inner.done(partition, offset)).await {
            // Republished: a copy read again later is a duplicate the store recognises.
            tracing::warn!(error = %e, partition, offset, "republished, but the dead letter could not be marked done: the next admin reads it again");
        }
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), BrokerError> {
        let config = &self.inner.config;
        let admin: AdminClient<DefaultClientContext> = client_config(&self.inner.url)?
            .create()
            .map_err(|e| kafka_error("creating a Kafka admin client", e))?;
        let opts = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let topics = [config.topic.as_str(), config.dead_letter_topic.as_str()];
        let deleted = tokio::time::timeout(
            REQUEST_TIMEOUT + Duration::from_secs(5),
            admin.delete_topics(&topics, &opts),
        )
        .await
        .map_err(|_| {
            BrokerError::new(
                BrokerErrorKind::Timeout,
                "deleting the topics: no answer within 15 s",
            )
        })?
        .map_err(|e| kafka_error("deleting the topics", e))?;
        for r in deleted {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => {
                    return Err(BrokerError::new(
                        super::classify(code),
                        format!("deleting the topic {topic:?}: {code}"),
                    ));
                }
            }
        }
        // Groups: best effort (an unknown or still-empty group is fine, and not every
        // Kafka-protocol broker implements DeleteGroups).
        let dead_group = KafkaAdmin::dead_letter_group(config);
        let groups = [config.group.as_str(), dead_group.as_str()];
        match tokio::time::timeout(
            REQUEST_TIMEOUT + Duration::from_secs(5),
            admin.delete_groups(&groups, &opts),
        )
        .await
        {
            Ok(Ok(results)) => {
                for r in results {
                    if let Err((group, code)) = r
                        && code != RDKafkaErrorCode::GroupIdNotFound
                    {
                        tracing::debug!(group, %code, "consumer group not deleted");
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "consumer groups not deleted"),
            Err(_) => tracing::debug!("deleting the consumer groups: no answer"),
        }
        Ok(())
    }
}
