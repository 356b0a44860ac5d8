//! [`RocketMqAdmin`]: the backlog of a consumer group on its topic (and its retry topic), its
//! dead letters (idem's dead-letter topic and the broker's `%DLQ%<group>`), republishing them
//! with the same message id, and clean-up. See [`Admin`].
//!
//! What `rocketmq-client-rust` 1.0 allows without its `admin-*` features, and so what this admin
//! does:
//! - **Backlog**: for each queue of the topic and of `%RETRY%<group>`, the broker's max offset
//!   minus the group's committed offset (its min offset when the group has none). Messages
//!   sent back and still waiting out their delay level (in the broker's schedule topic) are
//!   not counted until they reach the retry topic; offsets the consumers have not persisted
//!   yet (every 5 s) are counted.
//! - **Dead letters** are read with a pull consumer of a group of the admin's own,
//!   `<group>-idem-admin`: RocketMQ cannot delete a message, so a dead letter counts as removed
//!   once republished, and the admin group's offset (committed at the broker at once) moves
//!   past every dead letter republished in order: a later admin starts after them. One
//!   republished out of order is shown again until those before it in its queue are
//!   republished too (republishing it again is a duplicate the store recognises). The
//!   broker's own `%DLQ%<group>` is read when the broker lets it be read (Apache RocketMQ
//!   creates it write-only: give it read permission to redrive from it); its messages carry
//!   the reason `rocketmq: max reconsume times exceeded`.
//! - **Clean-up** cannot delete topics or groups (that needs the client's `admin-mutation`
//!   feature): it moves the group's offsets on the topic and its retry topic, and the admin
//!   group's offsets on the dead-letter topics, to their ends, so that nothing is left for the
//!   group. The topics stay on the broker.

// The classic pull consumer reads a queue from an offset the admin chooses, which is what
// reading dead letters needs; the client deprecates it in favour of the lite pull consumer.
#![allow(deprecated)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use rocketmq_client_rust::{ClientInstanceHandle, DefaultMQPullConsumer, PullStatus};
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_queue::MessageQueue;

use super::source::{is_system_property, message_id_of, properties_of};
use super::{Domain, RocketMqConfig, RocketMqProducer, client_error};
use crate::admin::{Admin, DeadLetter, Locator, check_reader, is_dead_letter_header, next_reader};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::{Message, header};
use crate::producer::Outgoing;

const TIMEOUT_MS: u64 = 3000;

/// The reason given for messages the broker dead-lettered itself.
pub const BROKER_DEAD_LETTER_REASON: &str = "rocketmq: max reconsume times exceeded";

/// A default value of the type of the third argument of `f`: the request headers of the
/// client's instance API, whose crate this one does not depend on.
fn header_of<A: ?Sized + 'static, H: Default, R>(
    _f: impl FnOnce(&'static ClientInstanceHandle, &'static A, H, u64) -> R,
) -> H {
    H::default()
}

/// Where the admin reads one dead-letter queue from, and what it republished there.
#[derive(Default)]
struct Cursor {
    /// The admin group's committed offset: every dead letter before it is republished.
    committed: i64,
    /// The next offset to read.
    next: i64,
    /// Offsets republished past `committed`.
    done: BTreeSet<i64>,
}

/// Operations on the topic and consumer group of a [`RocketMqConfig`] and its dead letters.
/// See the [module docs](self).
pub struct RocketMqAdmin {
    config: Arc<RocketMqConfig>,
    domain: Arc<Domain>,
    instance: Arc<ClientInstanceHandle>,
    reader: Arc<DefaultMQPullConsumer>,
    producer: RocketMqProducer,
    cursors: Mutex<HashMap<MessageQueue, Cursor>>,
    id: u64,
}

impl std::fmt::Debug for RocketMqAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocketMqAdmin")
            .field("topic", &self.config.topic)
            .field("group", &self.config.group)
            .finish_non_exhaustive()
    }
}

impl RocketMqAdmin {
    /// Starts a client runtime of its own, a client instance (which joins no consumer group),
    /// a pull consumer in `<group>-idem-admin` and a producer. Declares nothing.
    ///
    /// # Errors
    /// The URL is wrong or the client cannot start.
    pub async fn connect(url: &str, config: RocketMqConfig) -> Result<Self, BrokerError> {
        let domain = Domain::new("admin", 1, std::time::Duration::from_secs(30))?;
        let client_config = Domain::client_config(url, "idem-admin", config.route_poll)?;
        let reader_config = Domain::client_config(url, "idem-admin-reader", config.route_poll)?;
        let runtime = Arc::clone(&domain.client);
        let group = format!("{}-idem-admin", config.group);
        let namesrv = super::name_servers(url)?;
        let started = domain
            .run(async move {
                let instance =
                    ClientInstanceHandle::get_or_create(&runtime, 1, client_config, None)?;
                instance.start().await?;
                let _ = reader_config;
                let reader = DefaultMQPullConsumer::builder(Arc::clone(&runtime))
                    .consumer_group(group)
                    .name_server_addr(namesrv)
                    .build()?;
                reader.start().await?;
                Ok::<_, rocketmq_client_rust::ClientError>((instance, reader))
            })
            .await?;
        let (instance, reader) = started.map_err(|e| client_error("starting the admin", e))?;
        let producer = RocketMqProducer::connect(url).await?;
        Ok(Self {
            config: Arc::new(config),
            domain,
            instance: Arc::new(instance),
            reader: Arc::new(reader),
            producer,
            cursors: Mutex::new(HashMap::new()),
            id: next_reader(),
        })
    }

    /// The queues of `topic` with their broker's address; none when the topic does not exist.
    async fn queues(&self, topic: &str) -> Result<Vec<(MessageQueue, String)>, BrokerError> {
        let instance = Arc::clone(&self.instance);
        let t = topic.to_owned();
        let route = self
            .domain
            .run(async move { instance.topic_route(&t, TIMEOUT_MS).await })
            .await?;
        let route = match route {
            Ok(Some(route)) => route,
            Ok(None) => return Ok(Vec::new()),
            Err(e) => {
                let text = e.to_string();
                if text.contains("not exist") || text.contains("TOPIC_NOT_EXIST") {
                    return Ok(Vec::new());
                }
                return Err(client_error(
                    &format!("reading the route of {topic:?}"),
                    text,
                ));
            }
        };
        let mut out = Vec::new();
        for queue in &route.queue_datas {
            let broker = queue.broker_name.as_str();
            let Some(addr) = route
                .broker_datas
                .iter()
                .find(|b| b.broker_name().as_str() == broker)
                .and_then(|b| b.broker_addrs().get(&0).map(|a| a.as_str().to_owned()))
            else {
                continue;
            };
            for id in 0..queue.read_queue_nums {
                let id = i32::try_from(id).unwrap_or(i32::MAX);
                out.push((MessageQueue::from_parts(topic, broker, id), addr.clone()));
            }
        }
        Ok(out)
    }

    /// Messages of `topic` the group has not consumed.
    async fn lag(&self, topic: &str) -> Result<u64, BrokerError> {
        let mut total = 0u64;
        for (queue, addr) in self.queues(topic).await? {
            let instance = Arc::clone(&self.instance);
            let group = self.config.group.clone();
            let offsets = self
                .domain
                .run(async move {
                    let max = instance.max_offset(&addr, &queue, TIMEOUT_MS).await?;
                    let mut h = header_of(ClientInstanceHandle::query_consumer_offset);
                    h.consumer_group = group.as_str().into();
                    h.topic = queue.topic_str().into();
                    h.queue_id = queue.queue_id();
                    let committed = match instance.query_consumer_offset(&addr, h, TIMEOUT_MS).await
                    {
                        Ok(o) if o >= 0 => o,
                        _ => instance.min_offset(&addr, &queue, TIMEOUT_MS).await?,
                    };
                    Ok::<_, rocketmq_client_rust::ClientError>((max, committed))
                })
                .await?
                .map_err(|e| client_error(&format!("reading the offsets of {topic:?}"), e))?;
            total += u64::try_from(offsets.0 - offsets.1).unwrap_or(0);
        }
        Ok(total)
    }

    /// Commits the admin group's offset on `queue` at the broker. The broker keeps offsets only
    /// for groups it knows: a pull (of nothing, past the end) makes it create the admin group.
    async fn commit_admin(&self, queue: &MessageQueue, offset: i64) -> Result<(), BrokerError> {
        let what = format!(
            "recording dead letters as republished in {:?}",
            queue.topic_str()
        );
        let Some(addr) = self
            .queues(queue.topic_str())
            .await?
            .into_iter()
            .find(|(q, _)| q == queue)
            .map(|(_, a)| a)
        else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                format!("{what}: the queue is gone"),
            ));
        };
        let group = format!("{}-idem-admin", self.config.group);
        let update = |instance: Arc<ClientInstanceHandle>, addr: String, q: MessageQueue| {
            let group = group.clone();
            async move {
                let mut h = header_of(ClientInstanceHandle::update_consumer_offset);
                h.consumer_group = group.as_str().into();
                h.topic = q.topic_str().into();
                h.queue_id = q.queue_id();
                h.commit_offset = offset;
                instance
                    .update_consumer_offset(&addr.as_str().into(), h, TIMEOUT_MS)
                    .await
            }
        };
        let first = self
            .domain
            .run(update(
                Arc::clone(&self.instance),
                addr.clone(),
                queue.clone(),
            ))
            .await?;
        if first.is_ok() {
            return Ok(());
        }
        // The broker does not know the admin group yet: a pull makes it create the group.
        let (reader, q) = (Arc::clone(&self.reader), queue.clone());
        let _ = self
            .domain
            .run(async move { reader.pull(&q, "*", offset, 1).await })
            .await?;
        self.domain
            .run(update(Arc::clone(&self.instance), addr, queue.clone()))
            .await?
            .map_err(|e| client_error(&what, e))
    }

    /// Moves `group`'s offset on every queue of `topic` to its end.
    async fn skip_to_end(&self, topic: &str, group: &str) -> Result<(), BrokerError> {
        for (queue, addr) in self.queues(topic).await? {
            let instance = Arc::clone(&self.instance);
            let group = group.to_owned();
            self.domain
                .run(async move {
                    let max = instance.max_offset(&addr, &queue, TIMEOUT_MS).await?;
                    let mut h = header_of(ClientInstanceHandle::update_consumer_offset);
                    h.consumer_group = group.as_str().into();
                    h.topic = queue.topic_str().into();
                    h.queue_id = queue.queue_id();
                    h.commit_offset = max;
                    instance
                        .update_consumer_offset(&addr.as_str().into(), h, TIMEOUT_MS)
                        .await
                })
                .await?
                .map_err(|e| client_error(&format!("moving the offsets of {topic:?}"), e))?;
        }
        Ok(())
    }

    fn dead_letter(&self, ext: &MessageExt, queue: &MessageQueue, broker_dlq: bool) -> DeadLetter {
        let properties = properties_of(ext);
        let reason = if broker_dlq {
            Some(BROKER_DEAD_LETTER_REASON.to_owned())
        } else {
            properties.get(header::DEAD_LETTER_REASON).cloned()
        };
        let origin = properties
            .get(header::DEAD_LETTER_ORIGIN)
            .or_else(|| properties.get("RETRY_TOPIC"))
            .cloned()
            .unwrap_or_else(|| self.config.topic.clone());
        let mut message = Message::new(origin, ext.body().unwrap_or_default());
        if let Some(id) = message_id_of(&properties) {
            message = message.with_message_id(id);
        }
        let mut headers: Vec<_> = properties
            .into_iter()
            .filter(|(k, _)| {
                !is_system_property(k)
                    && !is_dead_letter_header(k)
                    && k != header::MESSAGE_ID
                    && k != super::EMPTY_ID_PROPERTY
            })
            .collect();
        headers.sort();
        for (name, value) in headers {
            message = message.with_header(name, value.into_bytes());
        }
        let at = format!(
            "{}|{}|{}|{}",
            queue.topic_str(),
            queue.broker_name(),
            queue.queue_id(),
            ext.queue_offset()
        );
        DeadLetter::new(message, reason, Locator::Entry(at), self.id)
    }

    /// Reads up to `max` dead letters of `topic` past the cursors.
    async fn read(
        &self,
        topic: &str,
        max: usize,
        out: &mut Vec<DeadLetter>,
    ) -> Result<(), BrokerError> {
        let broker_dlq = topic.starts_with("%DLQ%");
        for (queue, addr) in self.queues(topic).await? {
            if out.len() >= max {
                break;
            }
            let (instance, q) = (Arc::clone(&self.instance), queue.clone());
            let end = self
                .domain
                .run(async move { instance.max_offset(&addr, &q, TIMEOUT_MS).await })
                .await?
                .map_err(|e| client_error(&format!("reading the offsets of {topic:?}"), e))?;
            let known = self.cursors.lock().get(&queue).map(|c| c.next);
            let next = match known {
                Some(n) => n,
                None => {
                    let reader = Arc::clone(&self.reader);
                    let q = queue.clone();
                    let committed = self
                        .domain
                        .run(async move {
                            match reader.fetch_consume_offset(&q, true).await {
                                Ok(o) if o >= 0 => Ok(o),
                                _ => reader.min_offset(&q).await,
                            }
                        })
                        .await?
                        .map_err(|e| client_error("reading the dead-letter offsets", e))?;
                    self.cursors.lock().insert(
                        queue.clone(),
                        Cursor {
                            committed,
                            next: committed,
                            done: BTreeSet::new(),
                        },
                    );
                    committed
                }
            };
            if next >= end {
                continue;
            }
            let reader = Arc::clone(&self.reader);
            let q = queue.clone();
            let want = i32::try_from((max - out.len()).min(32)).unwrap_or(32);
            let pulled = self
                .domain
                .run(async move { reader.pull(&q, "*", next, want).await })
                .await?;
            let pulled = match pulled {
                Ok(p) => p,
                Err(e) if broker_dlq => {
                    tracing::warn!(topic, error = %e, "cannot read the broker's dead-letter topic");
                    return Ok(());
                }
                Err(e) => return Err(client_error(&format!("reading {topic:?}"), e)),
            };
            if *pulled.pull_status() != PullStatus::Found {
                continue;
            }
            for ext in pulled.msg_found_list().unwrap_or_default() {
                if out.len() >= max {
                    break;
                }
                out.push(self.dead_letter(ext, &queue, broker_dlq));
                if let Some(c) = self.cursors.lock().get_mut(&queue) {
                    c.next = c.next.max(ext.queue_offset() + 1);
                }
            }
        }
        Ok(())
    }
}

impl Admin for RocketMqAdmin {
    async fn backlog(&self) -> Result<Option<u64>, BrokerError> {
        let topic = self.lag(&self.config.topic).await?;
        let retry = self.lag(&self.config.retry_topic()).await?;
        Ok(Some(topic + retry))
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut out = Vec::new();
        self.read(&self.config.dead_letter_topic, max, &mut out)
            .await?;
        if out.len() < max {
            self.read(&self.config.broker_dead_letter_topic(), max, &mut out)
                .await?;
        }
        Ok(out)
    }

    async fn republish(&self, dead_letter: DeadLetter) -> Result<(), BrokerError> {
        check_reader(&dead_letter, self.id)?;
        let Locator::Entry(at) = &dead_letter.locator else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a RocketMQ dead letter",
            ));
        };
        let parts: Vec<&str> = at.split('|').collect();
        let [topic, broker, queue_id, offset] = parts[..] else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a RocketMQ dead letter",
            ));
        };
        let (Ok(queue_id), Ok(offset)) = (queue_id.parse::<i32>(), offset.parse::<i64>()) else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a RocketMQ dead letter",
            ));
        };
        let message = dead_letter.message();
        let mut out = Outgoing::with_id(
            message.message_id().unwrap_or_default(),
            message.payload().clone(),
        );
        for (name, value) in message.headers() {
            out = out.with_header(name, String::from_utf8_lossy(value));
        }
        self.producer.publish(message.origin(), &out).await?;
        // Removed: the admin group's offset moves past every dead letter republished in order.
        let queue = MessageQueue::from_parts(topic, broker, queue_id);
        let commit = {
            let mut cursors = self.cursors.lock();
            let c = cursors.entry(queue.clone()).or_default();
            c.done.insert(offset);
            let before = c.committed;
            while c.done.remove(&c.committed) {
                c.committed += 1;
            }
            (c.committed != before).then_some(c.committed)
        };
        if let Some(offset) = commit {
            self.commit_admin(&queue, offset).await?;
        }
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), BrokerError> {
        let group = self.config.group.clone();
        self.skip_to_end(&self.config.topic, &group).await?;
        self.skip_to_end(&self.config.retry_topic(), &group).await?;
        // The admin group's offsets on the dead-letter topics.
        for topic in [
            self.config.dead_letter_topic.clone(),
            self.config.broker_dead_letter_topic(),
        ] {
            for (queue, addr) in self.queues(&topic).await? {
                let what = format!("moving the offsets of {topic:?}");
                let (instance, q) = (Arc::clone(&self.instance), queue.clone());
                let max = self
                    .domain
                    .run(async move { instance.max_offset(&addr, &q, TIMEOUT_MS).await })
                    .await?
                    .map_err(|e| client_error(&what, e))?;
                self.commit_admin(&queue, max).await?;
            }
        }
        self.cursors.lock().clear();
        Ok(())
    }

    async fn close(self) {
        // Offsets are committed at the broker as they move; the pull consumer's shutdown would
        // only wait out its own timeouts.
        self.domain.kill();
    }
}
