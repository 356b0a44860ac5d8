//! Kafka with `rdkafka` (librdkafka built from its bundled source): [`KafkaSource`] consumes a
//! topic in a consumer group, [`KafkaProducer`] produces with an idempotent producer, and
//! [`admin::KafkaAdmin`] reads the group's lag and its dead letters. URL:
//! `kafka://HOST:PORT[,HOST:PORT…]`, the bootstrap servers (port 9092 when left out; no
//! credentials: SASL and TLS are not built in).
//!
//! Kafka cannot settle one message: a consumer group keeps one **committed offset per
//! partition**, and everything below it counts as done. The adapter turns that into the
//! per-delivery settlement the runtime needs.
//!
//! ## At-least-once settings
//!
//! - **Offsets are stored and committed only for settled messages**:
//!   `enable.auto.offset.store=false`, `enable.auto.commit=false`. For each partition the
//!   adapter keeps the messages it fetched and has not settled (acked, or dead-lettered and
//!   confirmed); the offset it stores and commits is the first of them, so a commit never
//!   passes a message that is still running, waiting for its redelivery, or waiting for its
//!   dead-letter produce. Commits are asynchronous every
//!   [`commit_interval`](KafkaConfig::commit_interval) (default 1 s), synchronous when
//!   partitions are revoked (a rebalance) and when the source closes.
//! - **Lost partitions** (the group moved on without this consumer: a session timeout, a
//!   fenced member) drop their in-flight state **without committing**: the new owner consumes
//!   from the last commit, and the store replays what this consumer completed. Acks that come
//!   in later for a partition no longer held (or held again, in a newer assignment) are
//!   ignored.
//! - **Order** ([`Order`]): by default messages with the same **record key** never run at the
//!   same time and run in offset order, while messages with other keys (and messages without
//!   a key) of the same partition run concurrently, as the Confluent parallel consumer does
//!   in its key mode. [`Order::Partition`] runs one message of a partition at a time, in
//!   offset order.
//! - **Nack = local redelivery**: a nacked message (in progress elsewhere, a released
//!   handler, a store error) is handed out again by this consumer after the delay, with its
//!   delivery count raised; later messages with its key wait behind it, and the committed
//!   offset stays at it. A delivery dropped without being settled (a batch that panicked) is
//!   handed out again after 1 s.
//! - **Bounded memory**: a partition holding more than
//!   [`max_held`](KafkaConfig::max_held) fetched and unsettled messages is paused, and
//!   resumed once it holds half as many. librdkafka drops the messages it had prefetched for
//!   a paused partition and fetches again from the last one handed to the adapter, so nothing
//!   is skipped; since a pause survives a rebalance in librdkafka, every partition is resumed
//!   when it is assigned.
//! - **Dead letters** are produced to [`dead_letter_topic`](KafkaConfig::dead_letter_topic)
//!   (default `<topic>.dlq`) with the same record key, payload and headers, plus
//!   `idem-dead-letter-reason`, `idem-dead-letter-origin` (the topic),
//!   `idem-dead-letter-partition` and `idem-dead-letter-offset`; the original's offset moves
//!   past it only once that produce is acknowledged (`acks=all`, idempotent producer).
//! - **Polling**: a thread of the source's own polls librdkafka, serves rebalances and commits,
//!   so `max.poll.interval.ms` never expires while handlers run (the runtime's leases cover
//!   slow handlers). The thread stops when the source and its ackers are all dropped, closing
//!   the consumer (it leaves the group).
//!
//! ## Keys
//!
//! [`KafkaProducer`] writes the message id in the `message-id` header
//! ([`header::MESSAGE_ID`](crate::header::MESSAGE_ID)), once per [`Outgoing`](crate::Outgoing),
//! and retries with the same id. A record's key is also passed to the handler as the header
//! [`RECORD_KEY_HEADER`] (`kafka-key`), the first header of the message: key idem's records by
//! it with `KeyFrom::Header("kafka-key".into())` (`--key header:kafka-key`). Since Kafka
//! has no delivery counter, a message first seen by this consumer has delivery count 1 even if
//! another consumer had it before a rebalance.
//!
//! ## Limits
//!
//! - One topic per source.
//! - The redelivery of a nacked message is local: if its partition is revoked or lost before
//!   it comes back, the new owner gets it (from the committed offset) instead.
//! - Kafka transactions (and `read_committed`) are not used; offsets are committed by the
//!   group, not in a transaction.

pub mod admin;
mod producer;
mod source;
mod state;

use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

pub use self::producer::{KafkaProducer, Published};
pub use self::source::{KafkaAcker, KafkaDelivery, KafkaSource};
pub use self::source::{OffsetStore, position};

use crate::error::{BrokerError, BrokerErrorKind};

/// The header that carries a record's Kafka key to the handler (the first header of the
/// [`Message`](crate::Message)). A record header of the same name is dropped in its favour.
pub const RECORD_KEY_HEADER: &str = "kafka-key";
/// The header of a dead letter naming the partition it was consumed from.
pub const DEAD_LETTER_PARTITION: &str = "idem-dead-letter-partition";
/// The header of a dead letter naming the offset it was consumed at.
pub const DEAD_LETTER_OFFSET: &str = "idem-dead-letter-offset";
/// The header carrying a message's partition, with [`KafkaConfig::position_headers`].
pub const PARTITION_HEADER: &str = "kafka-partition";
/// The header carrying a message's offset, with [`KafkaConfig::position_headers`].
pub const OFFSET_HEADER: &str = "kafka-offset";

/// Which messages of a partition may run at the same time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Order {
    /// Messages with the same record key run one at a time, in offset order; other keys, and
    /// messages without a key, run concurrently (the default).
    #[default]
    PerKey,
    /// One message of a partition at a time, in offset order (partitions still run
    /// concurrently).
    Partition,
}

/// What [`KafkaSource`] consumes, and how.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// The topic.
    pub topic: String,
    /// The consumer group (`group.id`). Replicas of a consumer share it.
    pub group: String,
    /// Which messages may run at the same time (default [`Order::PerKey`]).
    pub order: Order,
    /// Where dead letters go (default `<topic>.dlq`).
    pub dead_letter_topic: String,
    /// How often settled offsets are committed (asynchronously) while consuming (default 1 s).
    /// They are also committed, synchronously, on revoke and on close.
    pub commit_interval: Duration,
    /// Fetched and unsettled messages a partition may hold before it is paused (default
    /// 10,000); it is resumed at half. A resumed partition is fetched again from the last
    /// message handed to the adapter (librdkafka drops what it prefetched for it), so a low
    /// value costs throughput on a backlog.
    pub max_held: usize,
    /// The group's session timeout (`session.timeout.ms`, default 10 s): how long a consumer
    /// that stopped heartbeating (a crash) keeps its partitions. The heartbeat interval is a
    /// tenth of it (between 100 ms and 3 s).
    pub session_timeout: Duration,
    /// Create the topic and the dead-letter topic when they do not exist (default true), with
    /// [`partitions`](KafkaConfig::partitions) partitions; false makes a missing topic an
    /// error at connect.
    pub declare: bool,
    /// Partitions of the topics this adapter creates (default 1).
    pub partitions: i32,
    /// librdkafka properties set last, over the adapter's own (`client.id`,
    /// `fetch.max.bytes`, `partition.assignment.strategy`, …). Setting the ones the
    /// guarantees rest on (`enable.auto.offset.store`, `enable.auto.commit`) is refused.
    pub properties: Vec<(String, String)>,
    /// Pass each message's partition and offset to the handler as the headers
    /// [`PARTITION_HEADER`] and [`OFFSET_HEADER`] (read them with [`position`]); default false.
    pub position_headers: bool,
    /// Offsets kept outside the group (see [`stored_offsets`](KafkaConfig::stored_offsets)).
    pub offsets: Option<Offsets>,
}

/// An [`OffsetStore`] in a [`KafkaConfig`].
#[derive(Clone)]
pub struct Offsets(pub std::sync::Arc<dyn OffsetStore>);

impl fmt::Debug for Offsets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Offsets(..)")
    }
}

impl KafkaConfig {
    /// Consume `topic` in `group`.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        let topic = topic.into();
        Self {
            dead_letter_topic: format!("{topic}.dlq"),
            topic,
            group: group.into(),
            order: Order::PerKey,
            commit_interval: Duration::from_secs(1),
            max_held: 10_000,
            session_timeout: Duration::from_secs(10),
            declare: true,
            partitions: 1,
            properties: Vec::new(),
            position_headers: false,
            offsets: None,
        }
    }

    /// Sets the [`Order`].
    #[must_use]
    pub fn order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// Sets the dead-letter topic.
    #[must_use]
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = topic.into();
        self
    }

    /// Sets the commit interval.
    #[must_use]
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.commit_interval = every;
        self
    }

    /// Sets how many unsettled messages a partition holds before it is paused (at least 1).
    #[must_use]
    pub fn max_held(mut self, n: usize) -> Self {
        self.max_held = n.max(1);
        self
    }

    /// Sets the session timeout.
    #[must_use]
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Sets whether missing topics are created (see [`declare`](KafkaConfig::declare)).
    #[must_use]
    pub fn declare(mut self, declare: bool) -> Self {
        self.declare = declare;
        self
    }

    /// Sets how many partitions created topics get (at least 1).
    #[must_use]
    pub fn partitions(mut self, n: i32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// Passes each message's partition and offset as headers (see
    /// [`position_headers`](KafkaConfig::position_headers)).
    #[must_use]
    pub fn position_headers(mut self, on: bool) -> Self {
        self.position_headers = on;
        self
    }

    /// **Offsets in the transaction**: the handler writes each message's offset where its
    /// effects go, in the same transaction (transactional mode on a SQL store), and `store`
    /// loads them back. When partitions are assigned, the consumer starts each one at the
    /// later of the group's committed offset and the stored one, so that a consumer killed
    /// after its transactions committed and before the group's commit does not consume those
    /// messages again at all. Turns [`position_headers`](KafkaConfig::position_headers) on:
    /// [`position`] gives the handler the partition and offset to store (store `offset + 1`,
    /// the next one to consume).
    ///
    /// The stored value must be a watermark: with [`Order::Partition`] each transaction's
    /// `offset + 1` is one (write it with "keep the larger"); with [`Order::PerKey`] messages
    /// of a partition finish out of order, so the store must keep the completed offsets and
    /// load the end of their contiguous run. `load` runs on the polling thread, during the
    /// rebalance: keep it short.
    #[must_use]
    pub fn stored_offsets(mut self, store: impl OffsetStore) -> Self {
        self.offsets = Some(Offsets(std::sync::Arc::new(store)));
        self.position_headers = true;
        self
    }

    /// Sets a librdkafka property (see [`properties`](KafkaConfig::properties)).
    #[must_use]
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((name.into(), value.into()));
        self
    }

    fn check(&self) -> Result<(), BrokerError> {
        let bad = |what: String| Err(BrokerError::new(BrokerErrorKind::Config, what));
        if self.topic.trim().is_empty() {
            return bad("the Kafka topic is empty".to_owned());
        }
        if self.group.trim().is_empty() {
            return bad("the Kafka consumer group is empty".to_owned());
        }
        if self.dead_letter_topic == self.topic {
            return bad(format!(
                "the dead-letter topic must differ from the topic {:?}",
                self.topic
            ));
        }
        if self.commit_interval.is_zero() {
            return bad("the Kafka commit interval must be above zero".to_owned());
        }
        for (name, _) in &self.properties {
            if matches!(
                name.as_str(),
                "enable.auto.offset.store" | "enable.auto.commit" | "group.id"
            ) {
                return bad(format!(
                    "the librdkafka property {name} is the adapter's own: offsets are stored \
                     and committed only for settled messages"
                ));
            }
        }
        Ok(())
    }
}

/// The bootstrap servers of a `kafka://HOST:PORT[,HOST:PORT…]` URL.
pub(crate) fn bootstrap_servers(url: &str) -> Result<String, BrokerError> {
    let bad = |why: &str| {
        BrokerError::new(
            BrokerErrorKind::Config,
            format!(
                "bad Kafka URL {}: {why} (expected kafka://HOST:PORT[,HOST:PORT…])",
                crate::error::redact(url)
            ),
        )
    };
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("kafka") => rest,
        _ => return Err(bad("not a kafka:// URL")),
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains(['/', '?', '#']) {
        return Err(bad("a path or query is not supported"));
    }
    if authority.contains('@') {
        return Err(bad(
            "credentials are not supported (SASL and TLS are not built in)",
        ));
    }
    let mut servers = Vec::new();
    for host in authority.split(',').map(str::trim) {
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let with_port = match host.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !h.ends_with(':') => {
                p.parse::<u16>().map_err(|_| bad("bad port"))?;
                host.to_owned()
            }
            Some(_) => return Err(bad("bad host")),
            None => format!("{host}:9092"),
        };
        servers.push(with_port);
    }
    Ok(servers.join(","))
}

/// The client settings every client of the adapter shares.
pub(crate) fn client_config(url: &str) -> Result<ClientConfig, BrokerError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap_servers(url)?)
        // Loopback brokers often advertise 127.0.0.1 and listen on IPv4 only.
        .set("broker.address.family", "v4")
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "2000")
        .set("log_level", "4");
    Ok(c)
}

/// The settings of an idempotent producer that waits for every in-sync replica.
pub(crate) fn producer_config(url: &str, timeout: Duration) -> Result<ClientConfig, BrokerError> {
    let mut c = client_config(url)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", millis(timeout).to_string());
    Ok(c)
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Maps a librdkafka error to a broker error: `what` failed.
pub(crate) fn kafka_error(what: &str, e: KafkaError) -> BrokerError {
    let kind = match &e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => {
            BrokerErrorKind::Config
        }
        KafkaError::Canceled => BrokerErrorKind::Connection,
        other => other
            .rdkafka_error_code()
            .map_or(BrokerErrorKind::Protocol, classify),
    };
    BrokerError::new(kind, format!("{what}: {e}")).with_source(e)
}

/// The kind of a librdkafka error code.
pub(crate) fn classify(code: RDKafkaErrorCode) -> BrokerErrorKind {
    use RDKafkaErrorCode as C;
    match code {
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::NotCoordinator
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress
        | C::BrokerDestroy
        | C::WaitingForCoordinator
        | C::RebalanceInProgress
        | C::PreviousInProgress => BrokerErrorKind::Connection,
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut => BrokerErrorKind::Timeout,
        C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::QueueFull
        | C::OutOfOrderSequenceNumber
        | C::DuplicateSequenceNumber
        | C::InvalidProducerEpoch
        | C::KafkaStorageError
        | C::ThrottlingQuotaExceeded => BrokerErrorKind::Rejected,
        C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::InvalidConfig
        | C::InvalidArgument
        | C::InvalidTopic
        | C::InvalidGroupId
        | C::MessageSizeTooLarge
        | C::InvalidReplicationFactor
        | C::InvalidPartitions
        | C::SaslAuthenticationFailed
        | C::Authentication => BrokerErrorKind::Config,
        _ => BrokerErrorKind::Protocol,
    }
}

/// Creates `topics` with `partitions` partitions each, unless they exist.
pub(crate) async fn create_topics(
    url: &str,
    topics: &[&str],
    partitions: i32,
) -> Result<(), BrokerError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = client_config(url)?
        .create()
        .map_err(|e| kafka_error("creating a Kafka admin client", e))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions.max(1), TopicReplication::Fixed(-1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = tokio::time::timeout(Duration::from_secs(15), admin.create_topics(&new, &opts))
        .await
        .map_err(|_| {
            BrokerError::new(
                BrokerErrorKind::Timeout,
                format!("creating the topics {topics:?}: the broker did not answer within 15 s"),
            )
        })?
        .map_err(|e| kafka_error("creating the topics", e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BrokerError::new(
                    classify(code),
                    format!("creating the topic {topic:?}: {code}"),
                ));
            }
        }
    }
    Ok(())
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Order::PerKey => "key",
            Order::Partition => "partition",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bootstrap_servers() {
        let ok = |u: &str| bootstrap_servers(u).unwrap_or_else(|e| panic!("{u}: {e}"));
        assert_eq!(ok("kafka://127.0.0.1:19092"), "127.0.0.1:19092");
        assert_eq!(ok("kafka://a:1,b:2/"), "a:1,b:2");
        assert_eq!(ok("KAFKA://broker"), "broker:9092");
        for bad in [
            "kafka://",
            "kafka://a:1,,b:2",
            "kafka://user:secret@h:9092",
            "kafka://h:9092/topic",
            "kafka://h:port",
            "nats://h:4222",
        ] {
            let e = bootstrap_servers(bad).expect_err(bad);
            assert_eq!(e.kind(), BrokerErrorKind::Config, "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn refuses_what_the_guarantees_rest_on() {
        let c = KafkaConfig::new("t", "g").property("enable.auto.commit", "true");
        assert!(c.check().is_err());
        assert!(
            KafkaConfig::new("t", "g")
                .dead_letter_topic("t")
                .check()
                .is_err()
        );
        assert!(KafkaConfig::new("t", "g").check().is_ok());
        assert_eq!(KafkaConfig::new("t", "g").dead_letter_topic, "t.dlq");
    }

    #[test]
    fn classifies_error_codes() {
        assert_eq!(
            classify(RDKafkaErrorCode::AllBrokersDown),
            BrokerErrorKind::Connection
        );
        assert_eq!(
            classify(RDKafkaErrorCode::MessageTimedOut),
            BrokerErrorKind::Timeout
        );
        assert_eq!(
            classify(RDKafkaErrorCode::UnknownTopicOrPartition),
            BrokerErrorKind::Config
        );
        assert!(classify(RDKafkaErrorCode::NotEnoughReplicas).is_transient());
    }
}
