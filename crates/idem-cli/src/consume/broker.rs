//! `--from URL` and the broker options: which adapter of `idem_broker` consumes what. The URL
//! is an [`idem_broker::BrokerUrl`] and the options become [`idem_broker::SourceOptions`]: the
//! library checks them against the broker before anything connects (an option that does not
//! apply to the URL's broker is an error, not silently ignored), builds the adapter's
//! configuration, and connects it as an [`idem_broker::AnySource`].
//!
//! | `--from` | adapter | what is consumed | dead letters (declared unless `--no-declare`) |
//! |---|---|---|---|
//! | `amqp://…/VHOST` | RabbitMQ | `--queue` (a quorum queue unless `--queue-type classic`) | exchange `<queue>.dlx` → queue `<queue>.dlq` |
//! | `nats://` | NATS JetStream | stream `--stream` capturing `--subject`, durable consumer `--group` | stream `<stream>_DLQ` |
//! | `mqtt://`, `tcp://` | MQTT 5 | `--topic` in the persistent session `--client-id` | topic `idem/dead-letter/<client id>` |
//! | `redis://` | Redis Streams | stream `--stream`, consumer group `--group` | stream `<stream>:dead-letter` |
//! | `kafka://` (feature `kafka`) | Kafka | `--topic`, consumer group `--group` (`--strict-order`) | topic `<topic>.dlq` |
//! | `stomp://` (feature `stomp`) | STOMP 1.2 (ActiveMQ) | `--queue` | queue `DLQ.<queue>` |
//! | `rocketmq://` (feature `rocketmq`) | RocketMQ (the name server) | `--topic`, consumer group `--group` | topic `<group>_IDEM_DLQ` |

use std::time::Duration;

use idem::Namespace;
use idem_broker::{BrokerUrl, QueueType, SourceConfig, SourceOptions, StatsSnapshot};

use super::{Prepared, Started, parse_duration};

/// The options that say what to consume on each broker.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct BrokerOptions {
    /// The queue to consume (required). RabbitMQ: declared durable with its dead-letter
    /// exchange `<queue>.dlx` and queue `<queue>.dlq` unless --no-declare; STOMP: dead letters
    /// go to `DLQ.<queue>`.
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "RabbitMQ (amqp://), STOMP (stomp://)"
    )]
    queue: Option<String>,
    /// The type of queue to declare: `quorum` (replicated, counts deliveries) or `classic`.
    /// Must match an existing queue's type.
    #[arg(long, value_name = "TYPE", help_heading = "RabbitMQ (amqp://)", value_parser = parse_queue_type)]
    queue_type: Option<QueueType>,
    /// Most deliveries held unacked at once (RabbitMQ's prefetch, JetStream's max_ack_pending,
    /// STOMP's activemq.prefetchSize); default 256 for RabbitMQ and STOMP, 1000 for NATS.
    #[arg(long, value_name = "N", help_heading = "RabbitMQ (amqp://)", value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: Option<u16>,

    /// The stream to consume (required). NATS: created if missing, capturing --subject; Redis:
    /// the stream key.
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "NATS JetStream (nats://), Redis Streams (redis://)"
    )]
    stream: Option<String>,
    /// NATS: the subjects the stream captures, used only when the stream is created (default
    /// `<stream>.>`).
    #[arg(
        long,
        value_name = "SUBJECT",
        help_heading = "NATS JetStream (nats://), Redis Streams (redis://)"
    )]
    subject: Option<String>,
    /// The durable consumer (NATS) or consumer group (Redis, Kafka, RocketMQ) that replicas of
    /// this consumer share. Default: the namespace (NATS and RocketMQ: with characters other
    /// than A-Z a-z 0-9 - _ as `_`).
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "NATS JetStream (nats://), Redis Streams (redis://)"
    )]
    group: Option<String>,
    /// NATS: a delivery not acked within this is redelivered (default 30s); idem reports
    /// progress while commands run, so it need not cover --timeout.
    #[arg(long, value_name = "DURATION", help_heading = "NATS JetStream (nats://), Redis Streams (redis://)", value_parser = parse_duration)]
    ack_wait: Option<Duration>,

    /// MQTT: the topic filter to subscribe to at QoS 1 (required; wildcards allowed); Kafka,
    /// RocketMQ: the topic (required).
    #[arg(
        long,
        value_name = "TOPIC",
        help_heading = "MQTT 5 (mqtt://), Kafka (kafka://), RocketMQ (rocketmq://)"
    )]
    topic: Option<String>,
    /// The persistent session's client id: the broker keeps unacked messages under it while
    /// the sidecar is away. Must be stable across restarts and unique per running sidecar
    /// (default `idem-<namespace>`).
    #[arg(long, value_name = "ID", help_heading = "MQTT 5 (mqtt://)")]
    client_id: Option<String>,

    /// One message of a partition at a time, in offset order. Default: messages with the same
    /// record key run one at a time in order, other keys of the partition concurrently.
    #[arg(long, help_heading = "Kafka (kafka://)")]
    strict_order: bool,

    /// Declare nothing (queues, exchanges, streams, dead-letter session): use what exists.
    /// Redis consumer groups are still created when missing.
    #[arg(long)]
    no_declare: bool,
}

fn parse_queue_type(s: &str) -> Result<QueueType, String> {
    s.parse()
        .map_err(|e: idem_broker::BrokerError| e.message().to_owned())
}

impl BrokerOptions {
    /// The options in the library's terms; `namespace` names the defaults (group, client id).
    fn source_options(&self, namespace: &Namespace) -> SourceOptions {
        let mut o = SourceOptions::new(namespace.as_str());
        o.queue.clone_from(&self.queue);
        o.queue_type = self.queue_type;
        o.prefetch = self.prefetch;
        o.stream.clone_from(&self.stream);
        o.subject.clone_from(&self.subject);
        o.group.clone_from(&self.group);
        o.ack_wait = self.ack_wait;
        o.topic.clone_from(&self.topic);
        o.client_id.clone_from(&self.client_id);
        o.strict_order = self.strict_order;
        o.declare = !self.no_declare;
        o
    }
}

/// A validated broker configuration, not connected yet.
#[derive(Debug)]
pub(crate) struct Plan {
    url: BrokerUrl,
    config: SourceConfig,
}

impl Plan {
    /// Checks that the options fit the broker of `from`, and builds its adapter's config.
    ///
    /// # Errors
    /// A missing required option, or one that belongs to another broker.
    pub(crate) fn new(
        from: &BrokerUrl,
        opts: &BrokerOptions,
        namespace: &Namespace,
    ) -> anyhow::Result<Plan> {
        let config = opts
            .source_options(namespace)
            .config(from)
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        Ok(Plan {
            url: from.clone(),
            config,
        })
    }

    /// The broker's admin for this destination (dead letters, backlog).
    ///
    /// # Errors
    /// The broker is unreachable.
    pub(crate) async fn admin(&self) -> anyhow::Result<idem_broker::AnyAdmin> {
        self.config
            .admin(&self.url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {}: {}", self.url, e.message()))
    }

    /// What is consumed, for messages.
    pub(crate) fn describe(&self) -> String {
        self.config.describe()
    }

    /// Connects and consumes until SIGTERM or ctrl-c.
    ///
    /// # Errors
    /// The broker is unreachable or refuses the configuration (nothing was consumed), or the
    /// consumer stopped on an error retrying cannot fix.
    pub(super) async fn consume(
        self,
        prepared: Prepared,
        started: Started,
    ) -> anyhow::Result<StatsSnapshot> {
        // The adapter's message already holds its driver's error text; its source chain would
        // repeat it. The line names the URL once.
        let cannot = |e: idem_broker::BrokerError| {
            let message = e.message();
            let message = message
                .strip_prefix(&format!("connecting to {}: ", started.from))
                .unwrap_or(message);
            // In this command's terms.
            let message = message.replace(
                "declare it as it exists, or use it without declaring",
                "give --queue-type to match it, or --no-declare to use it as it is",
            );
            let text = format!("cannot consume from {}: {message}", started.from);
            crate::exit::one_line_error(&anyhow::Error::new(e), text)
        };
        let what = self.config.describe();
        let source = self.config.connect(&self.url).await.map_err(cannot)?;
        prepared.run(source, &what, &started).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace::new("billing.v2").unwrap_or_else(|e| panic!("{e}"))
    }

    fn plan(from: &str, opts: BrokerOptions) -> anyhow::Result<Plan> {
        let url: BrokerUrl = from.parse()?;
        Plan::new(&url, &opts, &ns())
    }

    #[test]
    fn options_must_fit_the_broker() {
        let e = plan("amqp://h", BrokerOptions::default())
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("needs --queue"), "{e}");
        let opts = BrokerOptions {
            queue: Some("q".into()),
            topic: Some("t".into()),
            ..BrokerOptions::default()
        };
        let e = plan("amqp://h", opts).map(|_| ()).unwrap_err();
        assert!(
            e.to_string().contains("--topic does not apply to amqp://"),
            "{e}"
        );
        let e = plan("nats://h", BrokerOptions::default())
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("needs --stream"), "{e}");
    }

    #[test]
    fn flags_reach_the_adapter() {
        let opts = BrokerOptions {
            stream: Some("ORDERS".into()),
            prefetch: Some(9),
            ack_wait: Some(Duration::from_secs(3)),
            no_declare: true,
            ..BrokerOptions::default()
        };
        match plan("nats://h", opts) {
            Ok(Plan {
                config: SourceConfig::Nats(c),
                ..
            }) => {
                assert_eq!(c.consumer, "billing_v2");
                assert_eq!(c.max_ack_pending, 9);
                assert_eq!(c.ack_wait, Duration::from_secs(3));
                assert!(!c.declare);
            }
            other => panic!("{other:?}"),
        }
        let opts = BrokerOptions {
            topic: Some("orders/#".into()),
            ..BrokerOptions::default()
        };
        match plan("mqtt://h", opts) {
            Ok(Plan {
                config: SourceConfig::Mqtt(c),
                ..
            }) => assert_eq!(c.client_id, "idem-billing.v2"),
            other => panic!("{other:?}"),
        }
    }
}
