//! What `--broker` names, and what a consumer process is told: the broker kind, its URL, the
//! names of one mode's queue (stream, topic), and the settings every consumer of the mode
//! shares. The adapters' configurations are built here, once, so that `verify` declaring the
//! topology and the consumer processes consuming it agree on every setting.

use std::fmt;
use std::time::Duration;

use anyhow::bail;
use idem_broker::amqp::AmqpConfig;
use idem_broker::mqtt::MqttConfig;
use idem_broker::nats::NatsConfig;
use idem_broker::redis_streams::RedisStreamConfig;
use serde::{Deserialize, Serialize};

use crate::store_url::redact;
use crate::verify::report::ModeName;

/// The four brokers `verify --broker` knows.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BrokerKind {
    /// RabbitMQ (AMQP 0-9-1).
    Amqp,
    /// NATS JetStream.
    Nats,
    /// MQTT 5 (Mosquitto).
    Mqtt,
    /// Redis Streams.
    Redis,
}

impl BrokerKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Amqp => "amqp",
            BrokerKind::Nats => "nats",
            BrokerKind::Mqtt => "mqtt",
            BrokerKind::Redis => "redis",
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--broker`: a kind alone (`nats`) asks `verify` to start a private instance it can restart;
/// a URL (`nats://host:4222`) uses that server, which `verify` does not restart.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BrokerSpec {
    pub(crate) kind: BrokerKind,
    /// The server to use; `None`: start a private one.
    pub(crate) url: Option<String>,
}

impl fmt::Debug for BrokerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerSpec")
            .field("kind", &self.kind)
            .field("url", &self.url.as_deref().map(redact))
            .finish()
    }
}

impl BrokerSpec {
    /// Parses `amqp`, `rabbitmq`, `nats`, `mqtt`, `mosquitto`, `redis`, or a URL with one of
    /// the schemes `amqp://`, `nats://`, `mqtt://` (`tcp://`), `redis://`.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Self> {
        let private = |kind| Ok(Self { kind, url: None });
        match text {
            "amqp" | "rabbitmq" => return private(BrokerKind::Amqp),
            "nats" => return private(BrokerKind::Nats),
            "mqtt" | "mosquitto" => return private(BrokerKind::Mqtt),
            "redis" => return private(BrokerKind::Redis),
            _ => {}
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            bail!(
                "--broker {}: expected amqp, nats, mqtt or redis (a private broker that verify \
                 starts and restarts), or a URL amqp://, nats://, mqtt://, redis:// (a running \
                 server)",
                redact(text)
            );
        };
        if rest.is_empty() {
            bail!("--broker {}: the URL has no host", redact(text));
        }
        let kind = match scheme {
            "amqp" => BrokerKind::Amqp,
            "nats" => BrokerKind::Nats,
            "mqtt" | "tcp" => BrokerKind::Mqtt,
            "redis" => BrokerKind::Redis,
            other => bail!(
                "--broker {}: unsupported scheme {other:?} (amqp, nats, mqtt, redis; TLS \
                 schemes are not supported by verify)",
                redact(text)
            ),
        };
        Ok(Self {
            kind,
            url: Some(text.to_owned()),
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

    /// Where the producer publishes: the AMQP queue (default exchange), NATS subject, MQTT
    /// topic or Redis stream key.
    pub(crate) fn destination(&self, kind: BrokerKind) -> String {
        match kind {
            BrokerKind::Nats => format!("{}.transfers", self.base),
            BrokerKind::Amqp | BrokerKind::Mqtt | BrokerKind::Redis => self.base.clone(),
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

    pub(crate) fn mqtt_client_id(&self, slot: usize) -> String {
        format!("{}-{slot}", self.base)
    }
}

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
    pub(crate) kind: BrokerKind,
    /// The broker's URL through `verify`'s proxy.
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
        assert!(spec.url.is_some());
        assert!(!format!("{spec:?}").contains("secret"));
        assert_eq!(
            BrokerSpec::parse("tcp://h:1883").unwrap().kind,
            BrokerKind::Mqtt
        );
        let err = BrokerSpec::parse("kafka://u:secret@h:9092")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"kafka\"") && !err.contains("secret"),
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
