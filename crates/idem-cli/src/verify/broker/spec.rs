//! What `--broker` names, and what a consumer process is told: the broker kind, its URL, the
//! names of one mode's queue (stream, topic), and the settings every consumer of the mode
//! shares. The adapters' configurations are built here, once, so that `verify` declaring the
//! topology and the consumer processes consuming it agree on every setting.

use std::fmt;
use std::time::Duration;

use anyhow::anyhow;
use idem_broker::amqp::AmqpConfig;
#[cfg(feature = "kafka")]
use idem_broker::kafka::KafkaConfig;
use idem_broker::mqtt::MqttConfig;
use idem_broker::nats::NatsConfig;
use idem_broker::redis_streams::RedisStreamConfig;
#[cfg(feature = "rocketmq")]
use idem_broker::rocketmq::RocketMqConfig;
#[cfg(feature = "stomp")]
use idem_broker::stomp::StompConfig;
use idem_broker::{BrokerError, BrokerErrorKind, SourceConfig};
pub(crate) use idem_broker::{BrokerKind, BrokerUrl};
use serde::{Deserialize, Serialize};

use crate::verify::report::ModeName;

/// `--broker`: a kind alone (`nats`) asks `verify` to start a private instance it can restart;
/// a URL (`nats://host:4222`, parsed by [`BrokerUrl`]) uses that server, which `verify` does not
/// restart.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BrokerSpec {
    pub(crate) kind: BrokerKind,
    /// The server to use; `None`: start a private one.
    pub(crate) url: Option<BrokerUrl>,
}

impl fmt::Debug for BrokerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerSpec")
            .field("kind", &self.kind)
            .field("url", &self.url)
            .finish()
    }
}

impl BrokerSpec {
    /// A broker's name ([`BrokerKind::from_name`]: `amqp`, `rabbitmq`, `nats`, `mqtt`,
    /// `mosquitto`, `redis`, `kafka`, `stomp`, `activemq`, `rocketmq`), or a broker URL.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let spec = Self::parse_any(text)?;
        if !spec.kind.is_built() {
            return Err(anyhow!("--broker: {}", not_built(spec.kind).message()));
        }
        Ok(spec)
    }

    fn parse_any(text: &str) -> anyhow::Result<Self> {
        if let Some(kind) = BrokerKind::from_name(text) {
            return Ok(Self { kind, url: None });
        }
        let url = BrokerUrl::parse(text).map_err(|e| {
            anyhow!(
                "--broker: {} (or a broker's name alone, amqp, nats, mqtt, redis, kafka, \
                 activemq or rocketmq, for a private broker that verify starts and restarts)",
                e.message()
            )
        })?;
        Ok(Self {
            kind: url.kind(),
            url: Some(url),
        })
    }
}

/// The names of one mode's run on the broker, all derived from one base
/// (`idem-verify-<run>-<mode>`), so runs never share a queue.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Names {
    pub(crate) base: String,
}

/// The durable consumer (NATS), consumer group (Redis) and shared subscription group (MQTT)
/// all consumer processes share.
const GROUP: &str = "verify";

impl Names {
    pub(crate) fn new(run_id: &str, mode: ModeName) -> Self {
        Self {
            base: format!("idem-verify-{run_id}-{}", mode.as_str()),
        }
    }

    /// Where the producer publishes: the AMQP or STOMP queue, NATS subject, MQTT, Kafka or
    /// RocketMQ topic, or Redis stream key.
    pub(crate) fn destination(&self, kind: BrokerKind) -> String {
        match kind {
            BrokerKind::Nats => format!("{}.transfers", self.base),
            _ => self.base.clone(),
        }
    }

    pub(crate) fn nats(&self, s: &Settings) -> NatsConfig {
        let mut config = NatsConfig::new(&self.base, self.destination(BrokerKind::Nats), GROUP)
            .ack_wait(s.redelivery())
            // Planned producer copies come later than this, so they are stored: they stand for
            // a retry past the dedup window (an outbox replayed later). Retries after a lost
            // PubAck land within it and are dropped by the server, as they should be.
            .duplicate_window(NATS_DUPLICATE_WINDOW);
        config.pull_batch = s.prefetch.max(1);
        config
    }

    pub(crate) fn amqp(&self, s: &Settings) -> AmqpConfig {
        AmqpConfig::new(&self.base).prefetch(u16::try_from(s.prefetch).unwrap_or(u16::MAX))
    }

    pub(crate) fn redis(&self, s: &Settings, slot: usize) -> RedisStreamConfig {
        RedisStreamConfig::new(&self.base, GROUP)
            .consumer(format!("slot-{slot}"))
            .claim_idle(s.redelivery())
    }

    /// Slot `slot`'s persistent session, in a shared subscription so that the slots compete
    /// for messages as queue consumers do.
    pub(crate) fn mqtt(&self, slot: usize) -> MqttConfig {
        let mut config = MqttConfig::new(
            self.mqtt_client_id(slot),
            format!("$share/{GROUP}/{}", self.base),
        );
        config.session_expiry = Duration::from_secs(3600);
        config
    }

    /// Several partitions, so that the consumer processes of the group share the topic and
    /// each kill moves partitions (a rebalance).
    #[cfg(feature = "kafka")]
    pub(crate) fn kafka(&self) -> KafkaConfig {
        // A group per mode: the members a mode's killed consumers leave behind would hold up
        // the next mode's rebalances for their session timeout.
        KafkaConfig::new(&self.base, format!("{}.{GROUP}", self.base))
            .partitions(KAFKA_PARTITIONS)
            // A killed consumer's partitions move after this; tansu needs at least 6 s.
            .session_timeout(Duration::from_secs(6))
    }

    #[cfg(feature = "stomp")]
    pub(crate) fn stomp(&self, s: &Settings) -> StompConfig {
        let mut config = StompConfig::new(&self.base);
        config.prefetch = u32::try_from(s.prefetch.max(1)).unwrap_or(u32::MAX);
        config
    }

    #[cfg(feature = "rocketmq")]
    pub(crate) fn rocketmq(&self) -> RocketMqConfig {
        RocketMqConfig::new(&self.base, GROUP)
    }

    pub(crate) fn mqtt_client_id(&self, slot: usize) -> String {
        format!("{}-{slot}", self.base)
    }

    /// The adapter's configuration for `kind`: what slot `slot`'s consumer process consumes,
    /// and what `verify` declares, probes and cleans up.
    ///
    /// # Errors
    /// `kind`'s adapter is not built into this `idem` (a cargo feature of idem-cli).
    pub(crate) fn source_config(
        &self,
        kind: BrokerKind,
        s: &Settings,
        slot: usize,
    ) -> Result<SourceConfig, BrokerError> {
        Ok(match kind {
            BrokerKind::Nats => self.nats(s).into(),
            BrokerKind::Amqp => self.amqp(s).into(),
            BrokerKind::Mqtt => self.mqtt(slot).into(),
            BrokerKind::Redis => self.redis(s, slot).into(),
            #[cfg(feature = "kafka")]
            BrokerKind::Kafka => self.kafka().into(),
            #[cfg(feature = "stomp")]
            BrokerKind::Stomp => self.stomp(s).into(),
            #[cfg(feature = "rocketmq")]
            BrokerKind::RocketMq => self.rocketmq().into(),
            #[allow(unreachable_patterns)]
            other => return Err(not_built(other)),
        })
    }
}

/// The error for a broker whose adapter this `idem` was built without.
pub(crate) fn not_built(kind: BrokerKind) -> BrokerError {
    BrokerError::new(
        BrokerErrorKind::Config,
        format!(
            "this idem was built without the {} adapter: build idem-cli with `--features {}`",
            kind.broker_name(),
            kind.feature()
        ),
    )
}

/// Partitions of verify's Kafka topics.
#[cfg(feature = "kafka")]
const KAFKA_PARTITIONS: i32 = 4;

/// The stream's duplicate window for `Nats-Msg-Id` in verify's streams.
pub(crate) const NATS_DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

/// Settings every consumer process of a run shares.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Settings {
    /// Store-mode lease.
    pub(crate) lease_ms: u64,
    /// NATS ack wait, Redis claim idle time: when an unacked delivery comes back.
    pub(crate) redelivery_ms: u64,
    /// Deliveries a consumer takes at once (AMQP prefetch, NATS pull batch, Redis count).
    pub(crate) prefetch: usize,
    /// Rates of the consumers' planned crash points (each a real SIGKILL of the process).
    pub(crate) crash_before_rate: f64,
    pub(crate) crash_after_effect_rate: f64,
    pub(crate) crash_after_complete_rate: f64,
}

impl Settings {
    pub(crate) fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    pub(crate) fn redelivery(&self) -> Duration {
        Duration::from_millis(self.redelivery_ms)
    }
}

/// Everything a consumer process needs, written by `verify` to a file in its temporary
/// directory and read by `idem __verify-consumer --spec FILE`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ConsumerSpec {
    /// The broker's URL through `verify`'s proxy (its scheme says which broker).
    pub(crate) url: String,
    pub(crate) names: Names,
    pub(crate) mode: ModeName,
    /// Store mode: the store URL; transactional mode: the SQLite file's path. Not written to
    /// the file (a URL may hold a password): it travels in the consumer's environment.
    #[serde(skip)]
    pub(crate) store: String,
    pub(crate) run_id: String,
    pub(crate) seed: u64,
    pub(crate) messages: u32,
    pub(crate) accounts: u32,
    pub(crate) settings: Settings,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_alone_are_private_urls_are_given() {
        let spec = BrokerSpec::parse("nats").unwrap();
        assert_eq!((spec.kind, spec.url), (BrokerKind::Nats, None));
        let spec = BrokerSpec::parse("rabbitmq").unwrap();
        assert_eq!(spec.kind, BrokerKind::Amqp);
        let spec = BrokerSpec::parse("amqp://guest:secret@localhost:5672/%2f").unwrap();
        assert_eq!(spec.kind, BrokerKind::Amqp);
        assert!(
            spec.url
                .as_ref()
                .is_some_and(|u| u.expose().contains("secret"))
        );
        assert!(!format!("{spec:?}").contains("secret"));
        assert_eq!(
            BrokerSpec::parse("tcp://h:1883").unwrap().kind,
            BrokerKind::Mqtt
        );
        let err = BrokerSpec::parse("pulsar://u:secret@h:6650")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--broker: unsupported broker URL scheme \"pulsar\"")
                && !err.contains("secret"),
            "{err}"
        );
        assert!(BrokerSpec::parse("rabbit").is_err());
        assert!(BrokerSpec::parse("nats://").is_err());
    }

    #[test]
    fn names_are_per_run_and_mode() {
        let n = Names::new("abc", ModeName::Store);
        assert_eq!(n.base, "idem-verify-abc-store");
        assert_eq!(
            n.destination(BrokerKind::Nats),
            "idem-verify-abc-store.transfers"
        );
        assert_eq!(n.mqtt(2).topic, "$share/verify/idem-verify-abc-store");
        assert_ne!(n.mqtt(1).client_id, n.mqtt(2).client_id);
    }
}
