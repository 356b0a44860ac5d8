//! # idem-broker: the consumer runtime and broker adapters
//!
//! A [`Consumer`] takes a [`Source`] (one queue, subject, topic or stream of a broker), an
//! [`idem::Executor`] over any [`idem::Store`] (SQLite, memory, and the networked stores as they
//! come), a key source ([`KeyFrom`]), a fingerprint choice ([`FingerprintFrom`]) and a
//! [`Handler`], and runs the handler **once per key** however often the broker delivers:
//!
//! ```no_run
//! # #[cfg(feature = "amqp")]
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idem::{Attempt, Executor, Namespace};
//! use idem_broker::amqp::{AmqpConfig, AmqpSource};
//! use idem_broker::{Consumer, KeyFrom, Message, shutdown_signal};
//! use idem_sqlite::SqliteStore;
//!
//! let source = AmqpSource::connect("amqp://guest:guest@127.0.0.1:5672/%2f", AmqpConfig::new("orders")).await?;
//! let consumer = Consumer::new(
//!     source,
//!     Executor::new(SqliteStore::open("idem.db")?),
//!     Namespace::new("billing")?,
//!     |msg: Message, attempt: Attempt| async move {
//!         // charge the customer, passing attempt.idempotency_key() to the payment API
//!         Ok::<_, std::io::Error>(format!("charged for {} bytes", msg.payload().len()))
//!     },
//! )
//! .key(KeyFrom::MessageId) // the default: the id the producer set at the origin
//! .batch_size(64)
//! .concurrency(4);
//! let stats = consumer.run(shutdown_signal()).await?; // SIGTERM / ctrl-c: graceful stop
//! println!("{stats:?}");
//! # Ok(()) }
//! ```
//!
//! ## What the runtime does with each delivery (docs/design.md, section 6)
//!
//! Each batch goes through [`idem::Executor::run_batch`]: one claim round trip, handlers run
//! concurrently, each group of handlers that finish together is completed in one round trip.
//!
//! | outcome | settlement |
//! |---|---|
//! | executed (the completion is durable), or a duplicate replayed | **ack**, many at once where the broker allows |
//! | in progress on another consumer | **nack with delay** (the rest of its lease): never acked, never dropped |
//! | handler failed, claim released | nack with the executor's backoff |
//! | store error | nack with backoff (**fail closed**: nothing acked, no handler without a claim) |
//! | no key, no fingerprint, payload mismatch, attempts exhausted | **dead-letter** with the reason; ack only after the dead-letter publish is confirmed |
//!
//! A handler that panics counts as a failed attempt. Copies of one key inside one batch (a
//! producer retry often lands right behind the original) are processed after the first copy's
//! round, so they replay its result instead of waiting out a lease.
//!
//! **Shutdown** ([`Consumer::run`]'s future, e.g. [`shutdown_signal`]): stop receiving, finish
//! in-flight batches within [`Settings::shutdown_grace`] and settle them; past the grace, abort
//! what is left and release its claims (fenced by token, so the redeliveries need not wait out
//! the lease); then close the source: whatever is unsettled goes back to the broker. **Connection loss**: sources reconnect with
//! backoff; a delivery whose ack could not be sent is redelivered and replayed from the store,
//! so nothing is acked twice as a success or lost.
//!
//! ## Adapters (cargo features)
//!
//! | feature | module | broker | dead letters |
//! |---|---|---|---|
//! | `amqp` | `amqp` | RabbitMQ (lapin): manual acks, quorum queues, publisher confirms | `<queue>.dlx` → `<queue>.dlq` |
//! | `nats` | `nats` | NATS JetStream (async-nats): explicit AckSync, `Nak` delay, `+WPI` | stream `<stream>_DLQ` |
//! | `mqtt` | `mqtt` | MQTT 5 (rumqttc, Mosquitto): persistent session, QoS 1, manual acks | session `<client>.dead-letter` |
//! | `redis-streams` | `redis_streams` | Redis Streams: consumer groups, `XAUTOCLAIM` | stream `<stream>:dead-letter` |
//! | `stomp` | `stomp` | STOMP 1.2 (ActiveMQ Classic): `client-individual` acks, persistent sends with receipts, delayed retries held by the source (never NACK) | queue `DLQ.<queue>` |
//! | `kafka` | `kafka` | Kafka (rdkafka, librdkafka built from source): consumer groups, offsets stored only once settled and committed up to the oldest unsettled message, per-key lanes, optional offsets in the transaction | topic `<topic>.dlq` |
//! | `rocketmq` | `rocketmq` | RocketMQ (rocketmq-client-rust 1.0): push consumer in a consumer group, offsets move on once a listener call's messages are settled, nacks sent back to the retry topic | topic `<group>_IDEM_DLQ` |
//!
//! Each module documents its at-least-once settings and their limits, and has an `admin`
//! module ([`Admin`]: backlog, dead letters read back with their reasons and republished with
//! the same message id, clean-up). [`memory`] is an
//! in-process broker for tests. Producers (`amqp::AmqpProducer`, `nats::NatsProducer`,
//! `mqtt::MqttProducer`, `redis_streams::RedisStreamProducer`, `stomp::StompProducer`,
//! `kafka::KafkaProducer` (idempotent, `acks=all`), `rocketmq::RocketMqProducer`) publish an [`Outgoing`]
//! whose id is fixed once at the origin and reused on every retry, with the broker's publish
//! confirmation (and its dedup, where it has one).
//!
//! ## Building on it
//!
//! A new broker implements [`Source`] and [`Acker`] (and [`Admin`] for its backlog, dead letters
//! and clean-up). Tools that pick things at run time (a sidecar taking `--from URL` and
//! `--key header:NAME|json:/path|hash`) parse a [`BrokerUrl`], check [`SourceOptions`] against
//! it into a [`SourceConfig`] and connect it as an [`AnySource`] (the broker twin of
//! [`idem::AnyStore`]; [`SourceConfig::admin`] gives its [`AnyAdmin`], [`BrokerUrl::producer`]
//! an [`AnyProducer`]), parse [`KeyFrom`] from text, implement [`Handler`] for "run a command"
//! or "POST to a URL", and pass an [`idem::AnyStore`] as the store. [`Stats`] counts what
//! happened, for tests and for a verifier. Errors are [`BrokerError`]s, the
//! [`idem::KindError`] shape stores use too.

mod admin;
mod any;
mod consumer;
mod error;
mod key;
pub mod memory;
mod message;
mod producer;
mod source;
mod url;

pub use crate::admin::{Admin, AnyAdmin, DeadLetter};
pub use crate::any::{AnyAcker, AnyDelivery, AnyProducer, AnySource, Receipt};
pub use crate::consumer::{
    Consumer, Failure, Handler, ItemOutcome, Processor, RoundOutcome, Settings, Stats,
    StatsSnapshot, StoreMode, TransactionalMode, TxHandler, metric, shutdown_signal,
};
pub use crate::error::{BrokerError, BrokerErrorKind};
pub use crate::key::{
    FingerprintExtractor, FingerprintFrom, KeyExtractError, KeyExtractor, KeyFrom,
    ParseKeyFromError,
};
pub use crate::message::{Message, header};
pub use crate::producer::{Outgoing, RetryPolicy, new_message_id};
pub use crate::source::{Acker, Incoming, Source};
pub use crate::url::{BrokerKind, BrokerUrl, QueueType, SourceConfig, SourceOptions};

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis-streams")]
pub mod redis_streams;
#[cfg(feature = "rocketmq")]
pub mod rocketmq;
#[cfg(feature = "stomp")]
pub mod stomp;
