//! A broker URL to a connected source: the broker twin of [`idem::AnyStore`], for tools that
//! pick their broker at run time (a `--from URL` flag).
//!
//! 1. [`BrokerUrl`] parses `amqp://`, `nats://`, `mqtt://` (`tcp://`) or `redis://` and names its
//!    [`BrokerKind`]; printed, it hides the password.
//! 2. [`SourceOptions`] says what to consume there (queue, stream, subject, group, topic, client
//!    id, prefetch, queue type, ack wait); [`SourceOptions::config`] checks them against the
//!    broker (a missing option, or one that belongs to another broker, is a one-line
//!    [`Config`](BrokerErrorKind::Config) error) and builds the adapter's configuration, a
//!    [`SourceConfig`], before anything connects.
//! 3. [`SourceConfig::connect`] connects it as an [`AnySource`]; [`SourceConfig::admin`] opens
//!    its [`AnyAdmin`]; [`BrokerUrl::producer`] publishes with an [`AnyProducer`].

// Without any adapter the enums below have no variant: what would use the arguments is gone.
#![cfg_attr(
    not(any(
        feature = "amqp",
        feature = "nats",
        feature = "mqtt",
        feature = "redis-streams",
        feature = "kafka",
        feature = "stomp",
        feature = "rocketmq"
    )),
    allow(unused_variables, unreachable_code, dead_code)
)]

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{BrokerError, BrokerErrorKind, redact};

/// The brokers idem has adapters for. Exhaustive: tools match on it (a new adapter is a new
/// version of this crate).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BrokerKind {
    /// RabbitMQ (AMQP 0-9-1): `amqp://`.
    Amqp,
    /// NATS JetStream: `nats://`.
    Nats,
    /// MQTT 5 (tested on Mosquitto): `mqtt://` or `tcp://`.
    Mqtt,
    /// Redis Streams: `redis://`.
    Redis,
    /// Kafka (tested on tansu): `kafka://`, the bootstrap servers.
    Kafka,
    /// STOMP 1.2 (tested on ActiveMQ Classic): `stomp://`.
    Stomp,
    /// RocketMQ (tested on rocketmq-rust): `rocketmq://`, the name server.
    RocketMq,
}

impl BrokerKind {
    /// Every kind.
    pub const ALL: [BrokerKind; 7] = [
        BrokerKind::Amqp,
        BrokerKind::Nats,
        BrokerKind::Mqtt,
        BrokerKind::Redis,
        BrokerKind::Kafka,
        BrokerKind::Stomp,
        BrokerKind::RocketMq,
    ];

    /// The URL scheme, which is also the kind's short name: `amqp`, `nats`, `mqtt`, `redis`,
    /// `kafka`, `stomp`, `rocketmq`.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Amqp => "amqp",
            BrokerKind::Nats => "nats",
            BrokerKind::Mqtt => "mqtt",
            BrokerKind::Redis => "redis",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Stomp => "stomp",
            BrokerKind::RocketMq => "rocketmq",
        }
    }

    /// The broker's name for people: `RabbitMQ`, `NATS JetStream`, `MQTT 5`, `Redis Streams`,
    /// `Kafka`, `STOMP`, `RocketMQ`.
    pub fn broker_name(self) -> &'static str {
        match self {
            BrokerKind::Amqp => "RabbitMQ",
            BrokerKind::Nats => "NATS JetStream",
            BrokerKind::Mqtt => "MQTT 5",
            BrokerKind::Redis => "Redis Streams",
            BrokerKind::Kafka => "Kafka",
            BrokerKind::Stomp => "STOMP",
            BrokerKind::RocketMq => "RocketMQ",
        }
    }

    /// The cargo feature of this crate that builds the adapter.
    pub fn feature(self) -> &'static str {
        match self {
            BrokerKind::Amqp => "amqp",
            BrokerKind::Nats => "nats",
            BrokerKind::Mqtt => "mqtt",
            BrokerKind::Redis => "redis-streams",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Stomp => "stomp",
            BrokerKind::RocketMq => "rocketmq",
        }
    }

    /// Whether this build has the adapter (its [`feature`](BrokerKind::feature)).
    pub fn is_built(self) -> bool {
        match self {
            BrokerKind::Amqp => cfg!(feature = "amqp"),
            BrokerKind::Nats => cfg!(feature = "nats"),
            BrokerKind::Mqtt => cfg!(feature = "mqtt"),
            BrokerKind::Redis => cfg!(feature = "redis-streams"),
            BrokerKind::Kafka => cfg!(feature = "kafka"),
            BrokerKind::Stomp => cfg!(feature = "stomp"),
            BrokerKind::RocketMq => cfg!(feature = "rocketmq"),
        }
    }

    /// The kind a word names: `amqp` or `rabbitmq`, `nats`, `mqtt` or `mosquitto`, `redis`,
    /// `kafka`, `stomp` or `activemq`, `rocketmq`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "amqp" | "rabbitmq" => BrokerKind::Amqp,
            "nats" => BrokerKind::Nats,
            "mqtt" | "mosquitto" => BrokerKind::Mqtt,
            "redis" => BrokerKind::Redis,
            "kafka" => BrokerKind::Kafka,
            "stomp" | "activemq" => BrokerKind::Stomp,
            "rocketmq" => BrokerKind::RocketMq,
            _ => return None,
        })
    }

    /// The port a URL without one means.
    pub fn default_port(self) -> u16 {
        match self {
            BrokerKind::Amqp => 5672,
            BrokerKind::Nats => 4222,
            BrokerKind::Mqtt => 1883,
            BrokerKind::Redis => 6379,
            BrokerKind::Kafka => 9092,
            BrokerKind::Stomp => 61613,
            BrokerKind::RocketMq => 9876,
        }
    }

    /// An error for a build without this adapter.
    pub(crate) fn not_built(self) -> BrokerError {
        BrokerError::new(
            BrokerErrorKind::Config,
            format!(
                "{}:// ({}) is not built in: idem-broker needs its `{}` feature",
                self.as_str(),
                self.broker_name(),
                self.feature()
            ),
        )
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A broker URL: its [`BrokerKind`] and the URL itself, password included, which only
/// [`expose`](BrokerUrl::expose) hands out. `Display` and `Debug` replace the password with
/// `***` ([`idem::redact_url`]), so a `BrokerUrl` can go into logs and error messages as is.
///
/// ```
/// use idem_broker::{BrokerKind, BrokerUrl};
/// let url: BrokerUrl = "amqp://guest:secret@127.0.0.1:5672/%2f".parse()?;
/// assert_eq!(url.kind(), BrokerKind::Amqp);
/// assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
/// let e = "pulsar://u:secret@h:6650".parse::<BrokerUrl>().unwrap_err();
/// assert!(e.to_string().contains("unsupported broker URL scheme \"pulsar\""));
/// assert!(!e.to_string().contains("secret"));
/// # Ok::<(), idem_broker::BrokerError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    kind: BrokerKind,
    url: String,
}

impl BrokerUrl {
    /// Parses a broker URL. Checks the scheme and that there is a host; nothing connects.
    ///
    /// # Errors
    /// A one-line [`Config`](BrokerErrorKind::Config) error (the URL redacted): not a URL, no
    /// host, a TLS scheme (not built in), or an unknown scheme.
    pub fn parse(text: &str) -> Result<Self, BrokerError> {
        let config = |message: String| BrokerError::new(BrokerErrorKind::Config, message);
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(config(format!(
                "{} is not a broker URL: expected amqp://HOST, nats://HOST, mqtt://HOST, \
                 redis://HOST, kafka://HOST, stomp://HOST or rocketmq://HOST",
                redact(text)
            )));
        };
        if rest.is_empty() || rest.starts_with(['/', '?']) {
            return Err(config(format!("broker URL {} has no host", redact(text))));
        }
        let scheme = scheme.to_ascii_lowercase();
        let no_tls = |name: &str, plain: &str| {
            config(format!(
                "{scheme}:// ({name} over TLS) is not built into idem: use {plain}:// on a \
                 trusted network, or a TLS-terminating proxy on the same host"
            ))
        };
        let kind = match scheme.as_str() {
            "amqp" => BrokerKind::Amqp,
            "nats" => BrokerKind::Nats,
            "mqtt" | "tcp" => BrokerKind::Mqtt,
            "redis" => BrokerKind::Redis,
            "kafka" => BrokerKind::Kafka,
            "stomp" => BrokerKind::Stomp,
            "rocketmq" => BrokerKind::RocketMq,
            "amqps" => return Err(no_tls("AMQP", "amqp")),
            "tls" | "nats+tls" => return Err(no_tls("NATS", "nats")),
            "mqtts" | "ssl" => return Err(no_tls("MQTT", "mqtt")),
            "rediss" => return Err(no_tls("Redis", "redis")),
            _ => {
                return Err(config(format!(
                    "unsupported broker URL scheme {scheme:?} in {}: expected amqp:// \
                     (RabbitMQ), nats:// (NATS JetStream), mqtt:// (MQTT 5), redis:// \
                     (Redis Streams), kafka://, stomp:// (ActiveMQ) or rocketmq://",
                    redact(text)
                )));
            }
        };
        Ok(Self {
            kind,
            url: text.to_owned(),
        })
    }

    /// The broker this URL names.
    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// The URL with its password, to connect with. Never print it: print the `BrokerUrl`.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// A publisher to this broker (see [`AnyProducer`](crate::AnyProducer)).
    ///
    /// # Errors
    /// The broker is unreachable, refuses the credentials, or its adapter is not built.
    pub async fn producer(&self) -> Result<crate::AnyProducer, BrokerError> {
        crate::AnyProducer::connect(self).await
    }
}

impl FromStr for BrokerUrl {
    type Err = BrokerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

/// The kind of RabbitMQ queue to declare.
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
    /// `quorum` or `classic`, as RabbitMQ's `x-queue-type` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl FromStr for QueueType {
    type Err = BrokerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            _ => Err(BrokerError::new(
                BrokerErrorKind::Config,
                format!("unknown queue type {s:?}: expected quorum or classic"),
            )),
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to consume on the broker of a [`BrokerUrl`], whatever the broker: each option applies to
/// some brokers only, and [`config`](SourceOptions::config) refuses one given for another broker
/// rather than ignoring it. Errors name the options as the `idem` command's flags do
/// (`--queue`).
///
/// | URL | adapter (feature) | [`SourceOptions`] | dead letters |
/// |---|---|---|---|
/// | `amqp://USER:PASS@HOST:PORT/VHOST` | RabbitMQ (`amqp`) | `queue` (required), `queue_type`, `prefetch` | queue `<queue>.dlq` |
/// | `nats://[USER:PASS@]HOST:PORT` | NATS JetStream (`nats`) | `stream` (required), `subject` (default `<stream>.>`), `group` (durable consumer), `ack_wait`, `prefetch` (max ack pending) | stream `<stream>_DLQ` |
/// | `mqtt://[USER:PASS@]HOST:PORT`, `tcp://` | MQTT 5 (`mqtt`) | `topic` (required), `client_id` | session `<client id>.dead-letter` |
/// | `redis://[USER:PASS@]HOST:PORT[/DB]` | Redis Streams (`redis-streams`) | `stream` (required), `group` | stream `<stream>:dead-letter` |
/// | `kafka://HOST:PORT[,HOST:PORT…]` | Kafka (`kafka`) | `topic` (required), `group`, `strict_order` | topic `<topic>.dlq` |
/// | `stomp://[USER:PASS@]HOST:PORT` | STOMP 1.2, ActiveMQ (`stomp`) | `queue` (required), `prefetch` | queue `DLQ.<queue>` |
/// | `rocketmq://HOST:PORT` (name server) | RocketMQ (`rocketmq`) | `topic` (required), `group` | topic `<group>_IDEM_DLQ` |

#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SourceOptions {
    /// The consumer's name (`idem consume`: its namespace). The defaults derive from it: the
    /// NATS durable consumer and Redis consumer group (NATS: with characters other than
    /// `A-Z a-z 0-9 - _` as `_`), the MQTT client id `idem-<name>`.
    pub name: String,
    /// RabbitMQ, STOMP: the queue to consume (required).
    pub queue: Option<String>,
    /// RabbitMQ: the type of queue to declare (default quorum).
    pub queue_type: Option<QueueType>,
    /// RabbitMQ: the prefetch (default 256); NATS: the most unacked deliveries, `max_ack_pending`
    /// (default 1000); STOMP: the most unacked messages the broker sends (default 256).
    pub prefetch: Option<u16>,
    /// NATS: the JetStream stream; Redis: the stream key (required for both).
    pub stream: Option<String>,
    /// NATS: the subjects the stream captures, when it is created (default `<stream>.>`).
    pub subject: Option<String>,
    /// NATS: the durable consumer; Redis, Kafka, RocketMQ: the consumer group. Replicas share
    /// it. Default: from [`name`](SourceOptions::name).
    pub group: Option<String>,
    /// NATS: deliveries not acked within this are redelivered (default 30 s).
    pub ack_wait: Option<Duration>,
    /// MQTT: the topic filter to subscribe to at QoS 1 (required; wildcards allowed); Kafka,
    /// RocketMQ: the topic (required).
    pub topic: Option<String>,
    /// MQTT: the persistent session's client id (default `idem-<name>`).
    pub client_id: Option<String>,
    /// Kafka: one message of a partition at a time, in offset order (default false: messages
    /// with the same record key run one at a time, other keys concurrently).
    pub strict_order: bool,
    /// Declare the queue, exchanges, streams, consumer and dead-letter session on connect
    /// (default true); false uses what exists. Redis consumer groups are created either way.
    pub declare: bool,
}

impl SourceOptions {
    /// No option set yet, declaring, with `name` for the defaults.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            queue: None,
            queue_type: None,
            prefetch: None,
            stream: None,
            subject: None,
            group: None,
            ack_wait: None,
            topic: None,
            client_id: None,
            strict_order: false,
            declare: true,
        }
    }

    /// Checks the options against `url`'s broker and builds its adapter's configuration.
    ///
    /// # Errors
    /// A one-line [`Config`](BrokerErrorKind::Config) error: a required option is missing
    /// (`amqp:// needs --queue (the queue to consume), e.g. --queue orders`), an option belongs
    /// to another broker (`--topic does not apply to amqp:// (it is for mqtt://, kafka:// or
    /// rocketmq://)`), or the adapter is not built.
    pub fn config(&self, url: &BrokerUrl) -> Result<SourceConfig, BrokerError> {
        let kind = url.kind();
        let scheme = kind.as_str();
        let config_error = |message: String| BrokerError::new(BrokerErrorKind::Config, message);
        use BrokerKind::{Amqp, Kafka, Mqtt, Nats, Redis, RocketMq, Stomp};
        let given: [(&str, bool, &[BrokerKind]); 10] = [
            ("--queue", self.queue.is_some(), &[Amqp, Stomp]),
            ("--queue-type", self.queue_type.is_some(), &[Amqp]),
            ("--prefetch", self.prefetch.is_some(), &[Amqp, Nats, Stomp]),
            ("--stream", self.stream.is_some(), &[Nats, Redis]),
            ("--subject", self.subject.is_some(), &[Nats]),
            (
                "--group",
                self.group.is_some(),
                &[Nats, Redis, Kafka, RocketMq],
            ),
            ("--ack-wait", self.ack_wait.is_some(), &[Nats]),
            ("--topic", self.topic.is_some(), &[Mqtt, Kafka, RocketMq]),
            ("--client-id", self.client_id.is_some(), &[Mqtt]),
            ("--strict-order", self.strict_order, &[Kafka]),
        ];
        for (flag, present, kinds) in given {
            if present && !kinds.contains(&kind) {
                let fits: Vec<String> = kinds.iter().map(|k| format!("{k}://")).collect();
                let fits = match fits.split_last() {
                    Some((last, rest)) if !rest.is_empty() => {
                        format!("{} or {last}", rest.join(", "))
                    }
                    _ => fits.concat(),
                };
                return Err(config_error(format!(
                    "{flag} does not apply to {scheme}:// (it is for {fits})"
                )));
            }
        }
        let required = |value: &Option<String>, flag: &str, what: &str, example: &str| match value
            .as_deref()
            .map(str::trim)
        {
            Some(v) if !v.is_empty() => Ok(v.to_owned()),
            _ => Err(config_error(format!(
                "{scheme}:// needs {flag} ({what}), e.g. {flag} {example}"
            ))),
        };
        let name = self.name.trim();
        let group = |what: &str| match (&self.group, name) {
            (Some(g), _) if !g.trim().is_empty() => Ok(g.trim().to_owned()),
            (None, n) if !n.is_empty() => Ok(n.to_owned()),
            _ => Err(config_error(format!(
                "{scheme}:// needs --group ({what}) or a consumer name to derive it from"
            ))),
        };
        if !kind.is_built() {
            return Err(kind.not_built());
        }
        match kind {
            Amqp => {
                let queue = required(&self.queue, "--queue", "the queue to consume", "orders")?;
                self.amqp(queue)
            }
            Nats => {
                let stream = required(&self.stream, "--stream", "the JetStream stream", "ORDERS")?;
                let durable = match &self.group {
                    Some(_) => group("the durable consumer")?,
                    None => group("the durable consumer")?
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect(),
                };
                self.nats(stream, durable)
            }
            Mqtt => {
                let topic = required(&self.topic, "--topic", "the topic filter", "'orders/#'")?;
                let client_id = match self.client_id.as_deref().map(str::trim) {
                    Some(id) if !id.is_empty() => id.to_owned(),
                    _ if !name.is_empty() => format!("idem-{name}"),
                    _ => {
                        return Err(config_error(format!(
                            "{scheme}:// needs --client-id (the persistent session) or a \
                             consumer name to derive it from"
                        )));
                    }
                };
                self.mqtt(client_id, topic)
            }
            Redis => {
                let stream = required(&self.stream, "--stream", "the stream key", "orders")?;
                self.redis(stream, group("the consumer group")?)
            }
            Kafka => {
                let topic = required(&self.topic, "--topic", "the topic", "orders")?;
                self.kafka(topic, group("the consumer group")?)
            }
            Stomp => {
                let queue = required(&self.queue, "--queue", "the queue to consume", "orders")?;
                self.stomp(queue)
            }
            RocketMq => {
                let topic = required(&self.topic, "--topic", "the topic", "orders")?;
                // RocketMQ group names: letters, digits, `-`, `_`, `%`, `|`.
                let group = group("the consumer group")?
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '%' | '|') {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                self.rocketmq(topic, group)
            }
        }
    }

    #[cfg(feature = "amqp")]
    fn amqp(&self, queue: String) -> Result<SourceConfig, BrokerError> {
        let mut config = crate::amqp::AmqpConfig::new(queue);
        if let Some(t) = self.queue_type {
            config = config.queue_type(t);
        }
        if let Some(n) = self.prefetch {
            config = config.prefetch(n);
        }
        config.declare = self.declare;
        Ok(SourceConfig::Amqp(config))
    }

    #[cfg(not(feature = "amqp"))]
    fn amqp(&self, _queue: String) -> Result<SourceConfig, BrokerError> {
        Err(BrokerKind::Amqp.not_built())
    }

    #[cfg(feature = "nats")]
    fn nats(&self, stream: String, durable: String) -> Result<SourceConfig, BrokerError> {
        let subject = self
            .subject
            .clone()
            .unwrap_or_else(|| format!("{stream}.>"));
        let mut config = crate::nats::NatsConfig::new(stream, subject, durable);
        if let Some(wait) = self.ack_wait {
            config = config.ack_wait(wait);
        }
        if let Some(n) = self.prefetch {
            config.max_ack_pending = i64::from(n);
        }
        config.declare = self.declare;
        Ok(SourceConfig::Nats(config))
    }

    #[cfg(not(feature = "nats"))]
    fn nats(&self, _stream: String, _durable: String) -> Result<SourceConfig, BrokerError> {
        Err(BrokerKind::Nats.not_built())
    }

    #[cfg(feature = "mqtt")]
    fn mqtt(&self, client_id: String, topic: String) -> Result<SourceConfig, BrokerError> {
        let mut config = crate::mqtt::MqttConfig::new(client_id, topic);
        config.declare_dead_letter_session = self.declare;
        Ok(SourceConfig::Mqtt(config))
    }

    #[cfg(not(feature = "mqtt"))]
    fn mqtt(&self, _client_id: String, _topic: String) -> Result<SourceConfig, BrokerError> {
        Err(BrokerKind::Mqtt.not_built())
    }

    #[cfg(feature = "redis-streams")]
    fn redis(&self, stream: String, group: String) -> Result<SourceConfig, BrokerError> {
        if !self.declare {
            tracing::info!("declare = false: the Redis consumer group is still created if missing");
        }
        Ok(SourceConfig::Redis(
            crate::redis_streams::RedisStreamConfig::new(stream, group),
        ))
    }

    #[cfg(not(feature = "redis-streams"))]
    fn redis(&self, _stream: String, _group: String) -> Result<SourceConfig, BrokerError> {
        Err(BrokerKind::Redis.not_built())
    }

    #[cfg(feature = "kafka")]
    fn kafka(&self, topic: String, group: String) -> Result<SourceConfig, BrokerError> {
        let order = if self.strict_order {
            crate::kafka::Order::Partition
        } else {
            crate::kafka::Order::PerKey
        };
        Ok(SourceConfig::Kafka(
            crate::kafka::KafkaConfig::new(topic, group)
                .order(order)
                .declare(self.declare),
        ))
    }

    #[cfg(not(feature = "kafka"))]
    fn kafka(&self, _topic: String, _group: String) -> Result<SourceConfig, BrokerError> {
        Err(BrokerKind::Kafka.not_built())
    }

    #[cfg(feature = "stomp")]
    fn stomp(&self, queue: String) -> Result<SourceConfig, BrokerError> {
        let mut config = crate::stomp::StompConfig::new(queue);
        if let Some(n) = self.prefetch {
            config.prefetch = u32::from(n);
        }
        if !self.declare {
            tracing::info!("declare = false: STOMP brokers create queues on first use");
        }
        Ok(SourceConfig::Stomp(config))
    }

    #[cfg(not(feature = "stomp"))]
    fn stomp(&self, _queue: String) -> Result<SourceConfig, BrokerError> {
        Err(BrokerKind::Stomp.not_built())
    }

    #[cfg(feature = "rocketmq")]
    fn rocketmq(&self, topic: String, group: String) -> Result<SourceConfig, BrokerError> {
        let mut config = crate::rocketmq::RocketMqConfig::new(topic, group);
        config.declare = self.declare;
        Ok(SourceConfig::RocketMq(config))
    }

    #[cfg(not(feature = "rocketmq"))]
    fn rocketmq(&self, _topic: String, _group: String) -> Result<SourceConfig, BrokerError> {
        Err(BrokerKind::RocketMq.not_built())
    }
}

/// The configuration of one adapter's source, whichever it is: built by
/// [`SourceOptions::config`], or by hand from an adapter's own configuration (to set what the
/// options do not cover, e.g. a NATS stream's duplicate window), then connected as an
/// [`AnySource`](crate::AnySource) or opened as an [`AnyAdmin`](crate::AnyAdmin).
///
/// ```no_run
/// # #[cfg(feature = "amqp")]
/// # async fn demo() -> Result<(), idem_broker::BrokerError> {
/// use idem_broker::{BrokerUrl, SourceOptions};
///
/// let url: BrokerUrl = "amqp://guest:guest@127.0.0.1:5672/%2f".parse()?;
/// let mut options = SourceOptions::new("billing");
/// options.queue = Some("orders".into());
/// let config = options.config(&url)?; // checked: nothing has connected yet
/// println!("consuming {} from {url}", config.describe()); // the password is hidden
/// let source = config.connect(&url).await?; // an AnySource, for idem_broker::Consumer
/// # let _ = source; Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum SourceConfig {
    /// RabbitMQ.
    #[cfg(feature = "amqp")]
    Amqp(crate::amqp::AmqpConfig),
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(crate::nats::NatsConfig),
    /// MQTT 5.
    #[cfg(feature = "mqtt")]
    Mqtt(crate::mqtt::MqttConfig),
    /// Redis Streams.
    #[cfg(feature = "redis-streams")]
    Redis(crate::redis_streams::RedisStreamConfig),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(crate::kafka::KafkaConfig),
    /// STOMP 1.2 (ActiveMQ).
    #[cfg(feature = "stomp")]
    Stomp(crate::stomp::StompConfig),
    /// RocketMQ.
    #[cfg(feature = "rocketmq")]
    RocketMq(crate::rocketmq::RocketMqConfig),
}

impl SourceConfig {
    /// The broker this configuration is for.
    pub fn kind(&self) -> BrokerKind {
        match *self {
            #[cfg(feature = "amqp")]
            SourceConfig::Amqp(_) => BrokerKind::Amqp,
            #[cfg(feature = "nats")]
            SourceConfig::Nats(_) => BrokerKind::Nats,
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(_) => BrokerKind::Mqtt,
            #[cfg(feature = "redis-streams")]
            SourceConfig::Redis(_) => BrokerKind::Redis,
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(_) => BrokerKind::Kafka,
            #[cfg(feature = "stomp")]
            SourceConfig::Stomp(_) => BrokerKind::Stomp,
            #[cfg(feature = "rocketmq")]
            SourceConfig::RocketMq(_) => BrokerKind::RocketMq,
        }
    }

    /// What is consumed, for people: `queue "orders"`, `stream "ORDERS" with durable consumer
    /// "billing"`, `topic "orders/#" in session "idem-billing"`, `stream "orders" as group
    /// "billing"`, `topic "orders" as group "billing"`.
    pub fn describe(&self) -> String {
        match *self {
            #[cfg(feature = "amqp")]
            SourceConfig::Amqp(ref c) => format!("queue {:?}", c.queue),
            #[cfg(feature = "nats")]
            SourceConfig::Nats(ref c) => format!(
                "stream {:?} with durable consumer {:?}",
                c.stream, c.consumer
            ),
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(ref c) => {
                format!("topic {:?} in session {:?}", c.topic, c.client_id)
            }
            #[cfg(feature = "redis-streams")]
            SourceConfig::Redis(ref c) => format!("stream {:?} as group {:?}", c.stream, c.group),
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(ref c) => format!("topic {:?} as group {:?}", c.topic, c.group),
            #[cfg(feature = "stomp")]
            SourceConfig::Stomp(ref c) => format!("queue {:?}", c.queue),
            #[cfg(feature = "rocketmq")]
            SourceConfig::RocketMq(ref c) => format!("topic {:?} as group {:?}", c.topic, c.group),
        }
    }

    /// Checks that `url` is for this configuration's broker.
    pub(crate) fn check(&self, url: &BrokerUrl) -> Result<(), BrokerError> {
        if url.kind() == self.kind() {
            return Ok(());
        }
        Err(BrokerError::new(
            BrokerErrorKind::Config,
            format!(
                "a {} configuration cannot be used with {url}",
                self.kind().broker_name()
            ),
        ))
    }

    /// Connects the adapter's source (declaring what it consumes, unless told not to).
    ///
    /// # Errors
    /// As the adapter's `connect`: the broker is unreachable, refuses the credentials or the
    /// configuration; or `url` is for another broker.
    pub async fn connect(&self, url: &BrokerUrl) -> Result<crate::AnySource, BrokerError> {
        self.check(url)?;
        let to = url.expose();
        match *self {
            #[cfg(feature = "amqp")]
            SourceConfig::Amqp(ref c) => crate::amqp::AmqpSource::connect(to, c.clone())
                .await
                .map(crate::AnySource::new),
            #[cfg(feature = "nats")]
            SourceConfig::Nats(ref c) => crate::nats::NatsSource::connect(to, c.clone())
                .await
                .map(crate::AnySource::new),
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(ref c) => crate::mqtt::MqttSource::connect(to, c.clone())
                .await
                .map(crate::AnySource::new),
            #[cfg(feature = "redis-streams")]
            SourceConfig::Redis(ref c) => {
                crate::redis_streams::RedisStreamSource::connect(to, c.clone())
                    .await
                    .map(crate::AnySource::new)
            }
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(ref c) => crate::kafka::KafkaSource::connect(to, c.clone())
                .await
                .map(crate::AnySource::new),
            #[cfg(feature = "stomp")]
            SourceConfig::Stomp(ref c) => crate::stomp::StompSource::connect(to, c.clone())
                .await
                .map(crate::AnySource::new),
            #[cfg(feature = "rocketmq")]
            SourceConfig::RocketMq(ref c) => {
                crate::rocketmq::RocketMqSource::connect(to, c.clone())
                    .await
                    .map(crate::AnySource::new)
            }
        }
    }

    /// Opens the adapter's [`Admin`](crate::Admin) for what this configuration consumes: its
    /// backlog, its dead letters, its clean-up. Declares nothing.
    ///
    /// # Errors
    /// The broker is unreachable or refuses the credentials; or `url` is for another broker.
    pub async fn admin(&self, url: &BrokerUrl) -> Result<crate::AnyAdmin, BrokerError> {
        self.check(url)?;
        let to = url.expose();
        match *self {
            #[cfg(feature = "amqp")]
            SourceConfig::Amqp(ref c) => crate::amqp::admin::AmqpAdmin::connect(to, c.clone())
                .await
                .map(crate::AnyAdmin::new),
            #[cfg(feature = "nats")]
            SourceConfig::Nats(ref c) => crate::nats::admin::NatsAdmin::connect(to, c.clone())
                .await
                .map(crate::AnyAdmin::new),
            #[cfg(feature = "mqtt")]
            SourceConfig::Mqtt(ref c) => crate::mqtt::admin::MqttAdmin::connect(to, c.clone())
                .await
                .map(crate::AnyAdmin::new),
            #[cfg(feature = "redis-streams")]
            SourceConfig::Redis(ref c) => {
                crate::redis_streams::admin::RedisStreamAdmin::connect(to, c.clone())
                    .await
                    .map(crate::AnyAdmin::new)
            }
            #[cfg(feature = "kafka")]
            SourceConfig::Kafka(ref c) => crate::kafka::admin::KafkaAdmin::connect(to, c.clone())
                .await
                .map(crate::AnyAdmin::new),
            #[cfg(feature = "stomp")]
            SourceConfig::Stomp(ref c) => crate::stomp::admin::StompAdmin::connect(to, c.clone())
                .await
                .map(crate::AnyAdmin::new),
            #[cfg(feature = "rocketmq")]
            SourceConfig::RocketMq(ref c) => {
                crate::rocketmq::admin::RocketMqAdmin::connect(to, c.clone())
                    .await
                    .map(crate::AnyAdmin::new)
            }
        }
    }
}

#[cfg(feature = "amqp")]
impl From<crate::amqp::AmqpConfig> for SourceConfig {
    fn from(c: crate::amqp::AmqpConfig) -> Self {
        SourceConfig::Amqp(c)
    }
}

#[cfg(feature = "nats")]
impl From<crate::nats::NatsConfig> for SourceConfig {
    fn from(c: crate::nats::NatsConfig) -> Self {
        SourceConfig::Nats(c)
    }
}

#[cfg(feature = "mqtt")]
impl From<crate::mqtt::MqttConfig> for SourceConfig {
    fn from(c: crate::mqtt::MqttConfig) -> Self {
        SourceConfig::Mqtt(c)
    }
}

#[cfg(feature = "redis-streams")]
impl From<crate::redis_streams::RedisStreamConfig> for SourceConfig {
    fn from(c: crate::redis_streams::RedisStreamConfig) -> Self {
        SourceConfig::Redis(c)
    }
}

#[cfg(feature = "kafka")]
impl From<crate::kafka::KafkaConfig> for SourceConfig {
    fn from(c: crate::kafka::KafkaConfig) -> Self {
        SourceConfig::Kafka(c)
    }
}

#[cfg(feature = "stomp")]
impl From<crate::stomp::StompConfig> for SourceConfig {
    fn from(c: crate::stomp::StompConfig) -> Self {
        SourceConfig::Stomp(c)
    }
}

#[cfg(feature = "rocketmq")]
impl From<crate::rocketmq::RocketMqConfig> for SourceConfig {
    fn from(c: crate::rocketmq::RocketMqConfig) -> Self {
        SourceConfig::RocketMq(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: fmt::Debug>(r: Result<T, BrokerError>) -> String {
        match r {
            Ok(v) => panic!("{v:?}"),
            Err(e) => {
                assert_eq!(e.kind(), BrokerErrorKind::Config, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn parses_broker_urls_and_redacts_them() {
        let url: BrokerUrl = "amqp://guest:secret@127.0.0.1:5672/%2f"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(
            format!("{url:?}"),
            "BrokerUrl(amqp://guest:***@127.0.0.1:5672/%2f)"
        );
        assert!(url.expose().contains("secret"));
        for (s, kind) in [
            ("nats://127.0.0.1:4222", BrokerKind::Nats),
            ("mqtt://127.0.0.1:1883", BrokerKind::Mqtt),
            ("tcp://127.0.0.1:1883", BrokerKind::Mqtt),
            ("REDIS://127.0.0.1:6379/3", BrokerKind::Redis),
            ("kafka://127.0.0.1:9092,127.0.0.2:9092", BrokerKind::Kafka),
            ("stomp://admin:admin@127.0.0.1:61613", BrokerKind::Stomp),
            ("rocketmq://127.0.0.1:9876", BrokerKind::RocketMq),
        ] {
            let url: BrokerUrl = s.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(url.kind(), kind);
        }
        let e = err("pulsar://u:secret@h:6650".parse::<BrokerUrl>());
        assert!(
            e.contains("unsupported broker URL scheme \"pulsar\"")
                && e.contains("amqp://")
                && !e.contains("secret"),
            "{e}"
        );
        let e = err("amqps://u:secret@h".parse::<BrokerUrl>());
        assert!(e.contains("TLS") && !e.contains("secret"), "{e}");
        assert!(err(BrokerUrl::parse("127.0.0.1:5672")).contains("not a broker URL"));
        assert!(err(BrokerUrl::parse("amqp://")).contains("no host"));
        assert!(!err(BrokerUrl::parse("u:secret@h")).contains("secret"));
        assert!(!e.contains('\n'));
    }

    #[test]
    fn kinds_have_names() {
        assert_eq!(BrokerKind::from_name("rabbitmq"), Some(BrokerKind::Amqp));
        assert_eq!(BrokerKind::from_name("mosquitto"), Some(BrokerKind::Mqtt));
        assert_eq!(BrokerKind::from_name("rabbit"), None);
        for kind in BrokerKind::ALL {
            assert_eq!(BrokerKind::from_name(kind.as_str()), Some(kind));
        }
        assert_eq!(
            "classic".parse::<QueueType>().ok(),
            Some(QueueType::Classic)
        );
        assert!(err("lazy".parse::<QueueType>()).contains("quorum or classic"));
    }

    #[cfg(all(
        feature = "amqp",
        feature = "nats",
        feature = "mqtt",
        feature = "redis-streams"
    ))]
    #[test]
    fn options_must_fit_the_broker() {
        let url = |s: &str| s.parse::<BrokerUrl>().unwrap_or_else(|e| panic!("{e}"));
        let opts = || SourceOptions::new("billing.v2");
        let e = err(opts().config(&url("amqp://h")));
        assert!(e.contains("amqp:// needs --queue"), "{e}");
        let mut o = opts();
        o.queue = Some("q".into());
        o.topic = Some("t".into());
        let e = err(o.config(&url("amqp://h")));
        assert!(
            e.contains(
                "--topic does not apply to amqp:// (it is for mqtt://, kafka:// or rocketmq://)"
            ),
            "{e}"
        );
        let mut o = opts();
        o.stream = Some("s".into());
        o.client_id = Some("c".into());
        assert!(err(o.config(&url("redis://h"))).contains("--client-id does not apply"));
        assert!(err(opts().config(&url("nats://h"))).contains("nats:// needs --stream"));
        let mut o = SourceOptions::new("");
        o.stream = Some("s".into());
        assert!(err(o.config(&url("redis://h"))).contains("needs --group"));
    }

    #[cfg(all(
        feature = "amqp",
        feature = "nats",
        feature = "mqtt",
        feature = "redis-streams"
    ))]
    #[test]
    fn defaults_follow_the_name() {
        let url = |s: &str| s.parse::<BrokerUrl>().unwrap_or_else(|e| panic!("{e}"));
        let mut o = SourceOptions::new("billing.v2");
        o.stream = Some("ORDERS".into());
        o.prefetch = Some(7);
        match o.config(&url("nats://h")) {
            Ok(SourceConfig::Nats(c)) => {
                assert_eq!(c.consumer, "billing_v2");
                assert_eq!(c.subjects, vec!["ORDERS.>".to_owned()]);
                assert_eq!(c.max_ack_pending, 7);
                assert!(c.declare);
            }
            other => panic!("{other:?}"),
        }
        let mut o = SourceOptions::new("billing.v2");
        o.topic = Some("orders/#".into());
        o.declare = false;
        match o.config(&url("mqtt://h")) {
            Ok(SourceConfig::Mqtt(c)) => {
                assert_eq!(c.client_id, "idem-billing.v2");
                assert!(!c.declare_dead_letter_session);
            }
            other => panic!("{other:?}"),
        }
        let mut o = SourceOptions::new("billing.v2");
        o.stream = Some("orders".into());
        let config = o
            .config(&url("redis://h"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.describe(),
            "stream \"orders\" as group \"billing.v2\""
        );
        let mut o = SourceOptions::new("billing");
        o.queue = Some("orders".into());
        o.queue_type = Some(QueueType::Classic);
        match o.config(&url("amqp://h")) {
            Ok(SourceConfig::Amqp(c)) => {
                assert_eq!(c.queue_type, QueueType::Classic);
                assert_eq!(c.dead_letter_queue, "orders.dlq");
            }
            other => panic!("{other:?}"),
        }
        // A configuration goes with its own broker's URLs only.
        let nats = SourceConfig::from(crate::nats::NatsConfig::new("S", "s.>", "c"));
        let e = nats.check(&url("amqp://h")).map(|()| 0);
        assert!(err(e).contains("NATS JetStream configuration"));
    }
}
